"""Pure tensor math of quantization: parameters, quantize/dequantize, bit packing.

Nothing here sees a module or a config: tensors and ints in, tensors out, so every piece is testable
without a model. Two schemes cover weights and the KV cache:

* int8 per output channel, symmetric: `q` int8 in [-127, 127], `w ≈ q * scale[row]`.
* grouped min/max ("asymmetric"), b bits: along the last dim, consecutive groups of `group_size`
  values (the last group may be shorter) share a `scale` and a `minimum`; codes are unsigned in
  [0, 2^b - 1] and `x ≈ code * scale + minimum`. The symmetric variant is the same storage with
  `minimum = -2^(b-1) * scale`, so one dequantizer (and one kernel formula) serves both.

Log scales (`log_scales=True`, int4): each group's scale is snapped to the nearest point of a grid of
1/32 octave, 2^(e/32) rounded to bf16, so a layer can store it as one byte: the code `top - e` in
[0, 255] below one exponent `top` per layer (8 octaves; a trained layer's group scales span fewer).
The grid is decoded by a table and exact power-of-two shifts, and encoded by comparisons against
precomputed midpoints, so every CPU snaps and decodes the same scale to the same bits.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-12


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (q [out, in] int8, scale [out] float32); symmetric, max |w| -> 127."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [out, in] int8, scale [out]) -> float32 [out, in]."""
    return q.float() * scale.float()[:, None]


def complement_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The positions in [0, n) that are not in `idx`, ascending (long): the kept columns of a layer whose
    outlier columns are `idx`."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx.long()] = False
    return torch.nonzero(mask).flatten()


def num_groups(n: int, group_size: int) -> int:
    return math.ceil(n / group_size)


def _grouped_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., n] -> [..., groups, group_size]; a short last group is padded by repeating its last value
    (which changes neither its min nor its max)."""
    n = x.shape[-1]
    pad = num_groups(n, group_size) * group_size - n
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group_size)


#: points of the scale grid per octave (a log scale's relative step is 2^(1/32) - 1 = 2.2%)
LOG_SCALE_STEPS = 32
#: codes a log scale is stored in (one byte: 8 octaves below the layer's largest scale)
LOG_SCALE_CODES = 256
# 2^(i/32), i = 0..31, in float64 (the grid's mantissas), and the midpoints between neighbours in
# the log domain, 2^((i + 0.5)/32), i = 0..31, against which a scale's mantissa is compared
_LOG_MANTISSAS = torch.tensor(
    [2.0 ** (i / LOG_SCALE_STEPS) for i in range(LOG_SCALE_STEPS)], dtype=torch.float64
)
_LOG_MIDPOINTS = torch.tensor(
    [2.0 ** ((i + 0.5) / LOG_SCALE_STEPS) for i in range(LOG_SCALE_STEPS)], dtype=torch.float64
)


def log_scale_exponent(scale: torch.Tensor) -> torch.Tensor:
    """Positive scales -> int32 e with 2^(e/32) nearest to each in the log domain. Exact: frexp
    splits off the power of two, and the mantissa is compared with fixed midpoints (no log2, whose
    last bit may differ between CPUs' vector libraries)."""
    mantissa, exponent = torch.frexp(scale.double().clamp(min=_EPS))  # scale = mantissa * 2^exponent
    midpoints = _LOG_MIDPOINTS.to(mantissa.device)  # the tables live on the CPU; a GPU scale reads them
    step = torch.searchsorted(midpoints, (2 * mantissa).contiguous(), right=True)  # 0..32
    return ((exponent.long() - 1) * LOG_SCALE_STEPS + step).to(torch.int32)


def log_scale_value(exponent: torch.Tensor) -> torch.Tensor:
    """int e -> bf16 2^(e/32): a table mantissa shifted by an exact power of two, rounded once to bf16."""
    e = exponent.long()
    octave, step = torch.div(e, LOG_SCALE_STEPS, rounding_mode="floor"), e.remainder(LOG_SCALE_STEPS)
    return torch.ldexp(_LOG_MANTISSAS.to(e.device)[step], octave.double()).to(torch.bfloat16)


def snap_log_scale(scale: torch.Tensor) -> torch.Tensor:
    """Positive float scales -> bf16 scales on the log grid (the nearest point)."""
    return log_scale_value(log_scale_exponent(scale))


def encode_log_scales(
    scale: torch.Tensor, relevant: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 scales on the log grid [out, groups] -> (codes uint8 [out, groups], top int32 [1], clamped
    bool [out, groups]), with scale = 2^((top - code) / 32). `top` is the largest exponent among the
    `relevant` groups (a group whose codes all map to one value, e.g. a zero group, decodes the same
    under any scale and takes code 0). A relevant group more than 255 steps below `top` is clamped to
    code 255, a larger scale: the caller requantizes it."""
    exponent = log_scale_exponent(scale)
    if not bool(relevant.any()):
        top = torch.zeros(1, dtype=torch.int32)
        return torch.zeros(scale.shape, dtype=torch.uint8), top, torch.zeros(scale.shape, dtype=torch.bool)
    top = exponent[relevant].amax().reshape(1)
    code = (top - exponent).clamp(min=0)
    clamped = relevant & (code > LOG_SCALE_CODES - 1)
    code = torch.where(relevant, code.clamp(max=LOG_SCALE_CODES - 1), torch.zeros_like(code))
    return code.to(torch.uint8), top.to(torch.int32), clamped


def decode_log_scales(code: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(codes uint8 [out, groups], top int32 [1]) -> bf16 scales [out, groups]."""
    return log_scale_value(top.long() - code.long())


def quantize_grouped(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    param_dtype: torch.dtype = torch.float32,
    log_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize along the last dim in groups of `group_size` (last group may be shorter).

    x [..., n] float -> (codes [..., n] uint8 in [0, 2^bits-1], scale [..., g], minimum [..., g]) with
    g = ceil(n / group_size), parameters in `param_dtype`. Codes are computed against the parameters as
    stored (after rounding to `param_dtype`), so dequantizing reproduces exactly what was optimised.
    A constant group gets a zero-width guard: its scale is 1 and every code maps back to the constant.
    `log_scales`: each scale snapped to the log grid (bf16; see the module docstring).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8 (got {bits})")
    levels = 2**bits - 1
    g = _grouped_view(x.float(), group_size)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = g.abs().amax(dim=-1) / (half - 1)
        scale = _as_param(torch.where(scale > _EPS, scale, torch.ones_like(scale)), param_dtype, log_scales)
        minimum = (-half * scale.float()).to(param_dtype)
    else:
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        width = hi - lo
        scale = _as_param(
            torch.where(width > _EPS, width / levels, torch.ones_like(width)), param_dtype, log_scales
        )
        minimum = lo.to(param_dtype)
    codes = torch.round((g - minimum.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels)
    codes = codes.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]].to(torch.uint8)
    return codes, scale, minimum


def _as_param(scale: torch.Tensor, param_dtype: torch.dtype, log_scales: bool) -> torch.Tensor:
    if not log_scales:
        return scale.to(param_dtype)
    if param_dtype != torch.bfloat16:
        raise ValueError("log scales are bf16 values (param_dtype must be torch.bfloat16)")
    return snap_log_scale(scale)


def per_column(params: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """Per-group values [..., groups] -> the value of each of the n columns [..., n]."""
    return params.repeat_interleave(group_size, dim=-1)[..., :n]


def round_grouped(
    x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """Codes uint8 [..., n] of x [..., n] on given per-group grids [..., groups]; values beyond a
    grid clip to its ends."""
    n = x.shape[-1]
    s, m = (per_column(t.float(), group_size, n) for t in (scale, minimum))
    return torch.round((x.float() - m) / s).clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize_grouped(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of `quantize_grouped`: codes [..., n] -> float32 [..., n]."""
    n = codes.shape[-1]
    s, m = (per_column(t.float(), group_size, n) for t in (scale, minimum))
    return codes.float() * s + m


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [..., n] (uint8, each < 2^bits) into bytes [..., ceil(n * bits / 8)].

    bits 8: unchanged; bits 4: two codes a byte (low nibble first); bits 2: four a byte (lowest first).
    """
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits not in (2, 4):
        raise ValueError(f"can pack 2, 4 or 8 bits (got {bits})")
    per_byte = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per_byte
    c = codes.to(torch.uint8)
    if pad:
        c = torch.cat([c, c.new_zeros(*c.shape[:-1], pad)], dim=-1)
    c = c.reshape(*c.shape[:-1], -1, per_byte)
    packed = c[..., 0].clone()
    for i in range(1, per_byte):
        packed |= c[..., i] << (bits * i)
    return packed.contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: bytes [..., m] -> codes [..., n] uint8."""
    if bits == 8:
        return packed[..., :n]
    if bits not in (2, 4):
        raise ValueError(f"can unpack 2, 4 or 8 bits (got {bits})")
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def packed_size(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


_CLIP_BLOCK_ELEMENTS = 1 << 22  # weights per block of rows in the clipping search
#: range shrink factors the clipping search tries: 1.0 down to 0.6 in steps of 0.025. The search keeps
#: each group's least weighted error, so a finer, longer grid can only lower that error on any model
#: (AWQ's clip search likewise tries 20 steps down to half the range); it costs one requantization each
CLIP_RATIOS = tuple(round(1.0 - 0.025 * k, 3) for k in range(17))


def quantize_grouped_clipped(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    importance: torch.Tensor | None = None,
    ratios: tuple[float, ...] = CLIP_RATIOS,
    symmetric: bool = False,
    param_dtype: torch.dtype = torch.float32,
    log_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_grouped` with a per-group clipping search: each group's range is shrunk by each ratio
    in `ratios` (1.0 = plain min/max) and the ratio with the smallest error sum_j importance_j * (x_j -
    dequant_j)^2 is kept. `importance` [n] weighs input columns (e.g. mean x_j^2 from calibration), so
    the search trades error on rarely-active columns for precision where activations are large.

    x [..., n] -> (codes, scale, minimum) exactly as `quantize_grouped` returns them. Rows are
    independent, so a large x is searched a block of rows at a time (the same numbers; the search's
    temporaries are a few copies of one block, not of the whole weight)."""
    rows = max(1, _CLIP_BLOCK_ELEMENTS // max(1, x.shape[-1]))
    if x.dim() == 2 and x.shape[0] > rows:
        parts = [quantize_grouped_clipped(x[i : i + rows], bits, group_size, importance, ratios, symmetric,
                                          param_dtype, log_scales) for i in range(0, x.shape[0], rows)]  # fmt: skip
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))
    n = x.shape[-1]
    weight = torch.ones(n) if importance is None else importance.float().clamp(min=0)
    best = None
    for ratio in ratios:
        codes, scale, minimum = quantize_grouped(
            x * ratio, bits, group_size, symmetric, param_dtype, log_scales
        )
        # requantize the unscaled values against the shrunk grid (values beyond it are clipped)
        codes = round_grouped(x, scale, minimum, group_size, bits)
        err = (x.float() - dequantize_grouped(codes, scale, minimum, group_size)).pow(2) * weight
        pad = num_groups(n, group_size) * group_size - n
        err = torch.nn.functional.pad(err, (0, pad)).reshape(*err.shape[:-1], -1, group_size).sum(dim=-1)
        if best is None:
            best = [codes, scale, minimum, err]
            continue
        better = err < best[3]
        best[3] = torch.where(better, err, best[3])
        best[1] = torch.where(better, scale, best[1])
        best[2] = torch.where(better, minimum, best[2])
        best[0] = torch.where(per_column(better, group_size, n), codes, best[0])
    return best[0], best[1], best[2]
