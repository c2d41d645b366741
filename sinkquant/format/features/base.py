"""What an int4/int8 layer feature declares, and the registry the format reads them from.

A feature is an option of one quantized layer that changes what the layer stores or how its numbers are
read (symmetric groups, one-byte log scales, an input rotation, a non-uniform grid). Each is one class in
one file of this package that declares:

* `field`: its key in the layer spec (`LayerSpec`, the checkpoint's `quantization_config.layers`);
* `since`: the oldest checkpoint format version whose readers rebuild a layer with it;
* `storage`: how it changes the layer's buffers (names, shapes, dtypes);
* `describe`: how `inspect` and the module's repr name it;
* `export_refusal`: why an export format cannot store it, if it cannot;
* `pytorch_kernels`: whether PyTorch's integer kernels (uniform grids only) can compute such a layer;
* `excludes`: the features a layer with it cannot also have.

and the hooks the algorithms and the runtime call, each a no-op by default:

* `prepare`: before the integers are chosen, the weight and Hessian the algorithm rounds, and the
  state the layer stores for it (a rotation rotates both and keeps its signs);
* `rounding`: how the kept columns' values are rounded to codes (a grid fits its levels);
* `check_rtn` / `check_chosen`: refuse round-to-nearest, or integers chosen elsewhere, that a layer
  with the feature cannot store;
* `transform_kept`: the kept columns of a float weight as the layer stores them (W R);
* `write`: the feature's own buffers from its state;
* `input_transform`: what the forward applies to the kept inputs (the rotation);
* `for_serving`: a serving engine's fused layer as the layer sinkquant runs (log scales decode each
  shard's scales under its own exponent).

`format_version`, the inspect text, `extra_repr`, the export's refusal and the vLLM plugin's checks are
derived from these declarations (see `spec.py`), so a new feature is one file plus its recipe field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from ..schemes import Stored, WeightScheme
    from ..spec import LayerSpec

#: buffer name -> (shape, dtype), in the order the layer registers them (the checkpoint's key order)
BufferSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class InputTransform(Protocol):
    """What a feature's `input_transform` returns: an orthogonal map of the kept inputs."""

    #: equal for two transforms that map every input alike (a forward reuses the other's output)
    key: tuple

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """t [..., kept] mapped along its last dimension (inputs, or a weight's rows to store)."""
        ...

    def apply_transposed(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse: a stored weight's rows back in the input's own basis."""
        ...


class LayerFeature:
    """One layer feature; see the module docstring. Stateless: one instance is registered."""

    field: ClassVar[str]
    since: ClassVar[int]
    #: (what the layers have, why an export format cannot store it), or None where exports keep it
    export_refusal: ClassVar[tuple[str, str] | None] = None
    #: the feature is a way of storing int4 groups (an int8 layer with it is refused)
    int4_only: ClassVar[bool] = False
    #: PyTorch's integer kernels (which assume the uniform grid) compute a layer with the feature
    pytorch_kernels: ClassVar[bool] = True
    #: a serving engine's fused layer (q/k/v, gate/up) can run as one sinkquant layer (not with a
    #: per-shard table such as a grid's levels: then one layer per shard)
    shares_fused_layer: ClassVar[bool] = True
    #: spec fields a layer with the feature cannot also have (each refused with the reason given)
    excludes: ClassVar[dict[str, str]] = {}

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

    # -- hooks (see the module docstring); `state` is what `prepare`/`rounding` made, None if nothing --
    def prepare(
        self, spec: LayerSpec, weight: torch.Tensor, hessian: torch.Tensor | None, keep: torch.Tensor,
        cache: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:  # fmt: skip
        """(weight, hessian, state) as the algorithm should round them (default: unchanged, no state)."""
        return weight, hessian, None

    def rounding(
        self, spec: LayerSpec, scheme: WeightScheme, kept_weight: torch.Tensor, group_size: int
    ) -> tuple[Callable | None, Any]:
        """(values, scale, minimum) -> (codes, dequantized) in place of the scheme's uniform rounding,
        fitted on the kept columns, and its state; (None, None): the scheme's own (default)."""
        return None, None

    def spec_value(self, state: Any) -> Any:
        """The layer spec's field for a layer whose feature state is `state` (default: True)."""
        return True

    def check_rtn(self, spec: LayerSpec) -> None:
        """Raise ValueError where round-to-nearest cannot make this layer."""

    def check_chosen(self, spec: LayerSpec, scheme: WeightScheme, stored: Stored) -> None:
        """Raise ValueError where integers chosen elsewhere cannot be stored by this layer."""

    def transform_kept(self, state: Any, kept_weight: torch.Tensor) -> torch.Tensor:
        """The kept columns [out, kept] of a float weight as the layer stores them (default: as they are)."""
        return kept_weight

    def write(self, module: torch.nn.Module, state: Any) -> None:
        """Fill the feature's own buffers of `module` (built empty from its spec) from `state`."""

    def for_serving(
        self, spec: LayerSpec, tensors: dict[str, torch.Tensor], shard_sizes: list[int]
    ) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
        """A serving engine's fused layer of `shard_sizes` output rows (its tensors as loaded) as the
        spec and tensors sinkquant's layer runs (default: unchanged)."""
        return spec, tensors

    def input_transform(self, module: torch.nn.Module) -> InputTransform | None:
        """What the forward applies to the kept inputs first (an object with `apply` and
        `apply_transposed` along the last dimension), or None."""
        return None


#: the registered features, in the order their descriptions are listed
FEATURES: dict[str, LayerFeature] = {}
_F = TypeVar("_F", bound=type[LayerFeature])


def register_feature(cls: _F) -> _F:
    """Class decorator: put one instance of `cls` in `FEATURES` under its spec field."""
    if cls.field in FEATURES:
        raise ValueError(f"layer feature {cls.field!r} is registered twice")
    FEATURES[cls.field] = cls()
    return cls
