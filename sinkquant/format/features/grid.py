"""`weights.grid: lloyd`: int4 codes index 16 levels of the layer's own (Lloyd-Max on its weights,
`quantize.grid`) instead of the uniform grid: the layer stores them (float32 [16]) and needs sinkquant's
own layer (its fused kernel looks each code up) wherever it runs."""

from __future__ import annotations

import torch

from .base import BufferSpecs, LayerFeature, register_feature

LEVELS = 16  # an int4 grid's levels


@register_feature
class Grid(LayerFeature):
    field = "grid"
    since = 6
    int4_only = True
    export_refusal = ("int4 layers on a non-uniform grid", "compressed-tensors stores only the uniform grid")
    needs_own_layer = True

    def extra_buffers(self, spec, shards: int) -> BufferSpecs:
        return {"weight_levels": ((LEVELS * shards,), torch.float32)}  # one table per fused shard

    def describe(self, spec) -> str:
        return f"{spec.grid} grid"
