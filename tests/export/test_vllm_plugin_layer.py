"""The vLLM plugin's linear layer (integrations/vllm), called on tensors without vLLM: it must give
what `SinkQuantLinear` gives on the same checkpoint tensors, alone and fused the way vLLM fuses q/k/v."""

import sys
from pathlib import Path

import pytest
import torch

from sinkquant.quantize.linear import SinkQuantLinear, forget_rotated_input, use_kernels
from sinkquant.quantize.rotation import InputRotation, draw_signs

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


def _spec(layer: SinkQuantLinear) -> plugin.LayerSpec:
    return plugin.LayerSpec(
        layer.in_features,
        layer.out_features,
        layer.bits,
        32 if layer.bits == 4 else None,
        layer.n_outliers,
        layer.bias is not None,
        "float16",
        layer.symmetric,
    )


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("outliers", [0, 3])
def test_the_plugins_reference_forward_is_sinkquant_linear(bits, symmetric, outliers):
    layer = _layer(bits, outliers, bias=True, symmetric=symmetric)
    spec, tensors = _spec(layer), _tensors(layer)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == {
        k: (shape, dtype) for k, (shape, dtype) in spec.shapes().items()
    }
    assert torch.equal(plugin.effective_weight(spec, tensors), layer.dequantized_weight())
    # bf16 activations (as vLLM serves them) in a float32 tensor, against sinkquant's dequantizing path
    # (float32 products; PyTorch's int4 kernel would round its output to bf16)
    x = torch.randn(5, 160).to(torch.bfloat16).float()
    with torch.no_grad(), use_kernels(False):
        expected = layer(x)
        got = plugin.reference_forward(x, spec, tensors, layer.bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
    spec = plugin.LayerSpec(160, 64, 4, 32, 3, False, "float32")
    served = plugin.sinkquant_layer(spec, fused)
    x = torch.randn(4, 160).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(served(x), torch.cat([s(x) for s in shards], dim=1))
        with use_kernels(False):
            expected = torch.cat([s(x.float()) for s in shards], dim=1)
        torch.testing.assert_close(
            plugin.reference_forward(x.float(), spec, fused), expected, rtol=1e-5, atol=1e-5
        )


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
    spec = plugin.LayerSpec(160, 64, 4, 32, 3, False, "float32", symmetric=True, log_scales=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in fused.items()} == {
        k: shape_dtype for k, shape_dtype in spec.shapes(192, shards=3).items()
    }
    plain_spec, plain = plugin.decode_log_scales(spec, fused, [64, 64, 64])
    assert not plain_spec.log_scales and "weight_scale_code" not in plain
    assert torch.equal(plain["weight_scale"], torch.cat([s.group_scale() for s in shards]))
    served = plugin.sinkquant_layer(plain_spec, plain)
    x = torch.randn(4, 160).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(served(x), torch.cat([s(x) for s in shards], dim=1))
    with pytest.raises(ValueError, match="exponents"):
        plugin.decode_log_scales(spec, fused, [96, 96])


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
    spec = plugin.LayerSpec.from_dict(
        {"in_features": 160, "out_features": 64, "bits": 4, "group_size": 32, "outliers": 3,
         "dtype": "float32", "rotation": 32}
    )  # fmt: skip
    assert {k: (tuple(v.shape), v.dtype) for k, v in fused.items()} == dict(spec.shapes(192, shards=3))
    served = plugin.sinkquant_layer(spec, fused)
    assert served.rotation_block == 32
    for rows in (1, 7, 80):
        x = torch.randn(rows, 160).to(torch.bfloat16)
        with torch.no_grad():
            forget_rotated_input()
            want = torch.cat([s(x) for s in shards], dim=1)
            forget_rotated_input()
            assert torch.equal(served(x), want)
    with pytest.raises(ValueError, match="rotated layer"):
        plugin.effective_weight(spec, fused)


def test_a_rotated_checkpoint_needs_sinkquant_beside_vllm():
    layers = {"model.layers.0.mlp.down_proj": {"rotation": 32}, "model.layers.0.mlp.up_proj": {}}
    assert plugin.unserved_layers(layers) is None  # sinkquant is importable here
    reason = plugin.unserved_layers(layers, importable=False)
    assert "model.layers.0.mlp.down_proj" in reason and "pip install --no-deps sinkquant" in reason
    assert plugin.unserved_layers({"a": {"rotation": None}}, importable=False) is None
