"""PackedTokens: codes really packed into bytes, and the compiled unpack + dequantize equal to the torch ops."""

from __future__ import annotations

import pytest
import torch

from sinkquant.kv.packed import PackedTokens


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_packed_tokens_hold_packed_bytes(bits, per_channel):
    x = torch.randn(2, 3, 32, 16)
    store = PackedTokens(bits, 8, False, per_channel)
    store.append(x[:, :, :16])
    store.append(x[:, :, 16:])
    codes, params = store.nbytes()
    assert store.codes.dtype == torch.uint8 and codes == 2 * 3 * 32 * 16 * bits // 8
    groups = 16 * (32 // 8) if per_channel else 32 * (16 // 8)
    assert params == 2 * (2 * 3 * groups) * 2  # scale + minimum, float16
    step = (x.max() - x.min()) / (2**bits - 1)
    assert (store.dequantize(torch.float32) - x).abs().max() <= step / 2 * 1.01 + 1e-3
    store.drop_front(8)
    assert store.length == 24
    assert (store.dequantize(torch.float32) - x[:, :, 8:]).abs().max() <= step / 2 * 1.01 + 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32])
def test_compiled_kv_dequantization_equals_the_torch_ops(bits, per_channel, param_dtype, monkeypatch):
    """The one-call C++ unpack + dequantize gives the torch ops' numbers bit for bit, strides included
    (after a front drop too)."""
    from sinkquant.kernels import fused_kernels
    from sinkquant.kv import packed

    if fused_kernels() is None:
        pytest.skip("sinkquant's CPU kernels cannot be built here (needs AVX2, a C++ compiler and ninja)")
    torch.manual_seed(0)
    store = packed.PackedTokens(bits, 32 if per_channel else 48, False, per_channel)
    store.param_dtype = param_dtype
    for _ in range(3):
        store.append(torch.randn(2, 3, 64, 40) * 3)
    store.drop_front(32 if per_channel else 5)
    for dtype in (torch.float32, torch.bfloat16):
        fast = store.dequantize(dtype)
        with monkeypatch.context() as patch:
            patch.setattr(packed, "fused_kernels", lambda: None)
            slow = store.dequantize(dtype)
        assert torch.equal(fast, slow) and fast.stride() == slow.stride() and fast.dtype == dtype
