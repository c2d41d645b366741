"""The transformers side of a checkpoint: `SinkQuantConfig` (the `quantization_config` in config.json)
and the `HfQuantizer` that builds empty `SinkQuantLinear` modules before `from_pretrained` loads the
weights, both registered under "sinkquant" when this module is imported (`import sinkquant` imports it
through `checkpoint`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .architecture import replace_module
from .errors import InputError, SinkQuantError
from .format import FORMAT_VERSION, format_version_for
from .kv.config import KVCacheConfig
from .kv.wiring import install_default_cache
from .quantize.linear import SinkQuantLinear
from .quantize.weights import empty_from_spec


@register_quantization_config("sinkquant")
class SinkQuantConfig(QuantizationConfigMixin):
    """Everything a loader needs: per-layer specs, the KV-cache settings and provenance."""

    def __init__(
        self,
        layers: dict[str, dict] | None = None,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool = False,
        algorithm: str = "rtn",
        modules_to_not_convert: list[str] | None = None,
        kv_cache: KVCacheConfig | dict | None = None,
        calibration: dict | None = None,
        key_outlier_idx: dict | None = None,
        format_version: int | None = None,
        quant_method: str = "sinkquant",
        **kwargs: Any,
    ) -> None:
        if format_version is None:  # a new checkpoint: the oldest format that describes it
            format_version = format_version_for(layers or {})
        if format_version == 1 and "kv_key_channels" in kwargs:  # the field's name in format 1
            key_outlier_idx = kwargs.pop("kv_key_channels")
        if kwargs:
            raise InputError(f"unknown sinkquant quantization_config fields: {', '.join(sorted(kwargs))}")
        if format_version > FORMAT_VERSION:
            raise InputError(
                f"this checkpoint uses sinkquant format {format_version}, newer than this sinkquant reads "
                f"({FORMAT_VERSION}); upgrade sinkquant (pip install -U sinkquant)"
            )
        self.quant_method = "sinkquant"
        self.format_version = format_version
        self.layers = dict(layers or {})
        self.bits, self.group_size, self.symmetric, self.algorithm = bits, group_size, symmetric, algorithm
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.kv_cache = KVCacheConfig.from_dict(kv_cache) if isinstance(kv_cache, dict) else kv_cache
        self.calibration = calibration
        self.key_outlier_idx = key_outlier_idx  # {layer: [[channel, ...] per KV head]} when kept

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "sinkquant",
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "algorithm": self.algorithm,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "kv_cache": self.kv_cache.to_dict() if self.kv_cache is not None else None,
            "calibration": self.calibration,
            "key_outlier_idx": self.key_outlier_idx,
            "layers": self.layers,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def replace_with_empty_modules(model: nn.Module, layers: dict[str, dict], device=None) -> None:
    """Put an empty `SinkQuantLinear` of the recorded shapes wherever the checkpoint has one."""
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise SinkQuantError(
                f"checkpoint quantizes {name}, which this model architecture does not have"
            ) from exc
        dev = device or (old.weight.device if getattr(old, "weight", None) is not None else None)
        replace_module(model, name, empty_from_spec(spec, device=dev))


@register_quantizer("sinkquant")
class SinkQuantHfQuantizer(HfQuantizer):
    """Lets `from_pretrained` build empty SinkQuantLinear modules before the weights are loaded."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_with_empty_modules(model, self.quantization_config.layers)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        restore_buffer_dtypes(model)
        attach_generation_cache(model)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach_generation_cache(model: nn.Module) -> None:
    """Make `generate` use the checkpoint's KV-cache settings by default (when it has any)."""
    qc = getattr(model.config, "quantization_config", None)
    if isinstance(qc, dict):
        qc = SinkQuantConfig.from_dict(qc)
    if isinstance(qc, SinkQuantConfig) and qc.kv_cache is not None:
        install_default_cache(model, qc.kv_cache, qc.calibration, qc.key_outlier_idx)


def restore_buffer_dtypes(model: nn.Module) -> None:
    """`from_pretrained` casts float tensors to the requested dtype; the quantized layers' scales and
    outlier columns go back to the dtypes they were stored in (the casts are exact both ways)."""
    for module in model.modules():
        if isinstance(module, SinkQuantLinear):
            module.restore_storage_dtypes()
