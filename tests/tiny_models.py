"""Tiny random models built from configs (no download), and the layer error GPTQ minimises, shared by
tests."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


class CharTokenizer:
    """Just enough tokenizer for calibration on a random model: one id per character."""

    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 120 for c in text]}

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=128, n_embd=64, n_layer=2, n_head=4)).eval()


def save_tiny(model, folder: Path, tokenizer_from: Path | None = None) -> Path:
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(folder)
    return folder


def quantized_tiny_llama(folder: Path, tokenizer_from: Path, **overrides) -> Path:
    """A tiny Llama (vocab 512) saved under `folder` and quantized there by GPTQ at group 32 on 4 x 64
    calibration tokens, with the recipe `overrides` on top; returns the checkpoint's folder."""
    from sinkquant.pipeline import quantize_model
    from sinkquant.recipe import Recipe

    source = save_tiny(tiny_llama(vocab=512), folder / "model", tokenizer_from)
    recipe = Recipe().with_overrides(**{
        "weights.group_size": 32, "weights.algorithm": "gptq", "calibration.samples": 4,
        "calibration.seq_len": 64, **overrides,
    })  # fmt: skip
    quantize_model(source, folder / "out", recipe, progress=False)
    return folder / "out"


def row_errors(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """float64 [out]: (w_r - ŵ_r)ᵀ H (w_r - ŵ_r) per row, the layer's output error on the calibration
    tokens that row by row GPTQ minimises."""
    dtype = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
    diff = weight.to(dtype) - dequantized.to(dtype)
    return ((diff @ hessian.to(dtype)) * diff).sum(1, dtype=torch.float64)


def tiny_qwen2(seed: int = 0, vocab: int = 512):
    """Qwen2's shape of a decoder: q/k/v biases, untied LM head, no BOS."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def tiny_gemma3(seed: int = 0, vocab: int = 512):
    """Gemma 3's text decoder: sliding-window and global layers, scaled embeddings, soft-capping."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=32, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


def tiny_gemma3_multimodal(seed: int = 0, vocab: int = 512):
    """Gemma 3 as it ships from 4B up: `Gemma3ForConditionalGeneration`, a SigLIP vision tower and a
    projector beside the text decoder. The vision tower has as many blocks as the decoder, so finding the
    decoder by its block count alone would be ambiguous."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    text = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=32, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
        patch_size=8,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=vocab - 3,
        eoi_token_index=vocab - 2, image_token_index=vocab - 1,
    )  # fmt: skip
    return Gemma3ForConditionalGeneration(config).eval()


def tiny_gpt_oss(seed: int = 0, vocab: int = 512):
    """gpt-oss's decoder: learned sink logits, alternating sliding windows, and MoE experts held as fused
    3-D tensors (`mlp.experts.gate_up_proj`), not linear layers."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"], rope_scaling=None,
    )  # fmt: skip
    return GptOssForCausalLM(config).eval()
