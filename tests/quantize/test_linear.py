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
