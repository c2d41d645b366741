"""`SinkQuantizedLayer`: one full-attention layer of the sink-aware cache.

Three stores, in token order: the sinks (exact), a packed quantized body (`PackedTokens`, sinks and
padding left out of its group statistics) and a full-precision tail (the `residual` most recent tokens
and the chunk being attended). Tokens move into the body only once their flags are final.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import InputError
from .config import KVCacheConfig
from .flags import TokenFlags
from .packed import PackedTokens, neutralize


class BatchMapping(ABC):
    """transformers' three batch operations of a cache (beam reordering, repetition, selection) as one
    `map_batch(fn)` applied to every stored tensor."""

    @abstractmethod
    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `fn` to every tensor with a batch dimension that this store holds."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices])


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class SinkQuantizedLayer(BatchMapping, DynamicLayer):
    """One full-attention layer: sinks (exact) + packed quantized body + full-precision tail.

    `self.keys`/`self.values` are the tail; `body_start` is the absolute position of the body's first
    token (tokens before it were evicted, except sinks, kept in `_sink_*`).
    """

    def __init__(self, config: KVCacheConfig, flags: TokenFlags, key_outlier_idx: torch.Tensor | None = None):
        super().__init__()
        self.config, self.flags = config, flags
        self.key_outlier_idx = key_outlier_idx  # [kv_heads, n] channels kept at full precision
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
        if self.key_outlier_idx is not None:
            heads, dim = key_states.shape[1], key_states.shape[-1]
            idx = self.key_outlier_idx.to(self.device, torch.long)
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
            self.key_outlier_idx = idx
            self._keep_idx = rest.nonzero()[:, 1].view(heads, dim - idx.shape[1])
            self._outlier_k = self.keys[..., : idx.shape[1]]
        self.is_initialized = True

    # -- planning: what the next update will quantize and evict (pure, so get_mask_sizes can ask) ---
    @property
    def quantized_length(self) -> int:
        return self._kq.length

    def _plan(self) -> tuple[int, int, int, int]:
        """(tokens to quantize, groups to evict, content sinks to drop, tokens held afterwards)."""
        return plan_update(
            self.config, self.flags, self.cumulative_length, self.body_start, self._kq.length,
            self._sink_pos, self._sink_leading,
        )  # fmt: skip

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
        if self.key_outlier_idx is not None:
            self._outlier_k = torch.cat([self._outlier_k, _gather_channels(k, self.key_outlier_idx)], dim=-2)
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
            if self.key_outlier_idx is not None:
                b, h, n, _ = body_k.shape
                full = body_k.new_empty(b, h, n, self.keys.shape[-1])
                full.scatter_(-1, self._keep_idx[None, :, None].expand(b, h, n, -1), body_k)
                full.scatter_(-1, self.key_outlier_idx[None, :, None].expand(b, h, n, -1), self._outlier_k)
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

    def memory_bytes(self) -> dict[str, int]:
        size = tensor_bytes
        kc, kp = self._kq.nbytes()
        vc, vp = self._vq.nbytes()
        return {
            "sinks_fp": size(self._sink_k, self._sink_v),
            "residual_fp": size(self.keys, self.values),
            "codes": kc + vc,
            "scales": kp + vp,
            "key_outlier_channels": size(self._outlier_k),
        }


def _gather_channels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], idx [H, m] -> [B, H, N, m]."""
    b, h, n, _ = x.shape
    return x.gather(-1, idx[None, :, None].expand(b, h, n, -1))


def plan_update(
    config: KVCacheConfig,
    flags: TokenFlags,
    seen: int,
    body_start: int,
    body_length: int,
    sink_pos: torch.Tensor,
    sink_leading: torch.Tensor,
) -> tuple[int, int, int, int]:
    """What the next `update` will do, without doing it (so `get_mask_sizes` can ask first): (tokens
    to quantize, whole groups to evict, content sinks to drop, tokens held afterwards).

    Only tokens whose flags are final and that are older than the residual window are quantized, in
    whole groups. With `max_tokens`, the oldest groups are evicted (their sinks stay), then the oldest
    content sinks, until the cache fits."""
    g, c = config.group_size, config
    body_end = body_start + body_length
    tail = seen - body_end
    known = min(flags.known, seen) - body_end
    flush = max(0, min(tail - c.residual, known)) // g * g
    body, tail = body_length + flush, tail - flush
    detached_mask = sink_pos < body_start
    detached = int(detached_mask.sum())
    droppable = int((detached_mask & ~sink_leading).sum())
    evict = drop = 0
    if c.max_tokens is not None:
        while detached + body - evict * g + tail > c.max_tokens and (evict + 1) * g <= body:
            start = body_start + evict * g
            detached += int(flags.sink[start : start + g].sum())
            droppable += int((flags.sink & ~flags.leading)[start : start + g].sum())
            evict += 1
        drop = min(droppable, max(0, detached + body - evict * g + tail - c.max_tokens))
    return flush, evict, drop, detached - drop + body - evict * g + tail
