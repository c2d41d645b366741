"""The layer features, one file each (see `base.py`); importing the package registers them all."""

from . import grid, log_scales, rotation, symmetric  # noqa: F401  (registering is the imports' effect)
from .base import FEATURES, BufferSpecs, InputTransform, LayerFeature, register_feature

__all__ = ["FEATURES", "BufferSpecs", "InputTransform", "LayerFeature", "register_feature"]
