"""`weights.rotation`: the kept input columns rotated by block-Hadamard matrices with random signs
(`quantize.rotation`) before GPTQ; the layer holds W R and rotates its inputs to match, so it stores the
signs (one bit a kept column) and needs sinkquant's own layer wherever it runs."""

from __future__ import annotations

import torch

from .base import BufferSpecs, LayerFeature, register_feature


@register_feature
class Rotation(LayerFeature):
    field = "rotation"
    since = 5
    export_refusal = ("layers with rotated inputs", "no export format stores the rotation")
    needs_own_layer = True

    def extra_buffers(self, spec, shards: int) -> BufferSpecs:
        # shared by a serving engine's fused shards: the signs depend only on the width and kept columns
        return {"input_signs": ((-(-spec.kept // 8),), torch.uint8)}

    def describe(self, spec) -> str:
        return f"inputs rotated (blocks of {spec.rotation})"
