"""Storage pieces of the sink-aware KV cache: packed quantized tokens and the per-token flags.

Nothing here sees a model. `PackedTokens` holds quantized key or value states `[batch, kv_heads, tokens,
head_dim]` as really packed uint8 codes plus fp16 scales/minimums (all math from `primitives.py`);
`TokenFlags` is the record, shared by every layer of one cache, of which tokens are real (not padding)
and which are sinks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import InputError
from ..kernels import fused_kernels
from .primitives import dequantize_grouped, pack_bits, packed_size, quantize_grouped, unpack_bits

if TYPE_CHECKING:
    from .kv_cache import KVCacheConfig

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


class TokenFlags:
    """Per-token facts shared by all layers of one cache, indexed by absolute token position.

    real [B, T]: not padding. sink [T] / leading [T]: the position is kept at full precision (union over
    the batch, so every row stores the same columns). Flags of positions below `known` are final: a
    layer may quantize only those. Leading sinks are counted from each row's first real token.
    """

    def __init__(self, leading_positions: Sequence[int], detecting: bool) -> None:
        self.leading_positions = sorted(set(int(p) for p in leading_positions))
        self.detecting = detecting
        self.real: torch.Tensor | None = None
        self.sink = torch.zeros(0, dtype=torch.bool)
        self.leading = torch.zeros(0, dtype=torch.bool)
        self.known = 0
        self.open: tuple[int, int] | None = None  # (start, length) of the chunk the running forward feeds

    @property
    def length(self) -> int:
        return self.sink.numel()

    def begin(self, batch: int, n: int, real: torch.Tensor | None, device: torch.device) -> None:
        """Register the next n tokens (real: bool [B, n], None for no padding) before a forward runs them."""
        self.known = self.length  # earlier chunks are final, even if a detection pass never ran
        real = (
            torch.ones(batch, n, dtype=torch.bool, device=device)
            if real is None
            else real.to(device, torch.bool)
        )
        if self.real is None:
            self.real = real[:, :0]
            self.sink, self.leading = self.sink.to(device), self.leading.to(device)
        count = self.real.sum(dim=1, keepdim=True)
        index = count + real.long().cumsum(dim=1) - 1  # each real token's rank among its row's real tokens
        wanted = torch.tensor(self.leading_positions, dtype=torch.long, device=device)
        leading = (real & torch.isin(index, wanted)).any(dim=0)
        self.open = (self.length, n)
        self.real = torch.cat([self.real, real], dim=1)
        self.leading = torch.cat([self.leading, leading])
        self.sink = torch.cat([self.sink, leading])
        if not self.detecting:
            self.known = self.length

    def detected(self, flags: torch.Tensor) -> None:
        """flags bool [B, n] from the detection hook, for the chunk opened by `begin`."""
        if self.open is None:
            return
        start, n = self.open
        if flags.shape[-1] == n:
            hit = (flags.to(self.sink.device) & self.real[:, start : start + n]).any(dim=0)
            self.sink[start : start + n] |= hit
        self.known = start + n

    def close(self) -> None:
        self.open = None

    def ensure(self, batch: int, total: int, device: torch.device) -> None:
        """Cover `total` tokens even when no hook registered them (a cache used without `attach`)."""
        if total > self.length:
            self.begin(batch, total - self.length, None, device)
            self.known, self.open = self.length, None

    def has_padding(self) -> bool:
        return self.real is not None and not bool(self.real.all())

    def crop(self, total: int) -> None:
        self.sink, self.leading = self.sink[:total], self.leading[:total]
        if self.real is not None:
            self.real = self.real[:, :total]
        self.known = min(self.known, total)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.real is not None:
            self.real = fn(self.real)


class SinkQuantizedLayer(DynamicLayer):
    """One full-attention layer: sinks (exact) + packed quantized body + full-precision tail.

    `self.keys`/`self.values` are the tail; `body_start` is the absolute position of the body's first
    token (tokens before it were evicted, except sinks, kept in `_sink_*`).
    """

    def __init__(self, config: KVCacheConfig, flags: TokenFlags, key_outliers: torch.Tensor | None = None):
        super().__init__()
        self.config, self.flags = config, flags
        self.outlier_idx = key_outliers  # [kv_heads, n] channels kept at full precision
        self.is_croppable = config.max_tokens is None
        self.cumulative_length = 0
        self._clear()

    def _clear(self) -> None:
        c = self.config
        self.body_start = 0
        self._kq = PackedTokens(c.bits, c.group_size, c.symmetric, per_channel=c.key_granularity == "channel")
        self._vq = PackedTokens(c.bits, c.group_size, c.symmetric, per_channel=False)
        self._sink_pos = torch.zeros(0, dtype=torch.long)
        self._sink_leading = torch.zeros(0, dtype=torch.bool)
        self._sink_k = self._sink_v = self._outlier_k = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self._sink_k, self._sink_v = self.keys, self.values
        self._sink_pos, self._sink_leading = (
            self._sink_pos.to(self.device),
            self._sink_leading.to(self.device),
        )
        if self.outlier_idx is not None:
            heads, dim = key_states.shape[1], key_states.shape[-1]
            idx = self.outlier_idx.to(self.device, torch.long)
            if (
                idx.dim() != 2
                or idx.shape[0] != heads
                or idx.shape[1] >= dim
                or idx.min() < 0
                or idx.max() >= dim
            ):
                raise InputError(
                    f"key outlier channels must be a LongTensor [kv_heads={heads}, n < {dim}] of channels in "
                    f"[0, {dim}) (got shape {tuple(idx.shape)}); use top_key_channels(key_channel_stats(...), n)"
                )
            rest = torch.ones(heads, dim, dtype=torch.bool, device=self.device).scatter(1, idx, False)
            self.outlier_idx = idx
            self._keep_idx = rest.nonzero()[:, 1].view(heads, dim - idx.shape[1])
            self._outlier_k = self.keys[..., : idx.shape[1]]
        self.is_initialized = True

    # -- planning: what the next update will quantize and evict (pure, so get_mask_sizes can ask) ---
    @property
    def quantized_length(self) -> int:
        return self._kq.length

    def _plan(self) -> tuple[int, int, int, int]:
        """(tokens to quantize, groups to evict, content sinks to drop, tokens held afterwards)."""
        g, c = self.config.group_size, self.config
        seen, body_end = self.cumulative_length, self.body_start + self._kq.length
        tail = seen - body_end
        known = min(self.flags.known, seen) - body_end
        flush = max(0, min(tail - c.residual, known)) // g * g
        body, tail = self._kq.length + flush, tail - flush
        detached_mask = self._sink_pos < self.body_start
        detached = int(detached_mask.sum())
        droppable = int((detached_mask & ~self._sink_leading).sum())
        evict = drop = 0
        if c.max_tokens is not None:
            while detached + body - evict * g + tail > c.max_tokens and (evict + 1) * g <= body:
                start = self.body_start + evict * g
                detached += int(self.flags.sink[start : start + g].sum())
                droppable += int((self.flags.sink & ~self.flags.leading)[start : start + g].sum())
                evict += 1
            drop = min(droppable, max(0, detached + body - evict * g + tail - c.max_tokens))
        return flush, evict, drop, detached - drop + body - evict * g + tail

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self._plan()[3] if self.is_initialized else 0
        return held + query_length, self.cumulative_length - held

    def get_seq_length(self) -> int:
        return self.cumulative_length

    # -- update -------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.flags.ensure(key_states.shape[0], self.cumulative_length + n, key_states.device)
        flush, evict, drop, _ = self._plan()
        self._flush(flush)
        self._evict(evict, drop)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += n
        return self._assemble()

    def _flush(self, n: int) -> None:
        """Move the oldest n tail tokens (whole groups, flags final) into the quantized body."""
        if n == 0:
            return
        start = self.body_start + self._kq.length
        k, v = self.keys[:, :, :n], self.values[:, :, :n]
        self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
        sink = self.flags.sink[start : start + n]
        cols = sink.nonzero().flatten()
        if cols.numel():
            self._sink_pos = torch.cat([self._sink_pos, cols + start])
            self._sink_leading = torch.cat([self._sink_leading, self.flags.leading[start : start + n][cols]])
            self._sink_k = torch.cat([self._sink_k, k[:, :, cols]], dim=-2)
            self._sink_v = torch.cat([self._sink_v, v[:, :, cols]], dim=-2)
        exclude = sink[None, :] | ~self.flags.real[:, start : start + n]
        kn = neutralize(k.float(), exclude, self.config.group_size)
        if self.outlier_idx is not None:
            self._outlier_k = torch.cat([self._outlier_k, _gather_channels(k, self.outlier_idx)], dim=-2)
            kn = _gather_channels(kn, self._keep_idx)
        self._kq.append(kn)
        self._vq.append(neutralize(v.float(), exclude, self.config.group_size))

    def _evict(self, groups: int, drop: int) -> None:
        n = groups * self.config.group_size
        if n:
            self._kq.drop_front(n)
            self._vq.drop_front(n)
            if self._outlier_k is not None:
                self._outlier_k = self._outlier_k[:, :, n:]
            self.body_start += n
        if drop:
            candidates = ((self._sink_pos < self.body_start) & ~self._sink_leading).nonzero().flatten()[:drop]
            keep = torch.ones_like(self._sink_leading).index_fill(0, candidates, False)
            self._sink_pos, self._sink_leading = self._sink_pos[keep], self._sink_leading[keep]
            self._sink_k, self._sink_v = self._sink_k[:, :, keep], self._sink_v[:, :, keep]

    def _assemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached sinks + body (sinks and outlier channels put back) + tail, in token order."""
        detached = self._sink_pos < self.body_start
        keys, values = [self._sink_k[:, :, detached]], [self._sink_v[:, :, detached]]
        body_k, body_v = self._kq.dequantize(self.dtype), self._vq.dequantize(self.dtype)
        if body_k is not None:
            if self.outlier_idx is not None:
                b, h, n, _ = body_k.shape
                full = body_k.new_empty(b, h, n, self.keys.shape[-1])
                full.scatter_(-1, self._keep_idx[None, :, None].expand(b, h, n, -1), body_k)
                full.scatter_(-1, self.outlier_idx[None, :, None].expand(b, h, n, -1), self._outlier_k)
                body_k = full
            inline = self._sink_pos[~detached] - self.body_start
            body_k[:, :, inline] = self._sink_k[:, :, ~detached]
            body_v[:, :, inline] = self._sink_v[:, :, ~detached]
            keys.append(body_k)
            values.append(body_v)
        keys.append(self.keys)
        values.append(self.values)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    # -- cache management ---------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._clear()

    def tail_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    @property
    def held_length(self) -> int:
        """Tokens held now (kept sinks + quantized body + full-precision tail): what `update` returned."""
        detached = int((self._sink_pos < self.body_start).sum())
        return detached + self._kq.length + self.tail_length()

    def check_crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise InputError(
                f"crop({tokens_to_remove}): give a negative number of tokens to remove, e.g. crop(-1)"
            )
        if -tokens_to_remove > self.tail_length():
            raise InputError(
                f"crop({tokens_to_remove}) reaches tokens already quantized: only the last {self.tail_length()} "
                "are still at full precision; crop fewer tokens or use a larger residual"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove tokens; only tokens still in the full-precision tail can go."""
        self.check_crop(tokens_to_remove)
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]
        self.cumulative_length -= n

    def map_batch(self, fn) -> None:
        """Apply a batch-dim operation (index_select, repeat_interleave, ...) to every stored tensor."""
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self._sink_k, self._sink_v = fn(self._sink_k), fn(self._sink_v)
        if self._outlier_k is not None:
            self._outlier_k = fn(self._outlier_k)
        self._kq.map_batch(fn)
        self._vq.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices])

    def memory_bytes(self) -> dict[str, int]:
        def size(*tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        kc, kp = self._kq.nbytes()
        vc, vp = self._vq.nbytes()
        return {
            "sinks_fp": size(self._sink_k, self._sink_v),
            "residual_fp": size(self.keys, self.values),
            "codes": kc + vc,
            "scales": kp + vp,
            "key_outliers": size(self._outlier_k),
        }


def _gather_channels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], idx [H, m] -> [B, H, N, m]."""
    b, h, n, _ = x.shape
    return x.gather(-1, idx[None, :, None].expand(b, h, n, -1))
