"""Parts of a model found by structure: decoder layers, linear layers (GPT-2 Conv1D too), module swaps."""

from tiny_models import tiny_gemma3_multimodal, tiny_gpt2, tiny_gpt_oss, tiny_llama
from torch import nn

from sinkquant.architecture import (
    decoder_layers,
    is_linear,
    linear_in_features,
    linear_modules,
    linears_outside_text_model,
    replace_module,
    weights_outside_linears,
)


def test_structure_is_found_by_shape_not_names():
    model = tiny_llama()
    assert len(decoder_layers(model)) == 2
    assert "model.layers.0.self_attn.q_proj" in linear_modules(model)
    gpt2 = tiny_gpt2()
    assert len(decoder_layers(gpt2)) == 2
    conv = gpt2.transformer.h[0].attn.c_attn  # Conv1D: weight [in, out]
    assert is_linear(conv) and linear_in_features(conv) == 64


def test_replace_module_at_any_depth():
    model = tiny_llama()
    new = nn.Identity()
    replace_module(model, "model.layers.1.mlp.down_proj", new)
    assert model.model.layers[1].mlp.down_proj is new
    replace_module(model, "lm_head", new)
    assert model.lm_head is new


def test_weights_outside_linears_names_fused_experts_not_norms_or_linears():
    """gpt-oss keeps its MoE experts as 3-D tensors: they are what a linear-layer quantizer leaves as they
    are, and the count says how much; a Llama has none (norms are 1-D, lm_head and embeddings excluded)."""
    assert weights_outside_linears(tiny_llama()) == {}
    model = tiny_gpt_oss()
    outside = weights_outside_linears(model)
    experts = model.model.layers[0].mlp.experts
    assert outside["model.layers.0.mlp.experts.gate_up_proj"] == experts.gate_up_proj.numel()
    assert "model.layers.1.mlp.router.weight" in outside
    assert len(outside) == 6  # per layer: the two fused expert tensors and the router, no biases
    assert not any(name.endswith(("proj.weight", "layernorm.weight", "sinks", "bias")) for name in outside)
    assert "lm_head.weight" not in outside and "model.embed_tokens.weight" not in outside


def test_multimodal_model_decoder_is_the_text_one_and_its_vision_linears_are_outside():
    """Gemma 3 from 4B up: the text config holds num_hidden_layers, and a vision tower with as many blocks
    must not be taken for the decoder; its linear layers are the ones left outside."""
    model = tiny_gemma3_multimodal()
    assert decoder_layers(model) is model.model.language_model.layers
    outside = linears_outside_text_model(model)
    assert outside and all(name.startswith("model.vision_tower.") for name in outside)
    assert len(outside) == sum(1 for n, m in model.model.vision_tower.named_modules() if is_linear(m))
    assert linears_outside_text_model(tiny_llama()) == []
