"""What an int4/int8 layer feature declares, and the registry the format reads them from.

A feature is an option of one quantized layer that changes what the layer stores or how its numbers are
read (symmetric groups, one-byte log scales, an input rotation, a non-uniform grid). Each is one class in
one file of this package that declares:

* `field`: its key in the layer spec (`LayerSpec`, the checkpoint's `quantization_config.layers`);
* `since`: the oldest checkpoint format version whose readers rebuild a layer with it;
* `storage`: how it changes the layer's buffers (names, shapes, dtypes);
* `describe`: how `inspect` and the module's repr name it;
* `export_refusal`: why an export format cannot store it, if it cannot;
* `needs_own_layer`: whether a serving engine must run sinkquant's own layer for it.

`format_version`, the inspect text, `extra_repr`, the export's refusal and the vLLM plugin's checks are
derived from these declarations (see `spec.py`), so a new feature is one file plus its recipe field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

if TYPE_CHECKING:
    from ..spec import LayerSpec

#: buffer name -> (shape, dtype), in the order the layer registers them (the checkpoint's key order)
BufferSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class LayerFeature:
    """One layer feature; see the module docstring. Stateless: one instance is registered."""

    field: ClassVar[str]
    since: ClassVar[int]
    #: (what the layers have, why an export format cannot store it), or None where exports keep it
    export_refusal: ClassVar[tuple[str, str] | None] = None
    #: a serving engine must run sinkquant's own layer (it transforms the input or the codes)
    needs_own_layer: ClassVar[bool] = False
    #: the feature is a way of storing int4 groups (an int8 layer with it is refused)
    int4_only: ClassVar[bool] = False

    def active(self, spec: LayerSpec) -> bool:
        """Whether a layer of `spec` has the feature (default: its field is set)."""
        return bool(getattr(spec, self.field))

    def storage(self, spec: LayerSpec, scheme: BufferSpecs, shards: int) -> BufferSpecs:
        """The scheme's buffers as the feature changes them (default: unchanged). `shards`: how many
        checkpoint layers a serving engine fused into this one (each brings its own per-layer tensors)."""
        return scheme

    def extra_buffers(self, spec: LayerSpec, shards: int) -> BufferSpecs:
        """Buffers the feature adds after the outlier columns and the bias (default: none)."""
        return {}

    def describe(self, spec: LayerSpec) -> str:
        """A few words for `inspect` and the module's repr."""
        return self.field.replace("_", " ")


#: the registered features, in the order their descriptions are listed
FEATURES: dict[str, LayerFeature] = {}
_F = TypeVar("_F", bound=type[LayerFeature])


def register_feature(cls: _F) -> _F:
    """Class decorator: put one instance of `cls` in `FEATURES` under its spec field."""
    if cls.field in FEATURES:
        raise ValueError(f"layer feature {cls.field!r} is registered twice")
    FEATURES[cls.field] = cls()
    return cls
