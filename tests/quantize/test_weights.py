import warnings

import pytest
import torch
from tiny_models import CharTokenizer, tiny_gpt2, tiny_llama

from sinkquant import calibrate
from sinkquant.errors import InputError
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.quantize.weights import column_importance, matches, quantize_
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


def _planted(make, magnitude: float):
    """A random model of `make`'s architecture whose first layer's down_proj input carries `magnitude`
    (times 3, 2 and 1) in three channels on the first token of every sequence, and the
    residual stream after it ten times that in one dim: a massive activation, as trained models build
    them in an early MLP."""
    model = make()
    planted, scale = torch.tensor([3, 40, 77]), torch.tensor([3.0, 2.0, 1.0])  # the first two are kept

    def plant(_module, args):
        x = args[0].clone()
        x[:, 0, planted] += magnitude * scale
        return (x,)

    def massive_residual(_module, _args, out):  # Gemma 3 norms the MLP output before the residual add
        hidden = out[0] if isinstance(out, tuple) else out
        hidden[:, 0, 5] += 10 * magnitude

    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(plant)
    model.model.layers[0].register_forward_hook(massive_residual)
    return model


def _down_proj_of_layer0(make, magnitude: float, sink_tokens: str | None = None) -> SinkQuantLinear:
    """Layer 0's down_proj quantized by the default recipe (`sink_tokens` None) or with that override."""
    model = _planted(make, magnitude)
    report = calibrate(model, CharTokenizer(), None, samples=4, seq_len=64, progress=False)
    assert 0 in [layer.position for layer in report.massive.layers], "the plant made no massive activation"
    overrides = {"weights.group_size": 32, "weights.outliers.fraction": 0.0125}
    if sink_tokens is not None:
        overrides["weights.clip_sink_tokens"] = sink_tokens
    weights = Recipe().with_overrides(**overrides).weights
    # 0.0125 x 160 inputs: two columns kept, so one planted channel stays inside a group
    quantize_(model, weights, report, progress=False)
    return model.model.layers[0].mlp.down_proj


@pytest.mark.parametrize("make", ["qwen2", "gemma3"])
def test_the_sink_tokens_rows_do_not_decide_a_groups_range(make):
    """With the default recipe (clip_sink_tokens: exclude), a tenfold larger massive activation on the
    sink token leaves every group's range where it was; with include, that one token moves them (so the
    test can fail)."""
    import tiny_models

    make = getattr(tiny_models, f"tiny_{make}")
    small, large = (_down_proj_of_layer0(make, m) for m in (2e3, 2e4))
    assert small.outlier_idx.tolist() == large.outlier_idx.tolist()
    assert torch.equal(small.weight_scale, large.weight_scale) and torch.equal(small.weight, large.weight)
    included = _down_proj_of_layer0(make, 2e4, "include")
    assert not torch.equal(included.weight_scale, large.weight_scale)


def test_column_importance_is_the_mean_square_and_reads_older_reports():
    """The clip search weighs a column by its mean x² (without the sink rows by default); a report from
    before the mean squares were kept gives (mean |x|)², as then."""
    from types import SimpleNamespace

    from sinkquant.calibrate.report import LinearStats

    stats = LinearStats(
        in_features=2, top_channels=[0], top_max_abs=[9.0], max_abs=[9.0, 1.0], mean_abs=[3.0, 0.5],
        mean_abs_without_sinks=[1.0, 0.5], mean_square=[90.0, 0.5], mean_square_without_sinks=[2.0, 0.4],
    )  # fmt: skip
    report = SimpleNamespace(linear={"lin": stats})
    assert column_importance("lin", report, "exclude").tolist() == pytest.approx([2.0, 0.4])
    assert column_importance("lin", report, "include").tolist() == pytest.approx([90.0, 0.5])
    stats.mean_square = stats.mean_square_without_sinks = None
    assert column_importance("lin", report, "exclude").tolist() == pytest.approx([1.0, 0.25])
    assert column_importance("lin", report, "include").tolist() == pytest.approx([9.0, 0.25])
    assert column_importance("other", report) is None


@pytest.mark.parametrize("recipe_file", ["w4-g128-gptq.yaml", "w4-g128-best.yaml"])
def test_quantize_refuses_a_section_it_cannot_honour(recipe_file):
    """quantize_ is round-to-nearest: given the best recipe's section (GPTQ, rotation, grid) it refuses
    in one line instead of silently rounding to nearest (issue 43)."""
    from pathlib import Path

    from sinkquant.recipe import load_recipe

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    weights = load_recipe(recipes / recipe_file).weights
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(InputError, match="quantize_weights") as refused:
        quantize_(model, weights, _report(model), progress=False)
    assert "\n" not in str(refused.value)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing swapped
