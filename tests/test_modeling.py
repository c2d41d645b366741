import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sinkquant.errors import InputError
from sinkquant.loading import load_model
from sinkquant.modeling import check_fp16_range


def _tiny_llama(**overrides):
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **overrides,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_float16_is_refused_when_the_residual_stream_overflows_it():
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e9)
    ids = torch.arange(16)[None]
    with pytest.raises(InputError, match=r"decoder layer 1 reaches \|h\|"):
        check_fp16_range(model, ids)


def test_float16_is_allowed_when_activations_fit():
    check_fp16_range(_tiny_llama(), torch.arange(16)[None])


def test_missing_model_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nothing" / "here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_remote_code_is_refused_without_the_flag(tmp_path):
    import json

    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="--trust-remote-code"):
        load_model(tmp_path)
