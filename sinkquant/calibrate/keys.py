"""Key-channel statistics for the KV cache: which post-RoPE key channels carry outliers.

Runs a plain prefill through a transformers `DynamicCache` and reads the keys the model stored, so the
statistics are of exactly what a KV cache holds (after RoPE). Sink positions are left out: their keys
are kept at full precision anyway and would otherwise decide every channel's ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError


@torch.no_grad()
def key_channel_stats(
    model: nn.Module, input_ids: torch.Tensor, exclude: Sequence[int] = (0,)
) -> dict[int, torch.Tensor]:
    """Per full-attention layer, max |key| per (KV head, channel): {layer: float32 [kv_heads, head_dim]}.

    input_ids [samples, seq] (or [seq]) without padding, run one sample at a time; the positions in
    `exclude` (the leading sinks) are left out. Sliding-window layers, which keep only their window, are
    skipped.
    """
    from transformers import DynamicCache

    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[[p for p in exclude if p < ids.shape[1]]] = False
    if not bool(keep.any()):
        raise InputError(
            f"key_channel_stats needs tokens after the excluded positions {list(exclude)}; give longer samples"
        )
    device = next(model.parameters()).device
    stats: dict[int, torch.Tensor] = {}
    for row in ids:
        cache = DynamicCache(config=model.config)
        model(input_ids=row[None].to(device), past_key_values=cache, use_cache=True)
        for idx, layer in enumerate(cache.layers):
            if getattr(layer, "is_sliding", False) or layer.keys is None or layer.keys.dim() != 4:
                continue
            peak = (
                layer.keys[0][:, keep.to(layer.keys.device)].float().abs().amax(dim=1).cpu()
            )  # [heads, dim]
            stats[idx] = peak if idx not in stats else torch.maximum(stats[idx], peak)
    return stats


def top_key_channels(stats: dict[int, torch.Tensor], n: int) -> dict[int, torch.Tensor]:
    """The n channels with the largest max |key| per KV head: {layer: int64 [kv_heads, n]}, largest first."""
    if n < 1:
        return {}
    return {layer: torch.topk(peak, min(n, peak.shape[-1]), dim=-1).indices for layer, peak in stats.items()}


def measure_key_outlier_idx(
    model: nn.Module, input_ids: torch.Tensor, n: int, sinks: Sequence[int]
) -> dict[int, torch.Tensor]:
    """The `n` largest post-RoPE key channels per KV head and layer, measured on `input_ids` with the
    sink positions left out: {layer: int64 [kv_heads, n]}."""
    return top_key_channels(key_channel_stats(model, input_ids, exclude=sinks or (0,)), n)
