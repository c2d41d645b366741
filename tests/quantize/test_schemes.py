import pytest
import torch
import torch.nn.functional as F

from sinkquant.format import LayerSpec
from sinkquant.format.primitives import (
    dequantize_grouped,
    dequantize_int8_per_channel,
    quantize_grouped,
    quantize_int8_per_channel,
    unpack_bits,
)
from sinkquant.format.schemes import (
    SCHEMES,
    Int4Grouped,
    Int8PerChannel,
    WeightScheme,
    register_scheme,
    scheme_for,
)
from sinkquant.quantize.linear import SinkQuantLinear, kernels_available, use_kernels


def _layer(bits, group, n_out, out_f=192, in_f=576, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f).half().float()
    b = torch.randn(out_f)
    idx = torch.randperm(in_f)[:n_out]
    return w, b, idx, SinkQuantLinear.from_float(w, b, bits, group, idx, storage_dtype=torch.float16)


def test_registry_holds_one_scheme_per_bit_width():
    assert set(SCHEMES) >= {4, 8}
    assert isinstance(SCHEMES[8], Int8PerChannel) and isinstance(SCHEMES[4], Int4Grouped)
    for bits, scheme in SCHEMES.items():
        assert isinstance(scheme, WeightScheme) and scheme.bits == bits and scheme_for(bits) is scheme


@pytest.mark.parametrize("bits", [2, 3, 16, None])
def test_unknown_bits_are_refused_with_the_supported_ones(bits):
    with pytest.raises(ValueError, match=rf"no weight scheme for {bits} bits \(it supports 4, 8\)"):
        scheme_for(bits)
    with pytest.raises(ValueError, match="sinkquant layers store 4 or 8 bits"):
        SinkQuantLinear(LayerSpec(64, 32, bits, None, 0, False))


def test_a_bit_width_takes_one_scheme():
    with pytest.raises(ValueError, match="bits 8 already has a weight scheme"):
        register_scheme(type("AnotherInt8", (Int8PerChannel,), {}))
    assert isinstance(SCHEMES[8], Int8PerChannel) and type(SCHEMES[8]) is Int8PerChannel


@pytest.mark.parametrize(
    "bits, group, kept, tolerance",
    [(8, None, 570, 0.01), (4, 128, 570, 0.15), (4, 32, 1000, 0.15), (4, 64, 97, 0.15), (4, None, 300, 0.2)],
)
def test_quantize_dequantize_round_trip(bits, group, kept, tolerance):
    scheme = scheme_for(bits)
    torch.manual_seed(0)
    w = torch.randn(48, kept)
    gs = scheme.group_size(kept, group)
    stored = scheme.quantize(w, gs)
    specs = LayerSpec(kept, 48, bits, None if gs == kept else gs, 0, False).scheme_storage()
    got = {"weight": stored.weight, "weight_scale": stored.scale, "weight_min": stored.minimum}
    for name, (shape, dtype) in specs.items():  # quantize returns exactly the storage layout
        assert got[name].shape == shape and got[name].dtype == dtype, name
    assert (stored.minimum is None) == ("weight_min" not in specs)
    back = scheme.dequantize(stored, kept, gs)
    assert back.dtype == torch.float32 and back.shape == w.shape
    assert float((back - w).norm() / w.norm()) < tolerance


def test_int8_round_trip_is_the_primitive_one():
    w = torch.randn(16, 40)
    q, s = quantize_int8_per_channel(w)
    stored = SCHEMES[8].quantize(w, 40)
    assert torch.equal(stored.weight, q) and torch.equal(stored.scale, s) and stored.minimum is None
    assert torch.equal(SCHEMES[8].dequantize(stored, 40, 40), dequantize_int8_per_channel(q, s))


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_stores_integers_chosen_elsewhere_exactly(symmetric):
    """GPTQ's integers go in as codes/scale/minimum and come back out unchanged."""
    torch.manual_seed(1)
    w = torch.randn(16, 70)
    codes, scale, minimum = quantize_grouped(w, 4, 32, symmetric, torch.bfloat16)
    stored = SCHEMES[4].store(codes, scale, minimum)
    assert stored.weight.shape == (16, 35) and torch.equal(unpack_bits(stored.weight, 4, 70), codes)
    expected = dequantize_grouped(codes, scale, minimum, 32)
    assert torch.equal(SCHEMES[4].dequantize(stored, 70, 32), expected)
    assert torch.equal(SCHEMES[4].quantize(w, 32, symmetric=symmetric).weight, stored.weight)


def test_int4_clip_search_never_does_worse_than_plain_min_max():
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    w[:, ::37] *= 8  # a few wide values per group: shrinking the range helps the others
    plain = SCHEMES[4].quantize(w, 64)
    clipped = SCHEMES[4].quantize(w, 64, clip_search=True)
    err_plain = (SCHEMES[4].dequantize(plain, 256, 64) - w).pow(2).sum()
    err_clipped = (SCHEMES[4].dequantize(clipped, 256, 64) - w).pow(2).sum()
    assert err_clipped <= err_plain


def test_fused_args_give_bind_layer_unpacked_codes():
    w = torch.randn(8, 50)
    for bits in (4, 8):
        scheme = scheme_for(bits)
        stored = scheme.quantize(w, scheme.group_size(50, 32))
        got_bits, codes, scale, minimum = scheme.fused_args(stored, 50)
        assert got_bits == bits and codes.shape == (8, 50) and scale is stored.scale
        assert minimum is stored.minimum
    assert SCHEMES[8].fused_args(SCHEMES[8].quantize(w, 50), 50)[1].dtype == torch.int8


def test_kernel_rules_follow_the_kernels():
    int8, int4 = SCHEMES[8], SCHEMES[4]
    assert int8.kernel_applies(torch.bfloat16, 47, 570) and not int8.kernel_applies(torch.float32, 48, 570)
    assert int4.kernel_applies(torch.float32, 48, 128) and int4.kernel_applies(torch.bfloat16, 48, 32)
    assert not int4.kernel_applies(torch.bfloat16, 47, 128)  # output rows in blocks of 16
    assert not int4.kernel_applies(torch.bfloat16, 48, 48)  # a group size the kernel does not take
    assert int4.fallback_rounds_to_bf16(torch.float32) and not int8.fallback_rounds_to_bf16(torch.float32)


@pytest.mark.parametrize("bits, group, n_out", [(8, None, 6), (4, 128, 6), (4, 64, 0), (4, 32, 15)])
def test_pytorch_kernel_layout_computes_the_dequantized_weight(bits, group, n_out):
    if not kernels_available(bits):
        pytest.skip(f"this torch build has no int{bits} CPU kernel")
    _, _, idx, layer = _layer(bits, group, n_out, in_f=1000)
    keep = torch.ones(1000, dtype=torch.bool)
    keep[idx] = False
    kernel = layer.scheme.pytorch_kernel(
        layer._stored(), keep.nonzero().flatten(), layer.outlier_idx, 1000, layer.group_size
    )
    x = torch.randn(5, 1000).bfloat16()
    y, outliers = kernel(x)
    reference = F.linear(x[:, keep].float(), layer.dequantized_kept())
    assert y.dtype == torch.bfloat16 and kernel.width >= int(keep.sum())
    assert float((y.float() - reference).abs().max() / reference.abs().max()) < 1e-2
    if outliers is not None:  # the gather's outlier columns are x's, in x's dtype
        assert torch.equal(outliers, x[:, layer.outlier_idx.long()])


def test_storage_is_really_packed():
    _, _, _, layer = _layer(4, 128, 6)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (192, 285)  # (576 - 6) / 2
    assert layer.weight_scale.shape == (192, 5)  # 570 = 4 * 128 + 58: shorter last group, size kept
    _, _, _, layer8 = _layer(8, None, 6)
    assert layer8.weight.dtype == torch.int8 and layer8.weight.shape == (192, 570)


@pytest.mark.parametrize(
    "bits, group, symmetric", [(8, None, False), (4, 64, False), (4, None, False), (4, 64, True)]
)
def test_layer_buffers_are_the_scheme_storage(bits, group, symmetric):
    w, b, idx, _ = _layer(bits, group, 6)
    layer = SinkQuantLinear.from_float(w, b, bits, group, idx, symmetric, storage_dtype=torch.float16)
    specs = LayerSpec(576, 192, bits, group, 6, True, symmetric=symmetric).scheme_storage()
    for name, (shape, dtype) in specs.items():
        assert getattr(layer, name).shape == shape and getattr(layer, name).dtype == dtype
    names = list(layer.state_dict())
    assert names == [*specs, "outlier_idx", "outlier_weight", "bias"]  # the checkpoint's key order
    assert (layer.weight_min is None) == (bits == 8 or symmetric)


def test_pytorch_int4_kernel_keeps_a_constant_group_exact():
    """A one-column last group has zero width (guard scale 1): the kernel's bf16 zero point must not
    swallow its minimum (min + 8 * 1 rounded to bf16 loses the minimum's low digits)."""
    if not kernels_available(4):
        pytest.skip("this torch build has no int4 CPU kernel")
    from sinkquant.quantize.linear import use_fused_kernel

    torch.manual_seed(0)
    layer = SinkQuantLinear.from_float(torch.randn(48, 100) * 0.02, None, 4, 32, [0, 33, 66])  # 97 = 3*32 + 1
    x = torch.randn(6, 100).bfloat16()
    with use_fused_kernel(False):
        fast = layer(x).float()
    with use_kernels(False):
        slow = layer(x).float()
    assert float((fast - slow).abs().max() / slow.abs().max()) < 1e-2


@pytest.mark.parametrize("in_f", [104, 1000])
def test_pytorch_int8_kernel_takes_widths_that_are_not_a_multiple_of_16(in_f):
    """torch 2.13's int8 CPU kernel reads the input in blocks of 16, so the layout pads the width to a
    multiple of 16 (a multiple of 8 is not enough)."""
    if not kernels_available(8):
        pytest.skip("this torch build has no int8 CPU kernel")
    from sinkquant.quantize.linear import use_fused_kernel

    torch.manual_seed(0)
    layer = SinkQuantLinear.from_float(torch.randn(48, in_f), None, 8, None, [1, 7])
    x = torch.randn(3, in_f).bfloat16()
    with use_fused_kernel(False):
        fast = layer(x).float()
    with use_kernels(False):
        slow = layer(x).float()
    assert float((fast - slow).abs().max() / slow.abs().max()) < 1e-2


def test_a_symmetric_int4_layer_stores_no_minima_and_computes_the_same():
    """Its minima are -8 * scale exactly, so it drops the buffer (4.125 bits per weight at group 128,
    not 4.25) and dequantizes, through every path, to what it did with the buffer."""
    torch.manual_seed(3)
    w, idx = torch.randn(64, 300), [3, 77, 150]
    layer = SinkQuantLinear.from_float(w, None, 4, 128, idx, symmetric=True)
    assert layer.weight_min is None and "weight_min" not in layer.state_dict()
    codes, scale, minimum = quantize_grouped(w[:, layer._layouts.keep], 4, 128, True, torch.bfloat16)
    assert torch.equal(layer.group_minimum(), minimum) and torch.equal(layer.weight_scale, scale)
    held = SinkQuantLinear.from_float(w, None, 4, 128, idx, codes=codes, scale=scale, minimum=minimum)
    assert held.weight_min is not None  # the asymmetric layout, holding the same numbers
    assert torch.equal(layer.dequantized_weight(), held.dequantized_weight())
    x = torch.randn(5, 300).bfloat16()
    with use_kernels(False):
        assert torch.equal(layer(x), held(x))
    if kernels_available(4):
        from sinkquant.quantize.linear import use_fused_kernel

        with use_fused_kernel(False):
            assert torch.equal(layer(x), held(x))
    assert torch.equal(layer(x), held(x))  # the fused kernel where built, else the same fallback


def test_a_symmetric_layer_refuses_minima_off_its_grid():
    w = torch.randn(16, 64)
    codes, scale, minimum = quantize_grouped(w, 4, 32, False, torch.bfloat16)
    with pytest.raises(ValueError, match="must be -8"):
        SinkQuantLinear.from_float(
            w, None, 4, 32, [], symmetric=True, codes=codes, scale=scale, minimum=minimum
        )
