"""`Int8PerChannel` (bits 8): symmetric int8, one scale per output channel, and its PyTorch kernel
(`torch._weight_int8pack_mm`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..primitives import dequantize_int8_per_channel, quantize_int8_per_channel
from .base import PytorchKernel, Stored, WeightScheme, register_scheme


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
