"""The model architectures the GGUF writer knows: transformers `model_type` -> llama.cpp's name for it,
the hyperparameters it reads from `config.json`, and how HF tensors become GGUF tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Architecture:
    """`permute_qk`: whether q/k rows are reordered for llama.cpp's rotary layout (see `_permute_rows`)."""

    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool

    @property
    def name(self) -> str:
        """llama.cpp's architecture name, the prefix of its metadata keys (`llama.block_count`)."""
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES: dict[str, Architecture] = {
    # HF's Llama checkpoints come from Meta's by a permutation of q/k rows that pairs rotary dimensions as
    # (i, i + d/2); llama.cpp's llama graph rotates adjacent pairs (i, i + 1), so the rows go back
    "llama": Architecture("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    # llama.cpp runs qwen2 with NEOX-style rotary, which is HF's own layout: no permutation
    "qwen2": Architecture("qwen2", gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}


def architecture(config: dict[str, Any]) -> Architecture:
    """The registry entry for a model's `config.json`; InputError naming the supported ones."""
    model_type = config.get("model_type")
    entry = ARCHITECTURES.get(str(model_type))
    if entry is None:
        raise InputError(
            f"GGUF export does not support model_type {model_type!r}: supported are {', '.join(ARCHITECTURES)}"
        )
    return entry


def _rope_theta(config: dict[str, Any]) -> float:
    """rope theta from transformers 5's `rope_parameters` or the older top-level `rope_theta`; only plain
    rotary is written, as scaled variants need metadata (and for llama3, a tensor) this writer lacks."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise InputError(
            f"GGUF export supports plain rotary embeddings only, the model uses rope_type {rope_type!r}: "
            "convert it with llama.cpp's convert_hf_to_gguf.py instead"
        )
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def head_counts(config: dict[str, Any]) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dimension)."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return heads, kv_heads, head_dim


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """The `<arch>.*` keys llama.cpp reads for llama and qwen2 (convert_hf_to_gguf's set_gguf_parameters)."""
    try:
        heads, kv_heads, head_dim = head_counts(config)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_vocab_size(int(config["vocab_size"]))
        eps = float(config["rms_norm_eps"])
    except KeyError as err:
        raise InputError(f"config.json lacks {err.args[0]!r}: a complete HF config is needed") from None
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != int(config["hidden_size"]):
        # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(eps)


def _permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf's `LlamaModel.permute`: within each head, rows (0, d/2, 1, d/2 + 1, ...) become
    adjacent; `heads` is the number of heads the rows hold (the key/value heads for k_proj)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class TensorMap:
    """HF tensor names -> GGUF names and the row reordering each needs, for one model."""

    arch: Architecture
    config: dict[str, Any]

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for a tensor llama.cpp does without (a tied lm_head, rotary buffers)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight" and self.config.get("tie_word_embeddings", False):
            return None  # llama.cpp reuses token_embd.weight when output.weight is absent
        names = gguf.TensorNameMap(self.arch.arch, int(self.config["num_hidden_layers"]))
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in gguf.MODEL_TENSORS[self.arch.arch]:
            raise InputError(
                f"tensor {hf_name!r} has no GGUF name for {self.arch.name}: the model is not a plain "
                f"{self.arch.model_type} checkpoint (export the base HF model, not a modified one)"
            )
        return found[1]

    def transform(self, gguf_name: str, weight: np.ndarray) -> np.ndarray:
        """The weight in llama.cpp's row order."""
        if not self.arch.permute_qk:
            return weight
        heads, kv_heads, _ = head_counts(self.config)
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
        count = {"attn_q": heads, "attn_k": kv_heads}.get(kind)
        return weight if count is None else _permute_rows(weight, count)
