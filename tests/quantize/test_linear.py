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
    layer.reset_layouts()
    assert torch.equal(fast, layer(x))  # layouts rebuilt from the buffers give the same numbers
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
    from sinkquant.kernels import fused_kernels

    if fused_kernels() is None:
        pytest.skip("the fused integer kernel cannot be built here (needs AVX2, a C++ compiler and ninja)")


@pytest.mark.parametrize(
    "bits, group, n_out, rows, bias, out_f, in_f",
    [
        (4, 128, 6, 1, False, 192, 576),
        (4, 64, 0, 1, True, 192, 576),
        (4, 32, 15, 4, True, 48, 576),
        (4, 128, 6, 2, True, 1536, 576),
        (8, None, 6, 1, False, 192, 576),
        (8, None, 0, 3, True, 47, 576),
        (8, None, 6, 1, True, 64, 101),  # 95 kept columns: the kernel reads one zero code of padding
    ],
)
def test_fused_kernel_matches_the_dequantized_weights(bits, group, n_out, rows, bias, out_f, in_f):
    _fused_or_skip()
    torch.manual_seed(1)
    w = torch.randn(out_f, in_f)
    idx = torch.randperm(in_f)[:n_out]
    layer = SinkQuantLinear.from_float(w, torch.randn(out_f) if bias else None, bits, group, idx)
    x = torch.randn(rows, in_f)
    x[:, idx] *= 50
    x = x.bfloat16()
    fused = layer(x)
    assert layer._fused() is not None and fused.dtype == torch.bfloat16
    layer.reset_layouts()
    assert torch.equal(fused, layer(x))
    reference = F.linear(x.float(), layer.dequantized_weight(), layer.bias)
    scale = reference.abs().max()
    assert float((fused.float() - reference).abs().max() / scale) < 8e-3  # bf16 output rounding
    with use_kernels(False):  # float32 matmul of the dequantized weights, rounded once to bf16
        assert float((fused.float() - layer(x).float()).abs().max() / scale) < 8e-3
    from sinkquant.quantize.linear import use_fused_kernel

    with use_fused_kernel(False):
        assert layer._fused() is None
        assert float((fused.float() - layer(x).float()).abs().max() / scale) < 2e-2  # PyTorch's kernel


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_kernel_serves_decode_only(bits):
    _fused_or_skip()
    from sinkquant.quantize.linear import FUSED_MAX_ROWS

    _, _, _, layer = _layer(bits, 128, 6)
    layer = layer.to(torch.bfloat16)
    calls = []
    fused = layer._fused()
    layer._layouts.fused = lambda x2: calls.append(x2.shape[0]) or fused(x2)  # before any forward is bound
    layer(torch.randn(1, 1, 576, dtype=torch.bfloat16))
    layer(torch.randn(1, FUSED_MAX_ROWS + 1, 576, dtype=torch.bfloat16))
    assert calls == [1]


@pytest.mark.parametrize("bits, group, n_out", [(4, 128, 6), (4, 48, 0), (8, None, 5)])
def test_dense_buffer_holds_the_dequantized_weight(bits, group, n_out):
    _fused_or_skip()
    torch.manual_seed(4)
    layer = SinkQuantLinear.from_float(torch.randn(40, 300), None, bits, group, torch.randperm(300)[:n_out])
    expected = layer.dequantized_weight()
    expected[:, layer.outlier_idx.long()] = 0  # the outlier part is added apart
    fused = layer._fused()
    assert torch.equal(fused.dequantized(False), expected)
    assert torch.equal(fused.dequantized(True), expected.bfloat16())
    into = torch.full((40, 300), 7.0)
    fused.dequantize_into(into)
    assert torch.equal(into, expected)


@pytest.mark.parametrize("bits, group", [(4, 128), (8, None)])
@pytest.mark.parametrize("bf16_matmul", [True, False])
def test_many_rows_take_one_dense_matmul(bits, group, bf16_matmul, monkeypatch):
    """Prefill-sized calls dequantize into the shared buffer and run one matmul (bf16 where the CPU
    has bf16 dot products, float32 elsewhere); the numbers stay those of the quantized weights."""
    _fused_or_skip()
    from sinkquant.quantize import dispatch

    monkeypatch.setattr(dispatch, "_fast_bf16_matmul", lambda: bf16_matmul)
    torch.manual_seed(5)
    idx = torch.randperm(576)[:6]
    layer = SinkQuantLinear.from_float(torch.randn(192, 576), torch.randn(192), bits, group, idx)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(1, dispatch.DENSE_MIN_ROWS, 576)
    x[..., idx] *= 40
    x = x.bfloat16()
    calls = []
    many = layer._many_rows()
    layer._layouts.many_rows = lambda x2: calls.append(x2.shape[0]) or many(x2)  # before any forward
    y = layer(x)
    assert calls == [dispatch.DENSE_MIN_ROWS] and y.dtype == torch.bfloat16
    reference = F.linear(x.float(), layer.dequantized_weight(), layer.bias.float())
    err = float((y.float() - reference).abs().max() / reference.abs().max())
    assert err < (1.5e-2 if bf16_matmul else 8e-3)  # bf16 weights and sums / bf16 output rounding
    layer.reset_layouts()
    assert torch.equal(layer(x), y)


def test_many_rows_input_gradients_survive_the_next_call():
    """The shared dense buffer is refilled by every layer; an input that needs gradients gets its own
    weight, so the next call cannot overwrite what backward reads."""
    _fused_or_skip()
    from sinkquant.quantize.linear import DENSE_MIN_ROWS

    torch.manual_seed(6)
    a = SinkQuantLinear.from_float(torch.randn(64, 96), None, 4, 32, [1]).to(torch.bfloat16)
    b = SinkQuantLinear.from_float(torch.randn(64, 96), None, 4, 32, [2]).to(torch.bfloat16)
    x = torch.randn(DENSE_MIN_ROWS, 96, dtype=torch.bfloat16, requires_grad=True)
    a(x).float().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    y = a(x)
    b(torch.randn(DENSE_MIN_ROWS, 96, dtype=torch.bfloat16))  # refills the shared buffer
    y.float().sum().backward()
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_log_scale_layer_computes_as_a_layer_holding_its_decoded_scales(symmetric):
    """One byte per scale instead of bf16's two, and nothing else changes: every forward path of a
    log-scale layer gives exactly the numbers of a bf16-scale layer built from its codes and decoded
    scales, and the scales it quantized with lie on the log grid."""
    from sinkquant.format.primitives import snap_log_scale, unpack_bits

    torch.manual_seed(0)
    w, b = torch.randn(64, 300), torch.randn(64)
    idx = [3, 70, 250]
    log = SinkQuantLinear.from_float(w, b, 4, 32, idx, symmetric, log_scales=True)
    assert "weight_scale" not in dict(log.named_buffers())
    assert log.weight_scale_code.dtype == torch.uint8 and log.weight_scale_top.shape == (1,)
    scale = log.group_scale()
    assert torch.equal(snap_log_scale(scale.float()), scale)
    plain = SinkQuantLinear.from_float(
        w, b, 4, 32, idx, symmetric, codes=unpack_bits(log.weight, 4, log.in_kept), scale=scale,
        minimum=log.group_minimum(),
    )  # fmt: skip
    groups = log.weight_scale_code.numel()
    assert plain.nbytes() - log.nbytes() == groups - 4  # a byte per group less, plus the int32 exponent
    assert torch.equal(log.dequantized_weight(), plain.dequantized_weight())
    for rows in (1, 5, 80):
        x = torch.randn(rows, 300).to(torch.bfloat16)
        assert torch.equal(log(x), plain(x)), rows
        with use_kernels(False):
            assert torch.equal(log(x), plain(x)), rows


def test_a_log_scale_layer_keeps_groups_far_below_its_largest_scale():
    """A group 12 octaves below the layer's largest scale cannot be coded under its exponent: it is
    rounded again on the finest scale a byte holds, so it keeps its values to within one such step
    (its own rounding and that one's), and an all-zero group stays exactly zero."""
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    w[2, 32:64] *= 2.0**-12
    w[5, 64:96] = 0
    w[7, 0:32] *= 2.0**-9  # clamped too, but large enough to keep nonzero codes on the finest scale
    layer = SinkQuantLinear.from_float(w, None, 4, 32, [], True, log_scales=True)
    got = layer.dequantized_weight()
    finest = float(layer.group_scale()[2, 1])
    for row, cols in ((2, slice(32, 64)), (7, slice(0, 32))):
        assert int(layer.weight_scale_code[row, cols.start // 32]) == 255
        # rounded twice: on its own (finer) scale, then on the finest stored one: under one finest step
        assert float((got[row, cols] - w[row, cols]).abs().max()) <= finest + 1e-9
    assert int((got[7, 0:32] != 0).sum()) >= 8  # requantized, not zeroed
    assert torch.equal(got[5, 64:96], torch.zeros(32))
    fine = torch.ones(16, 4, dtype=torch.bool)
    fine[2, 1] = fine[5, 2] = fine[7, 0] = False
    assert float(((got - w).view(16, 4, 32).abs().amax(-1) / layer.group_scale().float())[fine].max()) <= 1.01


def test_a_log_scale_layer_refuses_scales_off_its_grid():
    w = torch.randn(8, 64)
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    scale = torch.full((8, 2), 0.013, dtype=torch.bfloat16)  # bf16 0.013000, between 0.01294 and 0.01312
    with pytest.raises(ValueError, match="log grid"):
        SinkQuantLinear.from_float(w, None, 4, 32, [], True, codes=codes, scale=scale, log_scales=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_log_scale_layer_quantizes_and_decodes_on_cuda_as_on_cpu():
    """The log grid's tables live on the CPU; a layer quantized from a GPU weight (`--device cuda`)
    must read them there and store the same bytes as on the CPU."""
    torch.manual_seed(0)
    w = torch.randn(64, 300)
    cpu = SinkQuantLinear.from_float(w, None, 4, 32, [3, 70], True, log_scales=True)
    gpu = SinkQuantLinear.from_float(w.cuda(), None, 4, 32, [3, 70], True, log_scales=True)
    for name, buffer in cpu.named_buffers():
        assert torch.equal(getattr(gpu, name).cpu(), buffer), name
    assert torch.equal(gpu.dequantized_weight().cpu(), cpu.dequantized_weight())
