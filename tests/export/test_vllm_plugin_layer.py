"""The vLLM plugin's linear layer (integrations/vllm), called on tensors without vLLM: it must give
what `SinkQuantLinear` gives on the same checkpoint tensors, alone and fused the way vLLM fuses q/k/v,
and read the tensors by sinkquant's own layer format (no copy of it)."""

import sys
from pathlib import Path

import pytest
import torch

from sinkquant.format import FORMAT_VERSION, LayerSpec
from sinkquant.format.features.rotation import InputRotation, draw_signs
from sinkquant.quantize.linear import SinkQuantLinear, forget_rotated_input

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integrations" / "vllm"))
from sinkquant_vllm import layer as plugin  # noqa: E402


def _layer(bits: int, outliers: int, bias: bool, seed: int = 0, symmetric: bool = False) -> SinkQuantLinear:
    torch.manual_seed(seed)
    weight = torch.randn(96, 160) * 0.05
    idx = torch.randperm(160)[:outliers]
    return SinkQuantLinear.from_float(
        weight.half().float(),
        torch.randn(96).half() if bias else None,
        bits,
        32,
        idx,
        symmetric=symmetric,
        storage_dtype=torch.float16,
    )


def _tensors(layer: SinkQuantLinear) -> dict[str, torch.Tensor]:
    return {name: buf for name, buf in layer.named_buffers() if name != "bias"}


def _spec(layer: SinkQuantLinear) -> LayerSpec:
    return layer.spec


def test_the_plugin_reads_sinkquants_own_format():
    assert plugin.LayerSpec is LayerSpec and plugin.FORMAT_VERSION == FORMAT_VERSION


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("outliers", [0, 3])
def test_a_layers_tensors_are_the_ones_its_spec_names(bits, symmetric, outliers):
    layer = _layer(bits, outliers, bias=True, symmetric=symmetric)
    spec = LayerSpec.from_dict(layer.spec.to_dict())  # as vLLM reads it from config.json
    assert {k: (tuple(v.shape), v.dtype) for k, v in _tensors(layer).items()} == dict(spec.shapes())


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("rows", [1, 7, 80])
def test_the_plugins_kernel_layer_is_sinkquant_linear_exactly(bits, symmetric, rows):
    layer = _layer(bits, 3, bias=False, symmetric=symmetric)
    served = plugin.sinkquant_layer(_spec(layer), _tensors(layer))
    x = torch.randn(rows, 160).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(served(x), layer(x))


def test_a_fused_layer_gives_each_shard_its_own_outputs():
    """vLLM loads q/k/v (same input, so the same outlier columns) into one layer by output rows."""
    idx = torch.tensor([5, 77, 140])
    shards = []
    for seed in range(3):
        torch.manual_seed(seed)
        shards.append(SinkQuantLinear.from_float(torch.randn(64, 160) * 0.05, None, 4, 32, idx))
    fused = {
        name: torch.cat([_tensors(s)[name] for s in shards]) if name != "outlier_idx" else idx.int()
        for name in _tensors(shards[0])
    }
    spec = LayerSpec(160, 64, 4, 32, 3, False, "float32")
    served = plugin.served_layer(spec, fused, [64, 64, 64])
    for x in (torch.randn(4, 160).to(torch.bfloat16), torch.randn(4, 160)):  # kernels; dequantized
        with torch.no_grad():
            assert torch.equal(served(x), torch.cat([s(x) for s in shards], dim=1))


def test_a_fused_log_scale_layer_decodes_each_shard_under_its_own_exponent():
    """Format 4 keeps one scale exponent per checkpoint layer, so a fused layer gets one per shard:
    shards whose scales differ by octaves (q, k and v of unlike magnitude) decode to exactly the bf16
    scales each quantized with, and the fused layer gives each shard's outputs bit for bit."""
    idx = torch.tensor([5, 77, 140])
    shards = []
    for seed, magnitude in enumerate((0.05, 3.0, 0.0007)):
        torch.manual_seed(seed)
        shards.append(
            SinkQuantLinear.from_float(
                torch.randn(64, 160) * magnitude, None, 4, 32, idx, True, log_scales=True
            )
        )
    assert len({int(s.weight_scale_top) for s in shards}) == 3
    fused = {
        name: torch.cat([_tensors(s)[name] for s in shards]) if name != "outlier_idx" else idx.int()
        for name in _tensors(shards[0])
    }
    spec = LayerSpec(160, 64, 4, 32, 3, False, "float32", symmetric=True, log_scales=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in fused.items()} == {
        k: shape_dtype for k, shape_dtype in spec.shapes(192, shards=3).items()
    }
    plain_spec, plain = plugin.for_serving(spec, fused, [64, 64, 64])
    assert not plain_spec.log_scales and "weight_scale_code" not in plain
    assert torch.equal(plain["weight_scale"], torch.cat([s.group_scale() for s in shards]))
    served = plugin.sinkquant_layer(plain_spec, plain)
    x = torch.randn(4, 160).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(served(x), torch.cat([s(x) for s in shards], dim=1))
    with pytest.raises(ValueError, match="exponents"):
        plugin.for_serving(spec, fused, [96, 96])


def test_a_fused_rotated_layer_is_served_by_sinkquant_linear_exactly():
    """Format 5: q/k/v read one input, so their outlier columns and rotation signs are the same; vLLM's
    fused layer takes one `input_signs` for all shards and, through sinkquant's module, gives each
    shard's outputs bit for bit, on the decode, middle and prefill paths."""
    idx = torch.tensor([5, 77, 140])
    rotation = InputRotation(draw_signs(160, 157), 32)
    shards = []
    for seed in range(3):
        torch.manual_seed(seed)
        shards.append(
            SinkQuantLinear.from_float(torch.randn(64, 160) * 0.05, None, 4, 32, idx, rotation=rotation)
        )
    assert all(torch.equal(s.input_signs, shards[0].input_signs) for s in shards)
    shared = ("outlier_idx", "input_signs")
    fused = {
        name: torch.cat([_tensors(s)[name] for s in shards])
        if name not in shared
        else _tensors(shards[0])[name]
        for name in _tensors(shards[0])
    }
    spec = LayerSpec.from_dict(
        {"in_features": 160, "out_features": 64, "bits": 4, "group_size": 32, "outliers": 3,
         "bias": False, "dtype": "float32", "rotation": 32}
    )  # fmt: skip
    assert {k: (tuple(v.shape), v.dtype) for k, v in fused.items()} == dict(spec.shapes(192, shards=3))
    served = plugin.sinkquant_layer(spec, fused)
    assert served.spec.rotation == 32
    for rows in (1, 7, 80):
        x = torch.randn(rows, 160).to(torch.bfloat16)
        with torch.no_grad():
            forget_rotated_input()
            want = torch.cat([s(x) for s in shards], dim=1)
            forget_rotated_input()
            assert torch.equal(served(x), want)
