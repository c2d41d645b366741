"""`LayerSpec`: one quantized linear layer as a checkpoint describes it (`quantization_config.layers`).

The one definition of the per-layer format, read by everything that builds, saves, loads, inspects,
exports or serves a layer (sinkquant's loader, `inspect`, the export's checks, the vLLM plugin). Its
buffers are the weight scheme's (by bits) as the layer's features change them, then the outlier columns,
then what the features add:

    bits 8: weight int8 [out, kept], weight_scale float32 [out]
    bits 4: weight uint8 [out, ceil(kept / 2)] (two codes a byte, low nibble first),
            weight_scale bf16 [out, groups], weight_min bf16 [out, groups]
    outlier_idx int32 [outliers], outlier_weight [out, outliers] (in `dtype`), bias [out] (in `dtype`)
    ... and each feature's (features/: symmetric, log_scales, rotation, grid)

This module imports only torch and the feature files, so the vLLM plugin reads it without the rest.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

import torch

from .features import FEATURES, BufferSpecs, LayerFeature

#: format 2: the first with per-layer specs; each feature's `since` raises it for the layers that use it
MINIMAL_FORMAT_VERSION = 2
#: the newest format this sinkquant writes and reads
FORMAT_VERSION = max([MINIMAL_FORMAT_VERSION, *(feature.since for feature in FEATURES.values())])
#: weight bits the format stores
BITS = (4, 8)


@dataclass(frozen=True)
class LayerSpec:
    """One entry of `quantization_config.layers`; the field names are the checkpoint's keys."""

    in_features: int
    out_features: int
    bits: int
    group_size: int | None  # None: one group per row (per channel)
    outliers: int  # input columns kept at full precision
    bias: bool
    dtype: str = "float16"  # of the outlier columns and the bias (the source checkpoint's)
    symmetric: bool = False
    log_scales: bool = False
    rotation: int | None = None  # the block of the kept inputs' rotation
    grid: str | None = None  # "lloyd": int4 codes index the layer's own levels

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"sinkquant layers store {' or '.join(map(str, BITS))} bits (got {self.bits})")
        if not 0 <= self.outliers <= self.in_features:
            raise ValueError(f"{self.outliers} outlier columns for a layer of {self.in_features} inputs")
        for feature in FEATURES.values():
            if feature.int4_only and self.bits != 4 and feature.active(self):
                raise ValueError(
                    f"{feature.describe(self)} is a way of storing int4 layers (got int{self.bits})"
                )
        for feature in self.features():
            for other, why in feature.excludes.items():
                if getattr(self, other):
                    raise ValueError(f"{feature.describe(self)} with {other.replace('_', ' ')}: {why}")

    # -- the checkpoint's dict -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, spec: dict) -> LayerSpec:
        """A spec from a checkpoint's dict; keys older formats did not write take their defaults, and a
        key no format has is refused (a newer format than this reader)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"layer spec keys {unknown} are not in sinkquant's format {FORMAT_VERSION}")
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(spec))
        if missing:
            raise ValueError(f"a layer spec lacks {missing}; the checkpoint's config.json is damaged")
        return cls(**spec)

    def to_dict(self) -> dict:
        """The checkpoint's dict: every field older formats have, and each feature only where set, so a
        layer without it stays readable by readers older than the feature."""
        full = asdict(self)
        base = {key: value for key, value in full.items() if key not in FEATURES or key == "symmetric"}
        return {**base, **{f.field: full[f.field] for f in self.features() if f.field != "symmetric"}}

    # -- what follows from it -------------------------------------------------------------------------
    def features(self) -> list[LayerFeature]:
        """The layer's features, oldest format first."""
        return sorted((f for f in FEATURES.values() if f.active(self)), key=lambda f: f.since)

    @property
    def format_version(self) -> int:
        """The oldest checkpoint format whose readers rebuild this layer."""
        return max([MINIMAL_FORMAT_VERSION, *(f.since for f in self.features())])

    @property
    def pytorch_kernels(self) -> bool:
        """Whether PyTorch's integer kernels compute this layer (every feature allows them)."""
        return all(f.pytorch_kernels for f in self.features())

    @property
    def kept(self) -> int:
        """Input columns stored as integers."""
        return self.in_features - self.outliers

    @property
    def stored_group(self) -> int:
        """The group the kept columns are stored in (the whole row for int8 or per-channel int4)."""
        return self.kept if self.bits == 8 or self.group_size is None else self.group_size

    def scheme_storage(self, out_features: int | None = None, shards: int = 1) -> BufferSpecs:
        """The integer part's buffers: the scheme's, as the layer's features change them."""
        out = self.out_features if out_features is None else out_features
        if self.bits == 8:
            storage: BufferSpecs = {
                "weight": ((out, self.kept), torch.int8),
                "weight_scale": ((out,), torch.float32),
            }
        else:
            groups = math.ceil(self.kept / self.stored_group) if self.kept else 0
            storage = {
                "weight": ((out, math.ceil(self.kept / 2)), torch.uint8),
                "weight_scale": ((out, groups), torch.bfloat16),
                "weight_min": ((out, groups), torch.bfloat16),
            }
        for feature in self.features():
            storage = feature.storage(self, storage, shards)
        return storage

    def shapes(self, out_features: int | None = None, shards: int = 1) -> BufferSpecs:
        """Every buffer but the bias, in the layer's order, for `out_features` outputs (default: the
        spec's; a serving engine passes the sum of a fused layer's and its number of `shards`)."""
        out = self.out_features if out_features is None else out_features
        extra: BufferSpecs = {}
        for feature in self.features():
            extra.update(feature.extra_buffers(self, shards))
        return {
            **self.scheme_storage(out, shards),
            "outlier_idx": ((self.outliers,), torch.int32),
            "outlier_weight": ((out, self.outliers), getattr(torch, self.dtype)),
            **extra,
        }

    def scheme_text(self) -> str:
        """How `inspect` and the module's repr name the storage, e.g. 'int4 g128, lloyd grid'."""
        text = f"int{self.bits}" + (f" g{self.group_size}" if self.bits == 4 and self.group_size else "")
        return ", ".join([text, *(f.describe(self) for f in self.features())])


def format_version_for(layers: dict[str, dict]) -> int:
    """The oldest format whose readers rebuild every layer of `layers` (the checkpoint's dicts)."""
    return max([MINIMAL_FORMAT_VERSION, *(LayerSpec.from_dict(s).format_version for s in layers.values())])


def export_refusals(layers: dict[str, dict]) -> list[tuple[LayerFeature, list[str]]]:
    """(feature, the layers that have it) for every feature an export format cannot store, the newest
    feature first (a grid layer is also rotated: it is refused for its grid)."""
    specs = {name: LayerSpec.from_dict(spec) for name, spec in layers.items()}
    refusals = []
    for feature in sorted(FEATURES.values(), key=lambda f: -f.since):
        if feature.export_refusal is None:
            continue
        having = sorted(name for name, spec in specs.items() if feature.active(spec))
        if having:
            refusals.append((feature, having))
    return refusals
