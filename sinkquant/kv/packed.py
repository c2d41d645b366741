"""`PackedTokens`: quantized key or value states really packed into bytes, appended and dropped in
whole groups of tokens.

Shapes: states [batch, kv_heads, tokens, head_dim]; codes are uint8 (bits 2, 4 or 8) and scales and
minimums fp16 (float32 once a stored value could overflow fp16). All math is `format/primitives.py`'s;
on CPU, unpacking and dequantizing is one call into sinkquant's compiled kernels, with the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..format.primitives import dequantize_grouped, pack_bits, packed_size, quantize_grouped, unpack_bits
from ..kernels import fused_kernels

_FP16_SAFE = 30000.0  # parameters go to float32 once a stored value could overflow float16


def neutralize(x: torch.Tensor, exclude: torch.Tensor, group: int) -> torch.Tensor:
    """Replace excluded tokens by the mean of the other tokens of their group, so they leave the group's
    range alone. x [B, H, N, D] with N a multiple of `group`; exclude bool [B, N]. A group with no
    included token (all padding) becomes zeros."""
    if not bool(exclude.any()):
        return x
    b, h, n, d = x.shape
    keep = (~exclude).to(x.dtype).view(b, 1, n // group, group, 1)
    g = x.reshape(b, h, n // group, group, d)
    mean = (g * keep).sum(dim=3, keepdim=True) / keep.sum(dim=3, keepdim=True).clamp(min=1)
    return torch.where(keep.bool(), g, mean).reshape(b, h, n, d)


class PackedTokens:
    """Quantized states [B, H, N, D], appended and dropped from the front in whole groups of tokens.

    per_channel (keys, KIVI style): each channel of each run of `group_size` tokens shares a scale and a
    minimum; codes are stored [B, H, D, N * bits / 8] and parameters [B, H, D, N / group_size].
    per token (values, or keys by token): each token's head_dim is split into groups of `group_size`
    channels (the whole head_dim when larger); codes [B, H, N, ceil(D * bits / 8)], parameters
    [B, H, N, ceil(D / group_size)].
    """

    def __init__(self, bits: int, group_size: int, symmetric: bool, per_channel: bool) -> None:
        self.bits, self.group_size, self.symmetric, self.per_channel = (
            bits,
            group_size,
            symmetric,
            per_channel,
        )
        self.codes: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.minimum: torch.Tensor | None = None
        self.length = 0
        self.dim = 0
        self.param_dtype = torch.float16

    @property
    def _axis(self) -> int:
        return -1 if self.per_channel else -2

    def append(self, x: torch.Tensor) -> None:
        """x [B, H, n, D] float; with per_channel, n must be a multiple of group_size."""
        if x.shape[-2] == 0:
            return
        if self.param_dtype == torch.float16 and float(x.abs().amax()) > _FP16_SAFE:
            self.param_dtype = torch.float32
            if self.scale is not None:
                self.scale, self.minimum = self.scale.float(), self.minimum.float()
        self.dim = x.shape[-1]
        if self.per_channel:
            codes, scale, minimum = quantize_grouped(
                x.transpose(-1, -2), self.bits, self.group_size, self.symmetric, self.param_dtype
            )
        else:
            group = min(self.group_size, self.dim)
            codes, scale, minimum = quantize_grouped(x, self.bits, group, self.symmetric, self.param_dtype)
        packed = pack_bits(codes, self.bits)
        if self.codes is None:
            self.codes, self.scale, self.minimum = packed, scale, minimum
        else:
            self.codes = torch.cat([self.codes, packed], dim=self._axis)
            self.scale = torch.cat([self.scale, scale.to(self.scale.dtype)], dim=self._axis)
            self.minimum = torch.cat([self.minimum, minimum.to(self.minimum.dtype)], dim=self._axis)
        self.length += x.shape[-2]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor | None:
        """-> [B, H, N, D] in `dtype`, or None when empty."""
        if self.codes is None or self.length == 0:
            return None
        kernels = fused_kernels() if dtype in (torch.float32, torch.bfloat16) else None
        if kernels is not None and self.codes.device.type == "cpu":  # one call, the same numbers
            n = self.length if self.per_channel else self.dim
            group = self.group_size if self.per_channel else min(self.group_size, self.dim)
            out = kernels.unpack_dequantize(
                self.codes, self.scale, self.minimum, self.bits, n, group, dtype == torch.bfloat16
            )
            return out.transpose(-1, -2) if self.per_channel else out
        if self.per_channel:
            codes = unpack_bits(self.codes, self.bits, self.length)
            return (
                dequantize_grouped(codes, self.scale, self.minimum, self.group_size)
                .transpose(-1, -2)
                .to(dtype)
            )
        codes = unpack_bits(self.codes, self.bits, self.dim)
        return dequantize_grouped(codes, self.scale, self.minimum, min(self.group_size, self.dim)).to(dtype)

    def drop_front(self, n: int) -> None:
        """Forget the oldest n tokens (a multiple of group_size with per_channel)."""
        if n <= 0 or self.codes is None:
            return
        if self.per_channel:
            self.codes = self.codes[..., packed_size(n, self.bits) :]
            self.scale = self.scale[..., n // self.group_size :]
            self.minimum = self.minimum[..., n // self.group_size :]
        else:
            self.codes, self.scale, self.minimum = (
                t[:, :, n:] for t in (self.codes, self.scale, self.minimum)
            )
        self.length -= n

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.codes is not None:
            self.codes, self.scale, self.minimum = fn(self.codes), fn(self.scale), fn(self.minimum)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of packed codes, bytes of scales and minimums)."""
        if self.codes is None:
            return 0, 0
        params = (
            self.scale.numel() * self.scale.element_size()
            + self.minimum.numel() * self.minimum.element_size()
        )
        return self.codes.numel() * self.codes.element_size(), params
