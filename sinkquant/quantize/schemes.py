"""Weight schemes: how a `SinkQuantLinear` computes with its kept columns as integers, one registry
entry each.

A scheme is stateless. It supplies the quantization (round-to-nearest, or integers chosen elsewhere,
e.g. by GPTQ), what its buffers hold (`buffers`, `read`; their names, shapes and dtypes are the layer
format's, `sinkquant.format.LayerSpec`), the dequantization, and what PyTorch's integer CPU kernel and
sinkquant's fused kernel need. The layer owns the buffers, the outlier columns and the bias, and picks
the forward path.

Registered schemes:

* `Int8PerChannel` (bits 8): symmetric int8, one scale per output channel.
* `Int4Grouped` (bits 4): min/max in groups of `group_size` consecutive kept columns (the last may be
  shorter), codes packed two to a byte, low nibble first. A symmetric layer's minimum is always
  -8 * scale (exact in bf16), so it stores none. A layer with log scales stores each scale as one byte on
  a grid of 1/32 octave below one exponent per layer (`primitives.encode_log_scales`); everything past
  storage sees the decoded bf16 scales (`read`), so the kernels, the dequantization and the exports are
  the same for both.

`SCHEMES` is keyed by bits because bits alone name a storage format everywhere else: the recipe's
`weights.bits`, the checkpoint's layer spec and `SinkQuantLinear(bits=...)`. A second scheme at the same
bit width would need a name in all three first.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from .grid import expand_codes
from .primitives import (
    LOG_SCALE_CODES,
    decode_log_scales,
    dequantize_grouped,
    dequantize_int8_per_channel,
    encode_log_scales,
    log_scale_value,
    pack_bits,
    per_column,
    quantize_grouped,
    quantize_grouped_clipped,
    quantize_int8_per_channel,
    round_grouped,
    unpack_bits,
)


class Stored(NamedTuple):
    """The integer part as the buffers hold it (`weight`, `weight_scale`, `weight_min`)."""

    weight: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None = None
    levels: torch.Tensor | None = None  # int4 on a non-uniform grid: what each code stands for (grid.py)


class PytorchKernel(ABC):
    """PyTorch's integer kernel with one layer's weights in the kernel's layout, built once per layer."""

    __slots__ = ()
    #: columns of the activation `matmul` takes (the kept columns as the kernel orders and pads them)
    width: int

    @abstractmethod
    def matmul(self, act: torch.Tensor) -> torch.Tensor:
        """The bare kernel: act [rows, width] bf16, already in the kernel's column order -> [rows, out]."""

    @abstractmethod
    def __call__(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x2 [rows, in] -> (y [rows, out] bf16, x2's outlier columns where the kernel's gather has them
        in x2's dtype already, else None)."""


class WeightScheme(ABC):
    """One storage format for the kept columns; see the module docstring."""

    bits: ClassVar[int]
    name: ClassVar[str]

    @abstractmethod
    def group_size(self, kept: int, requested: int | None) -> int:
        """The group size the layer stores for `kept` columns when `requested` was asked for."""

    @abstractmethod
    def quantize(
        self,
        weight: torch.Tensor,
        group_size: int,
        *,
        symmetric: bool = False,
        importance: torch.Tensor | None = None,
        clip_search: bool = False,
        log_scales: bool = False,
    ) -> Stored:
        """Round-to-nearest of weight [out, kept] float32; `importance` [kept] weighs a clip search."""

    def buffers(
        self, stored: Stored, kept: int, group_size: int, symmetric: bool = False, log_scales: bool = False
    ) -> dict[str, torch.Tensor]:
        """What the layer's buffers (`storage`'s names) hold for `stored`."""
        buffers = {"weight": stored.weight, "weight_scale": stored.scale}
        if stored.minimum is not None and not symmetric:
            buffers["weight_min"] = stored.minimum
        return buffers

    def read(self, buffers: Mapping[str, torch.Tensor | None]) -> Stored:
        """The integer part from the layer's buffers (the inverse of `buffers`)."""
        return Stored(buffers["weight"], buffers["weight_scale"], buffers.get("weight_min"))

    @abstractmethod
    def store(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> Stored:
        """Integers chosen elsewhere (GPTQ), in the format `quantize` returns them before storage."""

    # -- one group at a time, for GPTQ (it fits each group's range when the sweep reaches it) ----------
    #: dtypes of one group's scale and of the codes `store` takes
    scale_dtype: ClassVar[torch.dtype]
    code_dtype: ClassVar[torch.dtype]

    @abstractmethod
    def group_range(
        self, values: torch.Tensor, symmetric: bool, log_scales: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale [out], minimum [out] or None) of one group from its weights [out, n], by `quantize`'s
        formulas (so what GPTQ stores is what round-to-nearest would store for the same weights)."""

    @abstractmethod
    def round_to_range(
        self, values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """values [out] or [out, n] on one group's grid -> (codes as float32, dequantized float32)."""

    @abstractmethod
    def group_params(
        self, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-group scale (and minimum) [out, groups] as `store` takes them."""

    def minimum(self, stored: Stored) -> torch.Tensor | None:
        """Each group's minimum as stored, or None for a scheme without minima."""
        return stored.minimum

    @abstractmethod
    def dequantize(self, stored: Stored, kept: int, group_size: int) -> torch.Tensor:
        """float32 [out, kept]: the integer part as real numbers."""

    @abstractmethod
    def fused_args(self, stored: Stored, kept: int) -> tuple:
        """(bits, codes, scale, minimum): the scheme's part of what `kernels.bind_layer` takes."""

    @abstractmethod
    def kernel_available(self) -> bool:
        """Whether this torch build has the scheme's PyTorch CPU kernel."""

    @abstractmethod
    def kernel_applies(self, act_dtype: torch.dtype, out_features: int, group_size: int) -> bool:
        """Whether the PyTorch kernel serves activations of `act_dtype` at this shape."""

    @abstractmethod
    def fallback_rounds_to_bf16(self, act_dtype: torch.dtype) -> bool:
        """Whether the dequantizing fallback rounds activations to bf16 first, as the kernel would for
        `act_dtype`, so that switching the kernels off keeps the activation precision."""

    @abstractmethod
    def pytorch_kernel(
        self,
        stored: Stored,
        keep: torch.Tensor,
        outlier_idx: torch.Tensor,
        in_features: int,
        group_size: int,
    ) -> PytorchKernel:
        """The PyTorch kernel bound to these weights; `keep` [kept] and `outlier_idx` say where the
        kept and the outlier columns sit in an input row of `in_features`."""


#: bits -> the scheme that stores them
SCHEMES: dict[int, WeightScheme] = {}
_S = TypeVar("_S", bound=type[WeightScheme])


def register_scheme(cls: _S) -> _S:
    """Class decorator: put one instance of `cls` in `SCHEMES` under `cls.bits`."""
    if cls.bits in SCHEMES:
        raise ValueError(f"bits {cls.bits} already has a weight scheme ({SCHEMES[cls.bits].name})")
    SCHEMES[cls.bits] = cls()
    return cls


def scheme_for(bits: int) -> WeightScheme:
    """The scheme registered for `bits`; a clear ValueError for any other value."""
    scheme = SCHEMES.get(bits)
    if scheme is None:
        known = ", ".join(str(b) for b in sorted(SCHEMES))
        raise ValueError(f"SinkQuantLinear has no weight scheme for {bits!r} bits (it supports {known})")
    return scheme


@register_scheme
class Int8PerChannel(WeightScheme):
    bits = 8
    name = "int8 per output channel"

    def group_size(self, kept: int, requested: int | None) -> int:
        return kept  # one scale per row: the group is the whole row

    def quantize(
        self,
        weight: torch.Tensor,
        group_size: int,
        *,
        symmetric: bool = False,
        importance: torch.Tensor | None = None,
        clip_search: bool = False,
        log_scales: bool = False,
    ) -> Stored:
        return self.store(*quantize_int8_per_channel(weight), None)  # always symmetric, no search

    def store(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> Stored:
        return Stored(codes, scale, None)

    scale_dtype = torch.float32
    code_dtype = torch.int8

    def group_range(
        self, values: torch.Tensor, symmetric: bool, log_scales: bool = False
    ) -> tuple[torch.Tensor, None]:
        return quantize_int8_per_channel(values)[1], None

    def round_to_range(
        self, values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = scale.float()[:, None] if values.dim() == 2 else scale.float()
        code = torch.round(values / s).clamp_(-127, 127)
        return code, code * s

    def group_params(self, scale: torch.Tensor, minimum: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return scale[:, 0], None  # the one group is the row

    def dequantize(self, stored: Stored, kept: int, group_size: int) -> torch.Tensor:
        return dequantize_int8_per_channel(stored.weight, stored.scale)

    def fused_args(self, stored: Stored, kept: int) -> tuple:
        return (self.bits, stored.weight, stored.scale, None)

    def kernel_available(self) -> bool:
        return hasattr(torch.ops.aten, "_weight_int8pack_mm")

    def kernel_applies(self, act_dtype: torch.dtype, out_features: int, group_size: int) -> bool:
        # bf16 only: for float32 activations the kernel's float32 variant is far slower on CPU than a
        # float32 matmul of the dequantized weight, which gives the same numbers
        return act_dtype == torch.bfloat16

    def fallback_rounds_to_bf16(self, act_dtype: torch.dtype) -> bool:
        return act_dtype == torch.bfloat16

    def pytorch_kernel(
        self,
        stored: Stored,
        keep: torch.Tensor,
        outlier_idx: torch.Tensor,
        in_features: int,
        group_size: int,
    ) -> PytorchKernel:
        return _Int8PackKernel(stored, keep, in_features)


class _Int8PackKernel(PytorchKernel):
    """`torch._weight_int8pack_mm` on the int8 weight spread back to the layer's full input width: zero
    codes at the outlier columns, then zero columns up to a multiple of 16 inputs, because torch 2.13's
    AVX2 kernel reads K in blocks of 16 and reads past a row of any other width. A zero code adds
    exactly nothing, so the kernel takes the input row as it is: no gather and no padding of
    activations per call. In memory only (the checkpoint keeps [out, kept]); scales in bf16."""

    __slots__ = ("weight", "scale", "width", "pad")

    def __init__(self, stored: Stored, keep: torch.Tensor, in_features: int) -> None:
        self.width = math.ceil(in_features / 16) * 16
        self.pad = self.width - in_features
        out_features = stored.weight.shape[0]
        self.weight = torch.zeros(out_features, self.width, dtype=torch.int8, device=stored.weight.device)
        self.weight[:, keep] = stored.weight
        self.scale = stored.scale.to(torch.bfloat16)

    def matmul(self, act: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(act, self.weight, self.scale)

    def __call__(self, x2: torch.Tensor) -> tuple[torch.Tensor, None]:
        act = F.pad(x2, (0, self.pad)) if self.pad else x2
        return self.matmul(act.contiguous()), None


#: the group sizes torch's int4 CPU kernel takes
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)


@register_scheme
class Int4Grouped(WeightScheme):
    bits = 4
    name = "int4 in groups"

    def group_size(self, kept: int, requested: int | None) -> int:
        return kept if requested is None else requested

    #: a symmetric group's minimum is this many scales below zero (its codes 0..15 are -8..7 steps)
    SYMMETRIC_OFFSET = 8

    def minimum(self, stored: Stored) -> torch.Tensor:
        """Each group's minimum [out, groups] bf16: stored, or -8 * scale for a symmetric layer."""
        if stored.minimum is not None:
            return stored.minimum
        return (-self.SYMMETRIC_OFFSET * stored.scale.float()).to(stored.scale.dtype)

    def quantize(
        self,
        weight: torch.Tensor,
        group_size: int,
        *,
        symmetric: bool = False,
        importance: torch.Tensor | None = None,
        clip_search: bool = False,
        log_scales: bool = False,
    ) -> Stored:
        if clip_search:
            found = quantize_grouped_clipped(
                weight, 4, group_size, importance, symmetric=symmetric, param_dtype=torch.bfloat16,
                log_scales=log_scales,
            )  # fmt: skip
        else:
            found = quantize_grouped(weight, 4, group_size, symmetric, torch.bfloat16, log_scales)
        return self.store(*found)

    def buffers(
        self, stored: Stored, kept: int, group_size: int, symmetric: bool = False, log_scales: bool = False
    ) -> dict[str, torch.Tensor]:
        if not log_scales:
            return super().buffers(stored, kept, group_size, symmetric)
        codes = unpack_bits(stored.weight, 4, kept)
        # the code whose value is the same under any scale: a group holding only it needs none
        zero_code = self.SYMMETRIC_OFFSET if symmetric else 0
        groups = stored.scale.shape[1]
        grouped = F.pad(codes, (0, groups * group_size - kept), value=zero_code)
        relevant = grouped.view(codes.shape[0], groups, group_size).ne(zero_code).any(-1)
        scale_code, top, clamped = encode_log_scales(stored.scale, relevant)
        if bool(clamped.any()):
            # a group more than 8 octaves below the layer's largest scale: its values (tiny next to the
            # layer's others) are rounded again on the finest scale the byte holds (from their first
            # rounding: the error stays under one finest step)
            minimum = self.minimum(stored).float()
            values = dequantize_grouped(codes, stored.scale, minimum, group_size)
            floor_scale = log_scale_value(top.long() - (LOG_SCALE_CODES - 1)).float()
            new_min = -self.SYMMETRIC_OFFSET * floor_scale if symmetric else minimum
            new_min = torch.where(clamped, new_min, minimum)
            new_scale = torch.where(clamped, floor_scale, stored.scale.float())
            again = round_grouped(values, new_scale, new_min, group_size, 4)
            codes = torch.where(per_column(clamped, group_size, kept), again, codes)
        buffers = {"weight": pack_bits(codes, 4), "weight_scale_code": scale_code, "weight_scale_top": top}
        if not symmetric:
            buffers["weight_min"] = stored.minimum
        return buffers

    def read(self, buffers: Mapping[str, torch.Tensor | None]) -> Stored:
        if buffers.get("weight_scale_code") is None:
            return super().read(buffers)._replace(levels=buffers.get("weight_levels"))
        scale = decode_log_scales(buffers["weight_scale_code"], buffers["weight_scale_top"])
        return Stored(buffers["weight"], scale, buffers.get("weight_min"), buffers.get("weight_levels"))

    def store(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> Stored:
        return Stored(pack_bits(codes, 4), scale, minimum)

    scale_dtype = torch.bfloat16
    code_dtype = torch.uint8

    def group_range(
        self, values: torch.Tensor, symmetric: bool, log_scales: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, scale, minimum = quantize_grouped(
            values, 4, values.shape[1], symmetric, torch.bfloat16, log_scales
        )
        return scale[:, 0], minimum[:, 0]

    def round_to_range(
        self, values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, m = (t.float()[:, None] if values.dim() == 2 else t.float() for t in (scale, minimum))
        code = torch.round((values - m) / s).clamp_(0, 15)
        return code, code * s + m

    def group_params(
        self, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return scale, minimum

    def dequantize(self, stored: Stored, kept: int, group_size: int) -> torch.Tensor:
        codes = unpack_bits(stored.weight, 4, kept)
        values = codes if stored.levels is None else expand_codes(codes, stored.levels)
        return dequantize_grouped(values, stored.scale, self.minimum(stored), group_size)

    def fused_args(self, stored: Stored, kept: int) -> tuple:
        return (self.bits, unpack_bits(stored.weight, 4, kept), stored.scale, self.minimum(stored))

    def kernel_available(self) -> bool:
        ops = torch.ops.aten
        return all(
            hasattr(ops, op) for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
        )

    def kernel_applies(self, act_dtype: torch.dtype, out_features: int, group_size: int) -> bool:
        # any activation dtype (they go through bf16 either way); the kernel packs the weight in
        # blocks of 16 output rows and takes only the group sizes in _INT4_KERNEL_GROUPS
        return group_size in _INT4_KERNEL_GROUPS and out_features % 16 == 0

    def fallback_rounds_to_bf16(self, act_dtype: torch.dtype) -> bool:
        return True

    def pytorch_kernel(
        self,
        stored: Stored,
        keep: torch.Tensor,
        outlier_idx: torch.Tensor,
        in_features: int,
        group_size: int,
    ) -> PytorchKernel:
        stored = stored._replace(minimum=self.minimum(stored))  # a symmetric layer's, from its scales
        return _Int4PackKernel(stored, keep, outlier_idx, in_features, group_size)


class _Int4PackKernel(PytorchKernel):
    """`torch._weight_int4pack_mm_for_cpu` (bf16 activations, w = (q - 8) * scale + zero per group) on
    the codes padded to whole groups, with one gather index for the activations."""

    __slots__ = ("packed", "scales_zeros", "group_size", "width", "index", "append_zero", "zero")

    def __init__(
        self, stored: Stored, keep: torch.Tensor, outlier_idx: torch.Tensor, in_features: int, group_size: int
    ) -> None:
        kept = keep.numel()
        padded = math.ceil(kept / group_size) * group_size
        codes = unpack_bits(stored.weight, 4, kept).to(torch.int32)
        # a constant group (all codes 0, guard scale 1) is its minimum: with scale 0 and zero = min it
        # stays exact, where min + 8 * 1 rounded to the kernel's bf16 would lose the minimum
        constant = F.pad(codes, (0, padded - kept)).view(codes.shape[0], -1, group_size).amax(-1) == 0
        if padded != kept:
            codes = F.pad(codes, (0, padded - kept), value=8)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
        scale = stored.scale.float().masked_fill(constant, 0.0)
        zero = stored.minimum.float() + 8 * scale
        self.scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.group_size, self.width = group_size, padded
        # one index that takes, from an input row with a 0 appended, the kept columns, then the padding
        # to whole groups (the appended 0: a padded position meets its group's zero point, so its
        # activation must be exactly 0), then the outlier columns: one index_select per call
        n_pad = padded - kept
        index = torch.cat([keep, torch.full((n_pad,), in_features, dtype=torch.long), outlier_idx.long()])
        identity = n_pad == 0 and outlier_idx.numel() == 0
        self.index = None if identity else index.to(stored.weight.device)
        self.append_zero = n_pad > 0
        self.zero = torch.zeros(1, 1, dtype=torch.bfloat16, device=stored.weight.device)

    def matmul(self, act: torch.Tensor) -> torch.Tensor:
        int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return int4_mm(act, self.packed, self.group_size, self.scales_zeros)

    def __call__(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        src = x2.to(torch.bfloat16)
        if self.append_zero:
            src = torch.cat((src, self.zero.expand(src.shape[0], 1)), dim=1)
        gathered = src if self.index is None else src.index_select(1, self.index)
        act = gathered[:, : self.width]  # a view already when there is one row (decode)
        y = self.matmul(act if act.is_contiguous() else act.contiguous())
        # the outlier inputs at their own precision: bf16 inputs have them in the gather already; others
        # must not lose digits of a massive activation to a bf16 round trip
        return y, (gathered[:, self.width :] if x2.dtype == torch.bfloat16 else None)
