"""sinkquant's quantized linear layer, read from its tensors without sinkquant, and its forward.

This module imports only torch, so the tests of sinkquant check it without vLLM. The format is
sinkquant's (format versions 2 to 6), one layer per `quantization_config.layers` entry:

    y = x[:, kept] @ dequant(W)^T + x[:, outlier_idx] @ outlier_weight^T (+ bias)

    outlier_idx     int32 [n]            the input columns kept at full precision, ascending
    outlier_weight  [out, n]             those columns of the weight, as the source stored them
    kept                                 every other input column, ascending
    bits 4: weight uint8 [out, ceil(kept / 2)], two codes c in [0, 15] a byte, low nibble first;
            weight_scale, weight_min bf16 [out, ceil(kept / group)]; value = c * scale + min over
            groups of `group_size` consecutive kept columns (the last may be shorter); a layer whose
            spec says `symmetric` stores no weight_min: its minima are -8 * scale; a layer whose spec
            says `log_scales` (format 4) stores weight_scale_code uint8 [out, groups] and
            weight_scale_top int32 [1] instead of weight_scale: scale = bf16(2^((top - code) / 32)),
            and `decode_log_scales` turns it into the form above before anything else reads it
    bits 8: weight int8 [out, kept]; weight_scale float32 [out]; value = c * scale
    input_signs     uint8 [ceil(kept / 8)]  only where the spec says `rotation` (format 5): the kept
                    inputs are rotated (block-Hadamard with these signs) before the integer part
                    applies, which holds W R; such a layer is served by sinkquant's own module only
    weight_levels   float32 [16]         only where the spec says `grid` (format 6, int4): a code c stands for
                    weight_levels[c] * scale + min; served by sinkquant's own module only (a fused
                    layer brings one table per shard, and runs one module per shard)

Where sinkquant is importable (`pip install --no-deps sinkquant` beside vLLM), `sinkquant_layer` builds
its `SinkQuantLinear` on the same tensors, so a served layer runs sinkquant's own CPU kernels and gives
sinkquant's numbers. Elsewhere (a GPU, or no sinkquant) `reference_forward` dequantizes and multiplies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

#: the newest checkpoint format this plugin reads (5: input rotation, 6: non-uniform int4 grids)
FORMAT_VERSION = 6
LEVELS = 16  # an int4 grid's levels
#: tensors every shard of a fused layer brings whole (the others are the shard's rows, or its levels)
SHARED_ACROSS_SHARDS = ("outlier_idx", "input_signs")


@dataclass(frozen=True)
class LayerSpec:
    """One entry of `quantization_config.layers` (the shapes of one layer's tensors)."""

    in_features: int
    out_features: int
    bits: int
    group_size: int | None
    outliers: int
    bias: bool
    dtype: str = "float16"
    symmetric: bool = False
    log_scales: bool = False
    rotation: int | None = None  # the block of the kept inputs' rotation (format 5), None without one
    grid: str | None = None  # "lloyd": int4 codes index the layer's own levels (format 6)

    @classmethod
    def from_dict(cls, spec: dict) -> LayerSpec:
        return cls(
            spec["in_features"],
            spec["out_features"],
            spec["bits"],
            spec.get("group_size"),
            spec["outliers"],
            spec.get("bias", False),
            spec.get("dtype", "float16"),
            spec.get("symmetric", False),
            spec.get("log_scales", False),
            spec.get("rotation"),
            spec.get("grid"),
        )

    @property
    def kept(self) -> int:
        return self.in_features - self.outliers

    @property
    def stored_group(self) -> int:
        """The group the kept columns are stored in (the whole row for int8 or per-channel int4)."""
        if self.bits == 8 or self.group_size is None:
            return self.kept
        return self.group_size

    def shapes(
        self, out_features: int | None = None, shards: int = 1
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Tensor name -> (shape, dtype) for a layer of `out_features` outputs (default: the spec's;
        vLLM passes the sum of a fused layer's outputs, and its number of `shards`, each of which
        brings its own log-scale exponent)."""
        out = self.out_features if out_features is None else out_features
        outlier_dtype = getattr(torch, self.dtype)
        if self.bits == 4:
            groups = math.ceil(self.kept / self.stored_group) if self.kept else 0
            scheme = {"weight": ((out, math.ceil(self.kept / 2)), torch.uint8)}
            if self.log_scales:
                scheme["weight_scale_code"] = ((out, groups), torch.uint8)
                scheme["weight_scale_top"] = ((shards,), torch.int32)
            else:
                scheme["weight_scale"] = ((out, groups), torch.bfloat16)
            if not self.symmetric:
                scheme["weight_min"] = ((out, groups), torch.bfloat16)
        elif self.bits == 8:
            scheme = {"weight": ((out, self.kept), torch.int8), "weight_scale": ((out,), torch.float32)}
        else:
            raise ValueError(f"sinkquant layers are 4- or 8-bit (got {self.bits})")
        rotation = {"input_signs": ((math.ceil(self.kept / 8),), torch.uint8)} if self.rotation else {}
        grid = {"weight_levels": ((LEVELS * shards,), torch.float32)} if self.grid else {}
        return {
            **scheme,
            "outlier_idx": ((self.outliers,), torch.int32),
            "outlier_weight": ((out, self.outliers), outlier_dtype),
            **rotation,
            **grid,
        }


# 2^(i/32), i = 0..31, in float64: the log grid's mantissas, computed as sinkquant computes them, so
# a decoded scale has the same bf16 bits as the one sinkquant quantized with
_LOG_STEPS = 32
_LOG_MANTISSAS = torch.tensor([2.0 ** (i / _LOG_STEPS) for i in range(_LOG_STEPS)], dtype=torch.float64)


def decode_log_scales(
    spec: LayerSpec, tensors: dict[str, torch.Tensor], shard_sizes: list[int] | None = None
) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """A `log_scales` layer as the same layer with bf16 `weight_scale` (its spec without the flag);
    any other layer unchanged. `shard_sizes`: the output rows of each fused shard, in order, whose
    exponents `weight_scale_top` holds one each (default: one shard)."""
    if not spec.log_scales:
        return spec, tensors
    code, top = tensors["weight_scale_code"], tensors["weight_scale_top"]
    sizes = shard_sizes or [code.shape[0]]
    if len(sizes) != top.numel() or sum(sizes) != code.shape[0]:
        raise ValueError(f"{top.numel()} log-scale exponents for shards of {sizes} rows")
    row_top = torch.repeat_interleave(top.long().cpu(), torch.tensor(sizes))[:, None]
    exponent = row_top - code.long().cpu()
    octave, step = torch.div(exponent, _LOG_STEPS, rounding_mode="floor"), exponent.remainder(_LOG_STEPS)
    scale = torch.ldexp(_LOG_MANTISSAS[step], octave.double()).to(torch.bfloat16).to(code.device)
    plain = {k: v for k, v in tensors.items() if k not in ("weight_scale_code", "weight_scale_top")}
    return replace(spec, log_scales=False), {**plain, "weight_scale": scale}


def sinkquant_importable() -> bool:
    try:
        import sinkquant.quantize.linear  # noqa: F401
    except ImportError:
        return False
    return True


def unserved_layers(layers: dict[str, dict], importable: bool | None = None) -> str | None:
    """Why this plugin cannot serve a checkpoint with these layer specs, or None where it can: a layer
    whose spec says `rotation` (format 5) rotates its inputs first, which this module does not do
    itself; sinkquant's `SinkQuantLinear` does, so such a checkpoint needs sinkquant importable
    beside vLLM. `importable`: whether it is (default: tried). So does a layer whose spec names a `grid`
    (format 6: int4 codes that index the layer's own 16 levels)."""
    needing = sorted(name for name, spec in layers.items() if spec.get("rotation") or spec.get("grid"))
    if needing and not (sinkquant_importable() if importable is None else importable):
        spec = layers[needing[0]]
        what = (
            "rotates its layers' inputs (weights.rotation"
            if spec.get("rotation")
            else "keeps int4 layers on a non-uniform grid (weights.grid"
        )
        return (
            f"this sinkquant checkpoint {what}, e.g. {needing[0]}), which the plugin serves through "
            "sinkquant's own layer: pip install --no-deps sinkquant beside vLLM"
        )
    return None


def kept_columns(outlier_idx: torch.Tensor, in_features: int) -> torch.Tensor:
    mask = torch.ones(in_features, dtype=torch.bool, device=outlier_idx.device)
    mask[outlier_idx.long()] = False
    return torch.nonzero(mask).flatten()


def dequantize_kept(spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [out, kept]: the integer part as real numbers."""
    weight, scale = tensors["weight"], tensors["weight_scale"].float()
    if spec.bits == 8:
        return weight.float() * scale[:, None]
    low, high = weight & 0xF, weight >> 4
    codes = torch.stack([low, high], dim=-1).reshape(weight.shape[0], -1)[:, : spec.kept].float()
    group = spec.stored_group
    s = scale.repeat_interleave(group, dim=1)[:, : spec.kept]
    minimum = tensors["weight_min"].float() if not spec.symmetric else -8 * scale
    m = minimum.repeat_interleave(group, dim=1)[:, : spec.kept]
    return codes * s + m


def effective_weight(spec: LayerSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [out, in]: the weight the layer multiplies by (outlier columns exactly as stored)."""
    if spec.rotation or spec.grid:
        raise ValueError(
            "a rotated layer's weight is W' Rᵀ, a grid layer's codes index its levels: take the weight "
            "from sinkquant_layer(...).dequantized_weight()"
        )
    idx = tensors["outlier_idx"].long()
    out = tensors["weight"].shape[0]
    full = torch.empty(out, spec.in_features, device=idx.device)
    full[:, kept_columns(idx, spec.in_features)] = dequantize_kept(spec, tensors)
    full[:, idx] = tensors["outlier_weight"].float()
    return full


def reference_forward(
    x: torch.Tensor,
    spec: LayerSpec,
    tensors: dict[str, torch.Tensor],
    bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias), summed in float32, returned in x's dtype. `weight`: the effective weight
    when the caller keeps it (else dequantized here, per call)."""
    w = effective_weight(spec, tensors) if weight is None else weight
    y = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def sinkquant_layer(spec: LayerSpec, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
    """sinkquant's own `SinkQuantLinear` on these tensors, or None where sinkquant is not importable.
    The tensors are shared, not copied."""
    try:
        from sinkquant.quantize.linear import SinkQuantLinear
    except ImportError:
        return None
    out = tensors["weight"].shape[0]
    layer = SinkQuantLinear(
        spec.in_features,
        out,
        spec.bits,
        spec.group_size,
        spec.outliers,
        bias is not None,
        tensors["outlier_weight"].dtype,
        device="meta",
        symmetric=spec.symmetric,
        rotation_block=spec.rotation,
        nonuniform=spec.grid == "lloyd",
    )
    for name in spec.shapes(out):
        setattr(layer, name, tensors[name])
    if bias is not None:
        layer.bias = bias.to(tensors["outlier_weight"].dtype)
    layer.reset_layouts()
    return layer


class ShardedLayer(torch.nn.Module):
    """A fused layer (q/k/v, gate/up) whose shards cannot share one `SinkQuantLinear`: each shard's
    module on the same input, outputs side by side."""

    def __init__(self, shards: list[torch.nn.Module]) -> None:
        super().__init__()
        self.shards = torch.nn.ModuleList(shards)
        self.out_features = sum(shard.out_features for shard in shards)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([shard(x) for shard in self.shards], dim=-1)


def served_layer(spec: LayerSpec, tensors: dict[str, torch.Tensor], shard_sizes: list[int]):
    """sinkquant's module for vLLM's (possibly fused) layer of `shard_sizes` output rows: one
    `SinkQuantLinear` on the fused tensors, or, for a grid layer of several shards (each with its own
    levels), one per shard in a `ShardedLayer`. None where sinkquant is not importable."""
    if not spec.grid or len(shard_sizes) == 1:
        return sinkquant_layer(spec, tensors)
    shards, start = [], 0
    for index, rows in enumerate(shard_sizes):
        part = {}
        for name, tensor in tensors.items():
            if name in SHARED_ACROSS_SHARDS:
                part[name] = tensor
            elif name == "weight_levels":
                part[name] = tensor[index * LEVELS : (index + 1) * LEVELS]
            else:  # the output rows
                part[name] = tensor[start : start + rows]
        module = sinkquant_layer(replace(spec, out_features=rows), part)
        if module is None:
            return None
        shards.append(module)
        start += rows
    return ShardedLayer(shards)
