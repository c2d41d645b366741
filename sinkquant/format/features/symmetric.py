"""`weights.symmetric`: int4 groups whose minimum is -8 x their scale, so no minimum is stored (4.125
bits per weight at group 128, not 4.25). int8 layers are symmetric always and store no minimum anyway,
so the feature changes storage (and needs format 3) only for int4."""

from __future__ import annotations

import torch

from .base import BufferSpecs, LayerFeature, register_feature


@register_feature
class Symmetric(LayerFeature):
    field = "symmetric"
    since = 3

    def active(self, spec) -> bool:
        return spec.symmetric and spec.bits == 4

    def storage(self, spec, scheme: BufferSpecs, shards: int) -> BufferSpecs:
        return {name: shape for name, shape in scheme.items() if name != "weight_min"}

    def check_chosen(self, spec, scheme, stored) -> None:
        if stored.minimum is not None and not torch.equal(
            stored.minimum, scheme.minimum(stored._replace(minimum=None))
        ):
            raise ValueError("a symmetric int4 layer's minima must be -8 * its scales (it stores none)")
