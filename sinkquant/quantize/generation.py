"""Wiring the sink-aware KV cache into runs: from a recipe or a checkpoint to a cache factory.

`kv_cache.py` holds the cache itself; this module turns what a user gave (a recipe's `kv_cache`
section, a calibration report, or the settings a checkpoint stored) into `cache_factory(model)`
callables for the evaluator and into the cache `generate` uses by default for a loaded checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ..errors import InputError
from .kv_cache import KVCacheConfig, SinkDetection, SinkQuantizedCache, build_cache


def kv_config(section) -> KVCacheConfig:
    """A `KVCacheConfig` from a recipe `KVCacheSection`, a dict, or a config (returned as is)."""
    if isinstance(section, KVCacheConfig):
        return section
    data = section.model_dump(mode="json") if hasattr(section, "model_dump") else dict(section)
    return KVCacheConfig.from_dict(data)


def calibrated_key_channels(
    model: nn.Module, input_ids: torch.Tensor, n: int, sinks: list[int]
) -> dict[int, torch.Tensor]:
    """The `n` largest post-RoPE key channels per KV head and layer, measured on `input_ids`."""
    from ..calibrate.keys import key_channel_stats, top_key_channels

    return top_key_channels(key_channel_stats(model, input_ids, exclude=sinks or (0,)), n)


def cache_factory(
    config: KVCacheConfig,
    report=None,
    key_outliers: dict[int, torch.Tensor] | None = None,
) -> Callable[[nn.Module], SinkQuantizedCache]:
    """`factory(model)` building a fresh, attached cache per call (one per evaluation window)."""
    if config.sinks == "auto" and report is None:
        raise InputError(
            "kv_cache sinks: auto needs a calibration report; pass --calibration or use --kv-sinks 0"
        )

    def factory(model: nn.Module) -> SinkQuantizedCache:
        return build_cache(model, config, report, key_outliers)

    return factory


def stored_cache_factory(
    kv: dict, calibration: dict | None, key_channels: dict | None
) -> Callable[[nn.Module], SinkQuantizedCache]:
    """The same, from what a checkpoint stored: settings, calibration summary, key channels."""
    config = kv_config(kv)
    detect = None
    if config.sinks == "auto":
        summary = calibration or {}
        config = replace(config, sinks=list(summary.get("sinks", {}).get("positions", [0])))
        signature = summary.get("signature")
        detect = SinkDetection(**signature) if signature else None
    outliers = {int(k): torch.tensor(v, dtype=torch.long) for k, v in (key_channels or {}).items()} or None

    def factory(model: nn.Module) -> SinkQuantizedCache:
        return SinkQuantizedCache(model.config, config, detect, outliers).attach(model)

    return factory


def install_default_cache(
    model: nn.Module, kv: dict, calibration: dict | None, key_channels: dict | None = None
) -> None:
    """Make `model.generate` use the checkpoint's sink-aware cache unless a cache is passed in.

    The factory is also kept as `model.sinkquant_cache_factory` for evaluators and users."""
    factory = stored_cache_factory(kv, calibration, key_channels)
    model.sinkquant_cache_factory = factory
    original = model.generate

    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = factory(model)
        return original(*args, **kwargs)

    model.generate = generate
