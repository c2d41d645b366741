"""`Int4Grouped` (bits 4): min/max in groups of consecutive kept columns, codes packed two to a byte
(symmetric layers store no minima, log-scale layers one byte per scale), and its PyTorch kernel
(`torch._weight_int4pack_mm_for_cpu`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..features.grid import expand_codes
from ..primitives import (
    LOG_SCALE_CODES,
    decode_log_scales,
    dequantize_grouped,
    encode_log_scales,
    log_scale_value,
    pack_bits,
    per_column,
    quantize_grouped,
    quantize_grouped_clipped,
    round_grouped,
    unpack_bits,
)
from .base import PytorchKernel, Stored, WeightScheme, register_scheme

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
