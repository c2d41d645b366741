"""`weights.log_scales`: each int4 group's scale stored as one byte, a step of 1/32 octave below one
exponent per layer (`quantize.primitives.encode_log_scales`), in place of a bf16 scale (symmetric:
4.0625 bits per weight at group 128). Everything past storage reads the decoded bf16 scales."""

from __future__ import annotations

import torch

from .base import BufferSpecs, LayerFeature, register_feature


@register_feature
class LogScales(LayerFeature):
    field = "log_scales"
    since = 4
    int4_only = True

    def storage(self, spec, scheme: BufferSpecs, shards: int) -> BufferSpecs:
        shape, _ = scheme["weight_scale"]
        replaced: BufferSpecs = {}
        for name, entry in scheme.items():  # in place of weight_scale, so the key order stays
            if name == "weight_scale":
                replaced["weight_scale_code"] = (shape, torch.uint8)
                replaced["weight_scale_top"] = ((shards,), torch.int32)  # one exponent per layer
            else:
                replaced[name] = entry
        return replaced
