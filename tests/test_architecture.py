"""Parts of a model found by structure: decoder layers, linear layers (GPT-2 Conv1D too), module swaps."""

from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

from sinkquant.architecture import (
    decoder_layers,
    is_linear,
    linear_in_features,
    linear_modules,
    replace_module,
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
