"""One loader for whatever a user points at: a sinkquant checkpoint by its config, else a plain model."""

import torch
from tiny_models import save_tiny, tiny_llama

from sinkquant.loading import is_sinkquant_checkpoint, load_model
from sinkquant.pipeline import quantize_model
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.recipe import Recipe


def test_plain_folder_and_checkpoint_load_through_one_call(tmp_path, stories_path):
    source = save_tiny(tiny_llama(vocab=512), tmp_path / "model", stories_path)
    assert not is_sinkquant_checkpoint(source)
    plain = load_model(source)
    assert isinstance(plain.model.layers[0].mlp.down_proj, torch.nn.Linear)
    recipe = Recipe().with_overrides(**{"weights.group_size": 32, "weights.outliers": None})
    out = quantize_model(source, tmp_path / "out", recipe, progress=False).out_dir
    assert is_sinkquant_checkpoint(out)
    loaded = load_model(out, "float32")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, SinkQuantLinear) and not loaded.training


def test_a_folder_without_a_readable_config_is_not_a_checkpoint(tmp_path):
    assert not is_sinkquant_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not is_sinkquant_checkpoint(tmp_path)
