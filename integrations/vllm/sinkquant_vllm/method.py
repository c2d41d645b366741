"""The vLLM side: `quant_method: sinkquant` as an out-of-tree quantization config and linear method.

vLLM builds each linear layer (fused ones too: q/k/v as `qkv_proj`, gate/up as `gate_up_proj`) and
asks `SinkQuantVllmConfig.get_quant_method` how to hold its weights. A quantized layer gets sinkquant's
tensors as vLLM parameters, named and shaped by sinkquant's layer format (`LayerSpec.shapes`): every
tensor of shape [out, ...] is loaded shard by shard along the output dimension; the tensors a fused
layer's shards share (`outlier_idx`, a rotation's `input_signs`) are loaded once and every shard must
bring the same; a log-scale exponent and a grid's levels are loaded at the shard's index. After loading,
the layer's forward is sinkquant's own `SinkQuantLinear` on those tensors (`layer.served_layer`), called
through a registered custom op so that vLLM's torch.compile treats it as one opaque call.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from .layer import FORMAT_VERSION, LEVELS, SHARED_ACROSS_SHARDS, LayerSpec, for_serving, served_layer

_LAYERS: list = []  # the served SinkQuantLinear modules, by the handle the custom op receives


@torch.library.custom_op("sinkquant_vllm::linear", mutates_args=())
def _linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _LAYERS[handle](x)


@_linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LAYERS[handle].out_features))


class SharedAcrossShards(BasevLLMParameter):
    """A tensor every shard of a fused layer brings whole (the outlier column indices, the rotation's
    signs): the first shard sets it, later shards must agree."""

    def _load_shared(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        if getattr(self, "_loaded", False):
            if not torch.equal(self.data, loaded_weight.to(self.data.dtype)):
                raise ValueError(
                    "this sinkquant checkpoint keeps different outlier columns or input rotations in "
                    "projections that vLLM fuses into one layer (q/k/v or gate/up); re-quantize it with a "
                    "current sinkquant, which chooses both from the shared input"
                )
            return
        self._assert_and_load(loaded_weight)
        self._loaded = True

    load_column_parallel_weight = _load_shared
    load_row_parallel_weight = _load_shared
    load_merged_column_weight = _load_shared
    load_qkv_weight = _load_shared


class LevelsPerShard(BasevLLMParameter):
    """A grid layer's levels (16 per checkpoint layer): a fused layer holds each shard's 16 at the
    shard's index, one layer its own."""

    def _load_into_shard(self, loaded_weight: torch.Tensor, shard_id: str | int, **kwargs) -> None:
        index = self._shard_id_as_int(shard_id)
        part = self.data[index * LEVELS : (index + 1) * LEVELS]
        assert part.shape == loaded_weight.shape
        part.copy_(loaded_weight)

    load_merged_column_weight = _load_into_shard
    load_qkv_weight = _load_into_shard


@register_quantization_config("sinkquant")
class SinkQuantVllmConfig(QuantizationConfig):
    """config.json's `quantization_config` of a sinkquant checkpoint, as vLLM reads it."""

    def __init__(self, layers: dict[str, dict], modules_to_not_convert: list[str], kv_cache: Any) -> None:
        super().__init__()
        self.layers = {name: LayerSpec.from_dict(spec) for name, spec in layers.items()}
        self.modules_to_not_convert = modules_to_not_convert
        self.kv_cache = kv_cache

    @classmethod
    def get_name(cls) -> str:
        return "sinkquant"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # sinkquant's layer dequantizes per call on any GPU; on CPU the capability is not asked

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SinkQuantVllmConfig:
        version = config.get("format_version", 1)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"this sinkquant checkpoint is format {version}; this plugin reads formats up to "
                f"{FORMAT_VERSION}: upgrade sinkquant beside it"
            )
        return cls(
            config.get("layers") or {}, config.get("modules_to_not_convert") or [], config.get("kv_cache")
        )

    def shard_specs(self, prefix: str) -> list[LayerSpec] | None:
        """The specs of the checkpoint layers behind vLLM's layer `prefix` (one, or a fused group's),
        or None where the checkpoint left it unquantized."""
        parent, _, leaf = prefix.rpartition(".")
        names = [f"{parent}.{shard}" for shard in self.packed_modules_mapping.get(leaf, [leaf])]
        found = [self.layers.get(name) for name in names]
        if all(spec is None for spec in found):
            return None
        if any(spec is None for spec in found):
            raise ValueError(
                f"vLLM fuses {', '.join(names)} into {prefix}, but the checkpoint quantizes only some"
            )
        return found

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        specs = self.shard_specs(prefix)
        if specs is None:
            return UnquantizedLinearMethod()
        return SinkQuantLinearMethod(prefix, specs)


@register_weight_loader_v2_supported_method
class SinkQuantLinearMethod(LinearMethodBase):
    """One (possibly fused) vLLM linear layer holding sinkquant's tensors."""

    def __init__(self, prefix: str, specs: list[LayerSpec]) -> None:
        first = specs[0]
        for spec in specs[1:]:
            # shards differ in their outputs (and q/k/v may differ in bias); every other field must agree
            if replace(spec, out_features=first.out_features, bias=first.bias) != first:
                raise ValueError(f"the projections vLLM fuses into {prefix} were quantized differently")
        self.prefix, self.spec = prefix, first

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        if input_size_per_partition != input_size or input_size != self.spec.in_features:
            raise ValueError(
                f"{self.prefix}: the sinkquant plugin serves each layer whole (tensor_parallel_size 1); its "
                "outlier columns are not split across ranks yet"
            )
        weight_loader = extra_weight_attrs.get("weight_loader")
        out = sum(output_partition_sizes)
        layer.sinkquant_shard_sizes = list(output_partition_sizes)
        for name, (shape, dtype) in self.spec.shapes(out, len(output_partition_sizes)).items():
            data = torch.empty(shape, dtype=dtype)
            if name in SHARED_ACROSS_SHARDS:
                param = SharedAcrossShards(data=data, weight_loader=weight_loader)
            elif name == "weight_scale_top":  # one exponent per shard, loaded at the shard's index
                param = PerTensorScaleParameter(data=data, weight_loader=weight_loader)
            elif name == "weight_levels":  # one table per shard, loaded at the shard's index
                param = LevelsPerShard(data=data, weight_loader=weight_loader)
            elif len(shape) == 1:
                param = ChannelQuantScaleParameter(output_dim=0, data=data, weight_loader=weight_loader)
            else:
                param = ModelWeightParameter(
                    data=data, input_dim=1, output_dim=0, weight_loader=weight_loader
                )
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        loaded = {name: getattr(layer, name).data for name in self.spec.shapes()}
        for name in loaded:
            delattr(layer, name)
        self.spec, loaded = for_serving(self.spec, loaded, layer.sinkquant_shard_sizes)
        tensors = {name: torch.nn.Parameter(t, requires_grad=False) for name, t in loaded.items()}
        for name, tensor in tensors.items():
            setattr(layer, name, tensor)
        plain = {name: t.data for name, t in tensors.items()}
        layer.sinkquant_handle = len(_LAYERS)
        _LAYERS.append(served_layer(self.spec, plain, layer.sinkquant_shard_sizes))

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = _linear(x, layer.sinkquant_handle)
        return y if bias is None else y + bias


__all__ = ["SinkQuantLinearMethod", "SinkQuantVllmConfig"]
