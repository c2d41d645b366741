import pytest
import torch

from sinkquant.quantize.primitives import (
    complement_indices,
    dequantize_grouped,
    dequantize_int8_per_channel,
    pack_bits,
    quantize_grouped,
    quantize_int8_per_channel,
    unpack_bits,
)


def sqnr_db(ref, approx):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean()))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 129])
def test_pack_unpack_identity(bits, n):
    codes = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_int8_per_channel_sqnr():
    w = torch.randn(64, 96)
    q, s = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and sqnr_db(w, dequantize_int8_per_channel(q, s)) > 38


# 2-bit min/max on Gaussian data lands near 6 dB (5.7-6.6 over 200 seeds), so its floor sits below that
@pytest.mark.parametrize("bits, floor", [(8, 40), (4, 18), (2, 5)])
def test_grouped_sqnr_and_short_last_group(bits, floor):
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))  # 4 * 128 + 64: a shorter last group
    codes, scale, minimum = quantize_grouped(x, bits, 128)
    assert scale.shape == (8, 5) and int(codes.max()) < 2**bits
    assert sqnr_db(x, dequantize_grouped(codes, scale, minimum, 128)) > floor


def test_short_last_group_uses_only_its_own_values():
    x = torch.zeros(1, 130)
    x[0, 128:] = torch.tensor([10.0, 12.0])
    codes, scale, minimum = quantize_grouped(x, 4, 128)
    assert torch.allclose(dequantize_grouped(codes, scale, minimum, 128)[0, 128:], torch.tensor([10.0, 12.0]))


def test_constant_and_zero_groups_are_exact():
    x = torch.cat([torch.zeros(1, 64), torch.full((1, 64), 3.5)], dim=1)
    codes, scale, minimum = quantize_grouped(x, 4, 64)
    assert torch.equal(dequantize_grouped(codes, scale, minimum, 64), x)


def test_symmetric_uses_the_same_storage():
    x = torch.randn(4, 256)
    codes, scale, minimum = quantize_grouped(x, 4, 64, symmetric=True)
    assert torch.allclose(minimum, -8 * scale)
    assert sqnr_db(x, dequantize_grouped(codes, scale, minimum, 64)) > 15


def test_clip_search_never_increases_the_weighted_error():
    from sinkquant.quantize.primitives import quantize_grouped_clipped

    torch.manual_seed(0)
    x = torch.randn(64, 300) * torch.linspace(0.1, 3, 300)
    importance = torch.rand(300) ** 4
    plain = dequantize_grouped(*quantize_grouped(x, 4, 128), 128)
    clipped = dequantize_grouped(*quantize_grouped_clipped(x, 4, 128, importance), 128)
    weighted = lambda d: float(((x - d) ** 2 * importance).sum())  # noqa: E731
    assert weighted(clipped) < weighted(plain)


def test_complement_indices_are_the_other_columns_ascending():
    kept = complement_indices(torch.tensor([7, 0, 3], dtype=torch.int32), 9)
    assert kept.dtype == torch.long and kept.tolist() == [1, 2, 4, 5, 6, 8]
    assert complement_indices(torch.tensor([], dtype=torch.long), 3).tolist() == [0, 1, 2]
