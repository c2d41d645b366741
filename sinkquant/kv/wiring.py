"""Wiring the sink-aware KV cache into runs: from settings and calibration to a cache per call.

What the cache needs measured (the sink positions and their run-time signature, the key outlier
channels) is measured here, in `calibrate_kv`, for both `sinkquant quantize` (stored in the checkpoint)
and `sinkquant eval` (measured on the fly), on the samples the run's calibration section draws.
`cache_factory` turns a config plus those results into `factory(model)`, a fresh attached cache per
evaluation window; `install_default_cache` makes a loaded checkpoint's `generate` use its stored cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..calibrate.keys import measure_key_outlier_idx
from ..calibrate.report import CalibrationReport
from ..errors import InputError
from .cache import SinkDetection, SinkQuantizedCache, build_cache
from .config import KVCacheConfig

#: samples the key outlier channels are measured on (the first of the run's calibration samples): a
#: channel's rank is a max over tokens, which settles long before the sink statistics do
KEY_CHANNEL_SAMPLES = 16


@dataclass
class KVCalibration:
    """What a KV cache config needs measured: the report (for sinks: auto) and, when
    key_outlier_channels > 0, the channels {layer: int64 [kv_heads, n]}."""

    report: CalibrationReport | None = None
    key_outlier_idx: dict[int, torch.Tensor] | None = None

    def key_outlier_idx_json(self) -> dict[str, list] | None:
        """The key outlier channels as a checkpoint's quantization_config stores them."""
        if not self.key_outlier_idx:
            return None
        return {str(layer): idx.tolist() for layer, idx in self.key_outlier_idx.items()}


def needs_report(config: KVCacheConfig | None) -> bool:
    return config is not None and config.sinks == "auto"


def _check_report(config: KVCacheConfig, report: CalibrationReport | None) -> None:
    if needs_report(config) and report is None:
        raise InputError(
            "kv_cache sinks: auto needs a calibration report; pass --calibration or use --kv-sinks 0"
        )


def calibrate_kv(
    model: nn.Module,
    config: KVCacheConfig,
    input_ids: torch.Tensor | None,
    report: CalibrationReport | None,
) -> KVCalibration:
    """Measure what `config` needs on the run's calibration samples `input_ids` [n, seq]; `report` is
    the run's calibration report (required for sinks: auto, which reads its sink positions)."""
    _check_report(config, report)
    key_outlier_idx = None
    if config.key_outlier_channels:
        if input_ids is None:
            raise InputError("kv_cache key_outlier_channels > 0 needs calibration samples to measure them on")
        sinks = report.sink_positions if report is not None else (config.leading_sinks or [0])
        key_outlier_idx = measure_key_outlier_idx(
            model, input_ids[:KEY_CHANNEL_SAMPLES], config.key_outlier_channels, sinks
        )
    return KVCalibration(report, key_outlier_idx)


def cache_factory(
    config: KVCacheConfig, calibration: KVCalibration | None = None
) -> Callable[[nn.Module], SinkQuantizedCache]:
    """`factory(model)` building a fresh, attached cache per call (one per evaluation window)."""
    calibration = calibration or KVCalibration()
    _check_report(config, calibration.report)

    def factory(model: nn.Module) -> SinkQuantizedCache:
        return build_cache(model, config, calibration.report, calibration.key_outlier_idx)

    return factory


def stored_cache_factory(
    config: KVCacheConfig, calibration: dict | None, key_outlier_idx: dict | None
) -> Callable[[nn.Module], SinkQuantizedCache]:
    """The same, from what a checkpoint stored: settings, calibration summary, key outlier channels."""
    detect = None
    if config.sinks == "auto":
        summary = calibration or {}
        config = config.model_copy(update={"sinks": list(summary.get("sinks", {}).get("positions", [0]))})
        signature = summary.get("signature")
        detect = SinkDetection(**signature) if signature else None
    channels = {int(k): torch.tensor(v, dtype=torch.long) for k, v in (key_outlier_idx or {}).items()} or None

    def factory(model: nn.Module) -> SinkQuantizedCache:
        return SinkQuantizedCache(model.config, config, detect, channels).attach(model)

    return factory


def install_default_cache(
    model: nn.Module, config: KVCacheConfig, calibration: dict | None, key_outlier_idx: dict | None = None
) -> None:
    """Make `model.generate` use the checkpoint's sink-aware cache unless a cache is passed in.

    The factory is also kept as `model.sinkquant_cache_factory` for evaluators and users."""
    factory = stored_cache_factory(config, calibration, key_outlier_idx)
    model.sinkquant_cache_factory = factory
    original = model.generate

    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = factory(model)
        return original(*args, **kwargs)

    model.generate = generate
