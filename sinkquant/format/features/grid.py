"""`weights.grid: lloyd`, non-uniform int4 grids: 16 levels per layer placed where its weights are, instead of evenly.

A uniform int4 group spends its 16 levels evenly between the group's minimum and maximum. The weights
inside a group are far from uniform: most sit near the middle, few near the ends (after an input
rotation, close to Gaussian). With `weights.grid: lloyd` each layer gets its own 16 levels in units of
the group's step, `levels[0] = 0` and `levels[15] = 15`, so a group's range, scale and minimum mean what
they mean on the uniform grid and its two ends stay exact. The 14 inner levels come from Lloyd-Max
(k-means in one dimension, endpoints fixed) on the layer's own weights, each normalised to its group's
range; each value counts with its group's squared range, since that is what an error in the normalised
position costs. A code then stands for `levels[code] * scale + minimum`.

The layer stores the 16 levels as one float32 buffer (`weight_levels`, 64 bytes a layer), each on
bf16's grid so that a cast of the model to any float dtype keeps them exact. PyTorch's
integer kernels assume the uniform grid; sinkquant's fused kernel looks each code up in the levels
(bf16 activations on CPU), and every other call computes through the layer's dequantized weight.

The feature (`Grid`) stores the levels, refuses exports (compressed-tensors stores only the uniform
grid) and needs sinkquant's own layer wherever it runs.
"""

from __future__ import annotations

from functools import partial

import torch

from .base import BufferSpecs, LayerFeature, register_feature

LEVELS = 16  # int4
_ROUNDS = 50  # Lloyd iterations; the levels move by less than 1e-4 of a step well before this


def uniform_levels() -> torch.Tensor:
    """The uniform grid in the same units: 0, 1, ..., 15."""
    return torch.arange(LEVELS, dtype=torch.float32)


def fit_levels(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [16] levels in units of the group's step (0 and 15 fixed) for weight [out, n], groups of
    `group_size` consecutive columns (the last one may be shorter), each group's range its min to max."""
    out, n = weight.shape
    w = weight.detach().to(torch.float64)
    positions, weights = [], []
    for start in range(0, n, group_size):
        group = w[:, start : start + group_size]
        low, high = group.amin(1, keepdim=True), group.amax(1, keepdim=True)
        span = high - low
        live = span[:, 0] > 0  # a constant group is exact on any grid
        if not bool(live.any()):
            continue
        positions.append(((group[live] - low[live]) / span[live]).flatten())
        weights.append((span[live] ** 2).expand(-1, group.shape[1]).flatten())
    levels = torch.linspace(0.0, 1.0, LEVELS, dtype=torch.float64)
    if not positions:
        return uniform_levels()
    t, cost = torch.cat(positions), torch.cat(weights)
    for _ in range(_ROUNDS):
        bucket = torch.bucketize(t, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, bucket, cost)
        moment = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, bucket, cost * t)
        inner = mass[1:-1] > 0  # an empty cell keeps its level
        update = levels[1:-1].clone()
        update[inner] = moment[1:-1][inner] / mass[1:-1][inner]
        levels[1:-1] = update  # centroids of ordered cells stay ordered
    # on bf16's grid: whatever dtype a loader casts the buffer to (bf16, fp16, float32), the levels the
    # codes were chosen against come back exactly
    return (levels * (LEVELS - 1)).to(torch.bfloat16).to(torch.float32)


def round_to_levels(
    values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, levels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest level of each value in its group's range: values [out] or [out, n] against scale and
    minimum [out] -> (codes as float, their values). The counterpart of the uniform grid's
    `round((v - minimum) / scale)`."""
    s, m = (t.float()[:, None] if values.dim() == 2 else t.float() for t in (scale, minimum))
    bounds = (levels[1:] + levels[:-1]) / 2
    code = torch.bucketize(((values - m) / s).contiguous(), bounds.to(values.dtype))
    return code.to(values.dtype), levels.to(values.dtype)[code] * s + m


def expand_codes(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """int4 codes -> their levels (float32), to be scaled and shifted like uniform codes."""
    return levels.float()[codes.long()]


@register_feature
class Grid(LayerFeature):
    field = "grid"
    since = 6
    int4_only = True
    export_refusal = ("int4 layers on a non-uniform grid", "compressed-tensors stores only the uniform grid")
    pytorch_kernels = False  # they assume the uniform grid
    shares_fused_layer = False  # each shard has its own levels
    excludes = {  # noqa: RUF012 (a read-only declaration)
        "symmetric": "a grid keeps each group's bf16 minimum and scale as they are",
        "log_scales": "a grid keeps each group's bf16 minimum and scale as they are",
    }

    def extra_buffers(self, spec, shards: int) -> BufferSpecs:
        return {"weight_levels": ((LEVELS * shards,), torch.float32)}  # one table per fused shard

    def describe(self, spec) -> str:
        return f"{spec.grid} grid"

    def rounding(self, spec, scheme, kept_weight, group_size):
        levels = fit_levels(kept_weight, group_size)
        return partial(round_to_levels, levels=levels), levels

    def check_rtn(self, spec) -> None:
        raise ValueError("a non-uniform grid takes the codes chosen on it (GPTQ with grid 'lloyd')")

    def spec_value(self, state):
        return "lloyd"  # the one non-uniform grid

    def write(self, module, state) -> None:
        module.weight_levels.copy_(state)
