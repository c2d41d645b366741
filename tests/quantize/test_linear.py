import pytest
import torch
import torch.nn.functional as F

from sinkquant.quantize.linear import SinkQuantLinear, kernels_available, use_kernels


def _layer(bits, group, n_out, out_f=192, in_f=576, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f).half().float()
    b = torch.randn(out_f)
    idx = torch.randperm(in_f)[:n_out]
    return w, b, idx, SinkQuantLinear.from_float(w, b, bits, group, idx, storage_dtype=torch.float16)


@pytest.mark.parametrize(
    "bits, group, n_out", [(8, None, 6), (4, 128, 6), (4, 64, 0), (4, 32, 15), (4, None, 6)]
)
def test_outlier_columns_are_exact_and_error_is_small(bits, group, n_out):
    w, _, idx, layer = _layer(bits, group, n_out)
    eff = layer.dequantized_weight()
    assert torch.equal(eff[:, idx], w[:, idx])  # bit-identical to the source (fp16) values
    rel = float((eff - w).norm() / w.norm())
    assert rel < (0.01 if bits == 8 else 0.15)


def test_storage_is_really_packed():
    _, _, _, layer = _layer(4, 128, 6)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (192, 285)  # (576 - 6) / 2
    assert layer.weight_scale.shape == (192, 5)  # 570 = 4 * 128 + 58: shorter last group, size kept
    _, _, _, layer8 = _layer(8, None, 6)
    assert layer8.weight.dtype == torch.int8 and layer8.weight.shape == (192, 570)


@pytest.mark.parametrize(
    "bits, group, n_out, rows, dtype",
    [
        (8, None, 6, 3, torch.bfloat16),  # the int8 kernel serves bf16 activations
        (8, None, 6, 1, torch.bfloat16),  # decode: one row, the gathered parts are views
        (8, None, 0, 2, torch.bfloat16),  # nothing to gather or pad
        (4, 128, 6, 3, torch.float32),  # shorter last group: padded with a true zero
        (4, 128, 6, 1, torch.bfloat16),
        (4, 64, 6, 3, torch.bfloat16),
    ],
)
def test_kernel_matches_dequantizing_fallback(bits, group, n_out, rows, dtype):
    if not kernels_available(bits):
        pytest.skip(f"this torch build has no int{bits} CPU kernel")
    w, b, idx, layer = _layer(bits, group, n_out)
    x = torch.randn(rows, 576)
    x[:, idx] *= 50  # outlier channels carry large activations
    x = x.to(dtype)
    assert layer._kernel_ok(x.dtype)
    fast = layer(x)
    assert torch.equal(fast, layer._general_forward(x))  # the bound bf16 closure runs the same ops
    with use_kernels(False):
        slow = layer(x)
    reference = F.linear(x.float(), layer.dequantized_weight(), b)
    fast, slow = fast.float(), slow.float()
    scale = reference.abs().max()
    tolerance = 1e-2  # bf16 activations and outputs
    assert float((fast - slow).abs().max() / scale) < tolerance
    assert float((slow - reference).abs().max() / scale) < tolerance


def test_batched_3d_input_and_dtype_follow_activations():
    _, _, _, layer = _layer(4, 128, 6)
    x = torch.randn(2, 5, 576)
    assert layer(x).shape == (2, 5, 192) and layer(x).dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def _fused_or_skip():
    from sinkquant.quantize.cpu_kernels import fused_int4

    if fused_int4() is None:
        pytest.skip("the fused int4 kernel cannot be built here (needs AVX2, a C++ compiler and ninja)")


def test_fused_layout_holds_every_code_where_the_kernel_reads_it():
    from sinkquant.quantize.cpu_kernels import int4_layout

    codes = torch.randint(0, 16, (5, 70), dtype=torch.uint8)  # groups of 32: 32 + 32 + 6
    packed, stride = int4_layout(codes, 32)
    assert stride == 32 and packed.shape == (5, 3 * 32 // 2)
    runs = packed.view(5, -1, 8)
    unpacked = torch.cat([runs & 15, runs >> 4], dim=-1).reshape(5, 3, 32)
    for g, (start, stop) in enumerate([(0, 32), (32, 64), (64, 70)]):
        assert torch.equal(unpacked[:, g, : stop - start], codes[:, start:stop])
        assert not unpacked[:, g, stop - start :].any()  # padding: zero codes


@pytest.mark.parametrize(
    "group, n_out, rows, bias, out_f",
    [(128, 6, 1, False, 192), (64, 0, 1, True, 192), (32, 15, 4, True, 48), (128, 6, 2, True, 1536)],
)
def test_fused_int4_kernel_matches_the_dequantized_weights(group, n_out, rows, bias, out_f):
    _fused_or_skip()
    torch.manual_seed(1)
    w = torch.randn(out_f, 576)
    idx = torch.randperm(576)[:n_out]
    layer = SinkQuantLinear.from_float(w, torch.randn(out_f) if bias else None, 4, group, idx)
    x = torch.randn(rows, 576)
    x[:, idx] *= 50
    x = x.bfloat16()
    fused = layer(x)
    assert layer._fused_int4() is not None and fused.dtype == torch.bfloat16
    assert torch.equal(fused, layer._general_forward(x))
    reference = F.linear(x.float(), layer.dequantized_weight(), layer.bias)
    scale = reference.abs().max()
    assert float((fused.float() - reference).abs().max() / scale) < 8e-3  # bf16 output rounding
    with use_kernels(False):  # float32 matmul of the dequantized weights, rounded once to bf16
        assert float((fused.float() - layer(x).float()).abs().max() / scale) < 8e-3
    from sinkquant.quantize.linear import use_fused_kernel

    with use_fused_kernel(False):
        assert layer._fused_int4() is None
        assert float((fused.float() - layer(x).float()).abs().max() / scale) < 2e-2  # PyTorch's kernel


def test_fused_kernel_serves_decode_only():
    _fused_or_skip()
    from sinkquant.quantize.linear import FUSED_MAX_ROWS

    _, _, _, layer = _layer(4, 128, 6)
    layer = layer.to(torch.bfloat16)
    calls = []
    fused = layer._fused_int4()
    layer._runtime["fused"] = lambda x2: calls.append(x2.shape[0]) or fused(x2)
    layer._runtime = {k: v for k, v in layer._runtime.items() if k[0] != "forward"}
    layer(torch.randn(1, 1, 576, dtype=torch.bfloat16))
    layer(torch.randn(1, FUSED_MAX_ROWS + 1, 576, dtype=torch.bfloat16))
    assert calls == [1]


def test_pytorch_int4_kernel_keeps_a_constant_group_exact():
    """A one-column last group has zero width (guard scale 1): the kernel's bf16 zero point must not
    swallow its minimum (it did: min + 8 rounded to bf16, up to 15% off on a 100 -> 48 layer)."""
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
