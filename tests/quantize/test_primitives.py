import math

import pytest
import torch

from sinkquant.format.primitives import (
    LOG_SCALE_CODES,
    complement_indices,
    decode_log_scales,
    dequantize_grouped,
    dequantize_int8_per_channel,
    encode_log_scales,
    log_scale_exponent,
    log_scale_value,
    pack_bits,
    quantize_grouped,
    quantize_int8_per_channel,
    snap_log_scale,
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
    from sinkquant.format.primitives import quantize_grouped_clipped

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


def test_log_scales_snap_to_the_nearest_grid_point_and_survive_a_round_trip():
    """A scale goes to the grid point 2^(e/32) nearest to it in the log domain (within half a step plus
    bf16's rounding of the point), and a snapped scale encodes back to the same exponent, so storing
    a snapped scale as its byte loses nothing."""
    scale = torch.exp2(torch.empty(4000).uniform_(-30, 12, generator=torch.Generator().manual_seed(0)))
    exponent = log_scale_exponent(scale)
    snapped = log_scale_value(exponent)
    assert snapped.dtype == torch.bfloat16
    steps = (snapped.double() / scale.double()).log2() * 32
    bf16_rounding = 32 * math.log2(1 + 2**-8)  # bf16 moves a value by at most 2^-8 of it, in steps
    assert float(steps.abs().max()) <= 0.5 + bf16_rounding
    for neighbour in (exponent - 1, exponent + 1):  # no other point is nearer (beyond bf16's rounding)
        other = (log_scale_value(neighbour).double() / scale.double()).log2().abs() * 32
        assert bool((other >= steps.abs() - 2 * bf16_rounding).all())
    assert torch.equal(log_scale_exponent(snapped), exponent)
    assert torch.equal(snap_log_scale(snapped.float()), snapped)


def test_log_scale_codes_decode_to_the_scales_below_the_relevant_top():
    """The layer's exponent is the largest among groups whose values depend on their scale; a group
    more than 255 steps below it is reported as clamped, and an irrelevant group takes code 0."""
    exponent = torch.tensor([[-40, -41, -100], [-300, 0, -60]], dtype=torch.int32)
    relevant = torch.tensor([[True, True, True], [True, False, True]])
    code, top, clamped = encode_log_scales(log_scale_value(exponent), relevant)
    assert code.dtype == torch.uint8 and top.tolist() == [-40]
    assert clamped.tolist() == [[False, False, False], [True, False, False]]
    assert code.tolist() == [[0, 1, 60], [LOG_SCALE_CODES - 1, 0, 20]]
    decoded = decode_log_scales(code, top)
    fine = relevant & ~clamped
    assert torch.equal(decoded[fine], log_scale_value(exponent)[fine])


def test_log_scales_need_bf16_parameters():
    with pytest.raises(ValueError, match="bf16"):
        quantize_grouped(torch.randn(2, 64), 4, 32, log_scales=True)
