import warnings

import pytest
import torch
from tiny_models import CharTokenizer, tiny_gpt2, tiny_llama

from sinkquant import calibrate
from sinkquant.errors import InputError
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.quantize.weights import matches, quantize_
from sinkquant.recipe import Recipe


def _report(model, samples=2, seq_len=64):
    return calibrate(model, CharTokenizer(), None, samples=samples, seq_len=seq_len, progress=False)


def test_name_and_regex_patterns():
    assert matches("lm_head", "lm_head")
    assert matches("model.layers.0.mlp.down_proj", "down_proj")
    assert matches("model.layers.0.mlp.down_proj", "re:.*mlp.*")
    assert not matches("model.layers.0.mlp.down_proj", "re:mlp")


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, "channel")])
def test_quantize_swaps_linears_keeps_outliers_and_lm_head(bits, group):
    model = tiny_llama()
    report = _report(model)
    recipe = Recipe().with_overrides(
        **{"weights.bits": bits, "weights.group_size": group, "weights.outliers.fraction": 0.05}
    )
    originals = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    summary = quantize_(model, recipe.weights, report, progress=False)
    assert summary.modules == 14 and "lm_head" in summary.skipped
    assert isinstance(model.lm_head, torch.nn.Linear)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, SinkQuantLinear) and layer.n_outliers == round(0.05 * layer.in_features)
    chosen = report.linear["model.layers.0.mlp.down_proj"].outlier_channels(
        0.05, recipe.weights.outliers.select
    )
    assert sorted(layer.outlier_idx.tolist()) == sorted(chosen)
    assert torch.equal(
        layer.dequantized_weight()[:, chosen], originals["model.layers.0.mlp.down_proj"][:, chosen]
    )
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).abs().mean() / before.abs().mean()) < (0.02 if bits == 8 else 0.2)


def test_gpt2_conv1d_is_covered():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    summary = quantize_(
        model,
        Recipe().with_overrides(**{"weights.bits": 8, "weights.outliers": None}).weights,
        None,
        progress=False,
    )
    assert summary.modules == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).abs().max()) < 0.05


def test_outliers_without_report_and_oversized_group_are_errors():
    with pytest.raises(InputError, match="needs a calibration report"):
        quantize_(
            tiny_llama(), Recipe().with_overrides(**{"weights.group_size": 32}).weights, None, progress=False
        )
    recipe = Recipe().with_overrides(**{"weights.group_size": 256, "weights.outliers": None})
    with pytest.raises(InputError, match="exceeds the input width"):
        quantize_(tiny_llama(), recipe.weights, None, progress=False)


def test_ignore_pattern_matching_nothing_warns():
    recipe = Recipe().with_overrides(
        **{
            "weights.outliers": None,
            "weights.group_size": 32,
            "weights.ignore": ["lm_head", "re:.*nonexistent.*"],
        }
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(tiny_llama(), recipe.weights, None, progress=False)
    assert any("matches no linear module" in str(w.message) for w in caught)


def test_threshold_selection_uses_max_abs():
    model = tiny_llama()
    report = _report(model)
    stats = report.linear["model.layers.1.self_attn.o_proj"]
    threshold = sorted(stats.max_abs)[-3]  # strictly above it: the top two channels
    recipe = Recipe().with_overrides(
        **{
            "weights.outliers.select": "threshold",
            "weights.outliers.threshold": threshold,
            "weights.group_size": 32,
        }
    )
    quantize_(model, recipe.weights, report, progress=False)
    assert model.model.layers[1].self_attn.o_proj.n_outliers == 2
