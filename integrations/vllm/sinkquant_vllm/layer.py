"""The plugin's layer: sinkquant's own `SinkQuantLinear` on the tensors vLLM loaded. vLLM-free (torch and
sinkquant only), so sinkquant's tests check it without vLLM.

The format is sinkquant's (`sinkquant.format.LayerSpec`, one per `quantization_config.layers` entry):
the plugin reads no copy of it. vLLM fuses projections that read one input (q/k/v as `qkv_proj`, gate/up
as `gate_up_proj`) into one layer, so a served layer holds its shards' tensors side by side along the
output rows, except:

* `outlier_idx` and `input_signs` (SHARED_ACROSS_SHARDS): chosen from the input, which the shards share,
  so one copy serves all (the method refuses shards that disagree);
* `weight_scale_top` (log scales): one exponent per checkpoint layer, so one per shard; the scales are
  decoded to bf16 after loading (`for_serving`, the feature's hook) and the layer is served as a plain int4 layer;
* `weight_levels` (a non-uniform grid): one table of 16 per shard, so a grid layer of several shards runs
  one `SinkQuantLinear` per shard on the same input (`ShardedLayer`).

A served layer runs sinkquant's CPU kernels on CPU and dequantizes per call elsewhere (`SinkQuantLinear`'s
own dispatch), so vLLM's numbers are sinkquant's.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sinkquant.format import FORMAT_VERSION, LayerSpec
from sinkquant.format.features.grid import LEVELS
from sinkquant.quantize.linear import SinkQuantLinear

#: tensors every shard of a fused layer brings whole (the others are the shard's rows, or its levels)
SHARED_ACROSS_SHARDS = ("outlier_idx", "input_signs")

__all__ = [
    "FORMAT_VERSION",
    "LEVELS",
    "SHARED_ACROSS_SHARDS",
    "LayerSpec",
    "ShardedLayer",
    "for_serving",
    "served_layer",
]


def for_serving(
    spec: LayerSpec, tensors: dict[str, torch.Tensor], shard_sizes: list[int] | None = None
) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """vLLM's (possibly fused) layer as the spec and tensors sinkquant's layer runs: each feature's
    `for_serving` (a log-scale layer's scales decoded to bf16, each shard under its own exponent).
    `shard_sizes`: the output rows of each fused shard, in order (default: one shard)."""
    sizes = shard_sizes or [tensors["weight"].shape[0]]
    for feature in spec.features():
        spec, tensors = feature.for_serving(spec, tensors, sizes)
    return spec, tensors


def sinkquant_layer(
    spec: LayerSpec, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
) -> SinkQuantLinear:
    """sinkquant's `SinkQuantLinear` on these tensors (shared, not copied), as many outputs as they hold."""
    out = tensors["weight"].shape[0]
    layer = SinkQuantLinear(replace(spec, out_features=out, bias=bias is not None), device="meta")
    for name in layer.spec.shapes():
        setattr(layer, name, tensors[name])
    if bias is not None:
        layer.bias = bias.to(tensors["outlier_weight"].dtype)
    layer.reset_layouts()
    return layer


class ShardedLayer(torch.nn.Module):
    """A fused layer (q/k/v, gate/up) whose shards cannot share one `SinkQuantLinear`: each shard's
    module on the same input, outputs side by side."""

    def __init__(self, shards: list[torch.nn.Module]) -> None:
        super().__init__()
        self.shards = torch.nn.ModuleList(shards)
        self.out_features = sum(shard.out_features for shard in shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([shard(x) for shard in self.shards], dim=-1)


def served_layer(
    spec: LayerSpec, tensors: dict[str, torch.Tensor], shard_sizes: list[int]
) -> SinkQuantLinear | ShardedLayer:
    """sinkquant's module for vLLM's (possibly fused) layer of `shard_sizes` output rows: one
    `SinkQuantLinear` on the fused tensors, or, where a feature's per-shard table forbids that (a
    grid's levels), one per shard in a `ShardedLayer`."""
    if len(shard_sizes) == 1 or all(feature.shares_fused_layer for feature in spec.features()):
        return sinkquant_layer(spec, tensors)
    shards, start = [], 0
    for index, rows in enumerate(shard_sizes):
        part = {}
        for name, tensor in tensors.items():
            if name in SHARED_ACROSS_SHARDS:
                part[name] = tensor
            elif name == "weight_levels":
                part[name] = tensor[index * LEVELS : (index + 1) * LEVELS]
            else:  # the output rows
                part[name] = tensor[start : start + rows]
        shards.append(sinkquant_layer(replace(spec, out_features=rows), part))
        start += rows
    return ShardedLayer(shards)
