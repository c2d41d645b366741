"""`weights.log_scales`: each int4 group's scale stored as one byte, a step of 1/32 octave below one
exponent per layer (`format.primitives.encode_log_scales`), in place of a bf16 scale (symmetric:
4.0625 bits per weight at group 128). Everything past storage reads the decoded bf16 scales."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..primitives import decode_log_scales, snap_log_scale
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

    def check_chosen(self, spec, scheme, stored) -> None:
        if not torch.equal(snap_log_scale(stored.scale), stored.scale):
            raise ValueError("a log-scale layer takes scales on the log grid (quantize with log_scales=True)")

    def for_serving(self, spec, tensors, shard_sizes):
        """The same layer with bf16 `weight_scale` (its spec without the flag), each shard's rows decoded
        under its own exponent."""
        code, top = tensors["weight_scale_code"], tensors["weight_scale_top"]
        if len(shard_sizes) != top.numel() or sum(shard_sizes) != code.shape[0]:
            raise ValueError(f"{top.numel()} log-scale exponents for shards of {shard_sizes} rows")
        parts = code.cpu().split(shard_sizes)
        scale = torch.cat([decode_log_scales(part, top.cpu()[i : i + 1]) for i, part in enumerate(parts)])
        plain = {k: v for k, v in tensors.items() if k not in ("weight_scale_code", "weight_scale_top")}
        return replace(spec, log_scales=False), {**plain, "weight_scale": scale.to(code.device)}
