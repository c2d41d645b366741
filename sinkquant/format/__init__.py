"""sinkquant's checkpoint format for one quantized layer: `LayerSpec` and the layer features it reads
(symmetric, log_scales, rotation, grid; one file each in `features/`). torch only."""

from .features import FEATURES, BufferSpecs, LayerFeature
from .spec import (
    FORMAT_VERSION,
    MINIMAL_FORMAT_VERSION,
    LayerSpec,
    export_refusals,
    format_version_for,
)

__all__ = [
    "FEATURES",
    "FORMAT_VERSION",
    "MINIMAL_FORMAT_VERSION",
    "BufferSpecs",
    "LayerFeature",
    "LayerSpec",
    "export_refusals",
    "format_version_for",
]
