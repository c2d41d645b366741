"""Non-uniform int4 grids (weights.grid: lloyd): the levels follow the weights (denser where they are,
ends fixed) and lower the rounding error against the uniform grid; GPTQ rounds to them and lowers the
layer's output error; a layer on them multiplies by its dequantized weight; a checkpoint loads every way
and scores the same; the paths that cannot carry the levels refuse them."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import quantized_tiny_llama, row_errors

from sinkquant.errors import InputError
from sinkquant.export import export
from sinkquant.format.features.grid import fit_levels, round_to_levels, uniform_levels
from sinkquant.loading import load_model
from sinkquant.pipeline import inspect_checkpoint
from sinkquant.quantize.gptq import gptq_quantize_weight
from sinkquant.quantize.hessian import HessianAccumulator
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.recipe import Recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integrations" / "vllm"))
from sinkquant_vllm.layer import FORMAT_VERSION as PLUGIN_FORMAT  # noqa: E402
from sinkquant_vllm.layer import SHARED_ACROSS_SHARDS, LayerSpec, served_layer  # noqa: E402


def _group_error(weight: torch.Tensor, levels: torch.Tensor, group: int) -> float:
    """Squared error of rounding each group (its own min/max range) to `levels`."""
    total = 0.0
    for start in range(0, weight.shape[1], group):
        g = weight[:, start : start + group]
        low, high = g.amin(1), g.amax(1)
        scale = (high - low) / 15
        total += (round_to_levels(g, scale, low, levels)[1] - g).pow(2).sum().item()
    return total


def test_levels_crowd_where_gaussian_weights_are_and_lower_the_rounding_error():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    levels = fit_levels(weight, 128)
    assert levels[0] == 0 and levels[-1] == 15 and bool((levels.diff() > 0).all())
    assert torch.equal(levels.bfloat16().float(), levels)  # a cast of the model keeps them exact
    steps = levels.diff()
    assert steps[7] < 0.8 and steps[0] > 1.2  # dense in the middle, sparse at the ends
    assert _group_error(weight, levels, 128) < 0.9 * _group_error(weight, uniform_levels(), 128)


def test_levels_are_the_same_at_any_thread_count():
    weight = torch.randn(1536, 576, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fit_levels(weight, 128)
        torch.set_num_threads(2)
        assert torch.equal(fit_levels(weight, 128), one)
    finally:
        torch.set_num_threads(before)


def test_levels_of_uniform_weights_stay_close_to_the_uniform_grid():
    weight = torch.rand(256, 512, generator=torch.Generator().manual_seed(1))
    assert (fit_levels(weight, 128) - uniform_levels()).abs().max() < 0.3


def test_gptq_on_the_layers_levels_lowers_its_output_error():
    torch.manual_seed(0)
    d = 256
    x = torch.randn(4096, d) @ (torch.randn(d, d) / d**0.5 + torch.eye(d))
    acc = HessianAccumulator(d, [])
    acc.add(x)
    h = acc.hessian("include")
    weight = torch.randn(64, d) * 0.02
    uniform = gptq_quantize_weight(weight, h, 4, 128, [], clip_search=True)
    lloyd = gptq_quantize_weight(weight, h, 4, 128, [], clip_search=True, grid="lloyd")
    assert uniform.levels is None and lloyd.levels is not None
    # each stored code stands for its level in its group's range, exactly as the sweep chose it
    layer = SinkQuantLinear.from_float(
        weight,
        None,
        4,
        128,
        [],
        codes=lloyd.codes,
        scale=lloyd.scale,
        minimum=lloyd.minimum,
        levels=lloyd.levels,
    )
    assert torch.allclose(layer.dequantized_weight(), lloyd.weight, atol=1e-6)
    error_uniform = row_errors(weight, uniform.weight, h).sum()
    error_lloyd = row_errors(weight, lloyd.weight, h).sum()
    assert error_lloyd < 0.92 * error_uniform, (error_lloyd, error_uniform)


def test_a_layer_on_its_levels_multiplies_by_its_dequantized_weight():
    torch.manual_seed(0)
    weight = torch.randn(64, 160) * 0.05
    res = gptq_quantize_weight(weight, torch.eye(160) * 4, 4, 32, [3, 77], grid="lloyd")
    layer = SinkQuantLinear.from_float(
        weight, None, 4, 32, [3, 77], codes=res.codes, scale=res.scale, minimum=res.minimum, levels=res.levels
    )
    effective = layer.dequantized_weight()
    assert torch.equal(effective[:, [3, 77]], weight[:, [3, 77]])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 70, 160).to(dtype)
        for rows in (x, x[:, :1]):  # the prefill and decode sizes: both through the dequantized weight
            want = rows.float() @ effective.T
            got = layer(rows).float()
            assert (got - want).abs().max() < 0.02 * want.abs().max()
    with pytest.raises(ValueError, match="codes chosen on it"):
        SinkQuantLinear.from_float(weight, None, 4, 32, [], levels=res.levels)


@pytest.fixture(scope="module")
def grid_checkpoint(tmp_path_factory, stories_path):
    overrides = {"weights.rotation": 16, "weights.grid": "lloyd"}
    return quantized_tiny_llama(tmp_path_factory.mktemp("grid"), stories_path, **overrides)


def test_a_checkpoint_on_levels_loads_every_way_and_scores_the_same(grid_checkpoint):
    from transformers import AutoModelForCausalLM

    qc = json.loads((grid_checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 6
    assert all(spec["grid"] == "lloyd" for spec in qc["layers"].values())
    ours = load_model(grid_checkpoint)
    layers = [m for m in ours.modules() if isinstance(m, SinkQuantLinear)]
    assert layers and all(m.spec.grid == "lloyd" and m.weight_levels[-1] == 15 for m in layers)
    assert list(inspect_checkpoint(grid_checkpoint)["schemes"]) == [
        "int4 g32, inputs rotated (blocks of 16), lloyd grid"
    ]
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(grid_checkpoint)(ids).logits
    assert torch.equal(want, hf)


def test_export_refuses_levels_and_the_vllm_plugin_serves_them(grid_checkpoint, tmp_path):
    with pytest.raises(InputError, match="non-uniform grid"):
        export(grid_checkpoint, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    qc = json.loads((grid_checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] <= PLUGIN_FORMAT
    model = load_model(grid_checkpoint)
    attention = model.model.layers[0].self_attn
    shards = [attention.q_proj, attention.k_proj, attention.v_proj]
    for name, spec in qc["layers"].items():
        module = model.get_submodule(name)
        buffers = {k: (tuple(v.shape), v.dtype) for k, v in module.named_buffers() if k != "bias"}
        assert buffers == dict(LayerSpec.from_dict(spec).shapes()), name
    # vLLM's fused q/k/v: the shards' tensors side by side, each shard's levels at its index
    spec = LayerSpec.from_dict(qc["layers"]["model.layers.0.self_attn.q_proj"])
    sizes = [m.out_features for m in shards]
    fused = {}
    for name in spec.shapes():
        parts = [getattr(m, name) for m in shards]
        fused[name] = parts[0] if name in SHARED_ACROSS_SHARDS else torch.cat(parts, 0)
    served = served_layer(spec, fused, sizes)
    x = torch.randn(5, spec.in_features)
    with torch.no_grad():
        assert torch.equal(served(x), torch.cat([m(x) for m in shards], -1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"weights.grid": "lloyd"}, "int4 with GPTQ"),
        ({"weights.grid": "lloyd", "weights.algorithm": "gptq", "weights.symmetric": True}, "drop symmetric"),
        (
            {"weights.grid": "lloyd", "weights.algorithm": "gptq", "weights.log_scales": True},
            "drop symmetric",
        ),
    ],
)
def test_the_recipe_refuses_levels_where_they_do_not_apply(overrides, message):
    with pytest.raises(ValueError, match=message):
        Recipe().with_overrides(**overrides)
