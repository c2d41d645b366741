"""GPTQ's column sweep (Frantar et al. 2022): error-compensating int4/int8 integers for one weight, outlier
input columns kept exact. The layer driver (`gptq.py`) collects each linear's Hessian and calls it.

With H = 2/n Σ x xᵀ over the calibration tokens that reach the layer, GPTQ quantizes the input columns one
at a time and spreads each column's rounding error over the columns not yet quantized, through the upper
Cholesky factor U of H⁻¹ (err = (w - q) / U[j, j]; W[:, j:] -= err U[j, j:]), in blocks of `block_size`
columns with the updates to later blocks applied lazily.

sinkquant's choices:
* Outlier columns (`select_outliers`) are never quantized; GPTQ runs on the kept columns with H
  restricted to them, so the outlier columns come out bit-identical.
* Groups are the static groups of `SinkQuantLinear`: `group_size` consecutive kept columns. A group's
  scale/minimum are computed when the first of its columns is reached in processing order, from the
  group's *current* weights (every error update so far included, pending block updates too). Without
  act_order that is the usual GPTQ; with act_order (columns by decreasing diag(H)) it is the "static
  groups" variant, with parameters from updated rather than original weights.
* `clip_search=True` (recipe `gptq.clip_search`) shrinks each group's range per row by the factor of a small
  grid that minimises the diag(H)-weighted rounding error of the group's current weights.
* Parameters and codes use the primitives' formulas (`quantize_grouped` / `quantize_int8_per_channel`,
  scales rounded to bf16 for int4), so `SinkQuantLinear` stores exactly what GPTQ chose.
* Cholesky runs in float64, the column loop in float32 (float64 with `precision: float64`).
* Damping adds `damping * mean(diag H)` to the diagonal; a dead input (diag 0) then has only that and
  passes no error on (its weights are kept, not zeroed). The mean is over the quantized columns
  only: the outlier columns' huge diag(H) would otherwise inflate it. A failed Cholesky is retried
  with 10x the damping (up to 4 times) with a warning naming the layer (see `hessian.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format import LayerSpec
from ..format.primitives import complement_indices
from ..format.schemes import WeightScheme, scheme_for
from .hessian import inverse_hessian_factor


@dataclass
class GPTQResult:
    """Integers for the kept columns in natural order, in `SinkQuantLinear.from_float`'s format, and
    `weight`: float32 [out, in], the effective weight (dequantized kept columns, outlier columns)."""

    codes: torch.Tensor  # uint8 [out, in_kept] (bits 4) | int8 [out, in_kept] (bits 8)
    scale: torch.Tensor  # bf16 [out, groups] (bits 4) | float32 [out] (bits 8)
    minimum: torch.Tensor | None  # bf16 [out, groups] (bits 4)
    weight: torch.Tensor
    damping: float  # the damping fraction that was used (after retries)
    levels: torch.Tensor | None = None  # float32 [16]: the layer's non-uniform int4 grid (grid.py)


_CLIP_GRID = [1.0 - 0.025 * k for k in range(9)]  # shrink factors of the range tried by clip search


class _Quantizer:
    """Per-group parameters and per-column rounding, by the weight scheme's own formulas. With
    `clip_search`, a group's range is shrunk by the factor in `_CLIP_GRID` (per row) that minimises the
    rounding error weighted by diag(H) (the GPTQ authors' "mse" option, with H as the weight)."""

    def __init__(
        self, scheme: WeightScheme, symmetric: bool, rows: int, groups: int, clip_search: bool = False,
        log_scales: bool = False, rounding: Callable | None = None,
    ) -> None:  # fmt: skip
        self.scheme, self.symmetric, self.clip_search = scheme, symmetric, clip_search
        self.log_scales = log_scales
        # (values, scale, minimum) -> (codes, dequantized): a feature's (a grid's levels) or the scheme's
        self._round = rounding or scheme.round_to_range
        self.scale = torch.zeros(rows, groups, dtype=scheme.scale_dtype)
        self.minimum = torch.zeros(rows, groups, dtype=torch.bfloat16)
        self.preset = False

    def set_ranges(self, scale: torch.Tensor, minimum: torch.Tensor) -> None:
        """Fix every group's parameters [out, groups] before the sweep (`fit` then keeps them)."""
        self.scale.copy_(scale)
        self.minimum.copy_(minimum)
        self.preset = True

    def fit(self, group: int, values: torch.Tensor, importance: torch.Tensor) -> None:
        """Parameters of `group` from its current weights [out, n]; `importance` [n] = diag(H)."""
        if self.preset:
            return
        best, best_err = self.scheme.group_range(values, self.symmetric, self.log_scales), None
        for shrink in _CLIP_GRID[1:] if self.clip_search else []:
            if best_err is None:
                best_err = self._error(values, best, importance)
            cand = self.scheme.group_range(values * shrink, self.symmetric, self.log_scales)
            err = self._error(values, cand, importance)
            better = err < best_err
            best = tuple(
                None if c is None else torch.where(better, c, b) for c, b in zip(cand, best, strict=True)
            )
            best_err = torch.where(better, err, best_err)
        self.scale[:, group] = best[0]
        if best[1] is not None:
            self.minimum[:, group] = best[1]

    def _error(self, values, params, importance) -> torch.Tensor:
        return ((self._round(values, *params)[1] - values) ** 2 * importance).sum(1)

    def round(self, w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """w [out] float32 -> (codes [out] float, dequantized [out] float32)."""
        return self._round(w, self.scale[:, group], self.minimum[:, group])

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.scheme.group_params(self.scale, self.minimum)


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    outlier_idx: torch.Tensor | list[int] = (),
    symmetric: bool = False,
    block_size: int = 128,
    damping: float = 0.01,
    act_order: bool = False,
    name: str = "weight",
    clip_search: bool = False,
    factor_cache: dict | None = None,
    sweep_dtype: torch.dtype = torch.float32,
    log_scales: bool = False,
    grid: str | None = None,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GPTQResult:
    """GPTQ on weight [out, in] with hessian [in, in] (see the module docstring for every choice).

    `factor_cache`: a dict shared by calls whose layers share one Hessian tensor (q/k/v, gate/up):
    the factorisation of H restricted to the same columns is computed once.

    bits 4: groups of `group_size` consecutive kept columns (None: one group per row), asymmetric
    min/max or `symmetric`; bits 8: symmetric per row (`group_size` ignored).

    `sweep_dtype`: the precision of the column sweep and of the factor it reads (float64 for
    `precision: float64`, so its products' last bits, which depend on the BLAS's code path, stay far
    below anything that decides a code).

    `log_scales` (int4): each group's scale is fitted on the log grid a log-scale layer stores.

    `grid` (int4, asymmetric; the layer spec's field, None: uniform): "lloyd" rounds to the layer's own
    16 levels (`features.grid.fit_levels` on the kept columns of `weight`) instead of the uniform grid.
    The layer's features are its spec's: a combination no layer can store is refused here, and each
    feature's `rounding` hook may replace the scheme's rounding.

    `ranges` (int4): every group's (scale, minimum) [out, groups], fixed before the sweep instead of
    fitted when it reaches the group (recipe `gptq.ranges: rtn`)."""
    out_f, in_f = weight.shape
    idx = torch.as_tensor(outlier_idx, dtype=torch.long).sort().values
    spec = LayerSpec(in_f, out_f, bits, group_size, idx.numel(), False, symmetric=symmetric,
                     log_scales=log_scales, grid=grid)  # fmt: skip
    keep = complement_indices(idx, in_f)
    n_keep = keep.numel()
    scheme = scheme_for(bits)
    gs = scheme.group_size(n_keep, group_size)
    diag = hessian.diagonal()[keep]
    order = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n_keep)
    cols = keep[order]  # processing order
    group_of = (order // gs).tolist()
    rounding, levels = None, None
    for feature in spec.features():
        feature_rounding, state = feature.rounding(spec, scheme, weight[:, keep], gs)
        if feature_rounding is not None:
            rounding, levels = feature_rounding, state
    quant = _Quantizer(scheme, symmetric, out_f, -(-n_keep // gs), clip_search, log_scales, rounding)
    if ranges is not None:
        quant.set_ranges(*ranges)
    # the factorisation is a few large BLAS calls (all threads); the column sweep is many small ops
    key = (id(hessian), cols.numpy().tobytes(), damping, n_keep)
    if factor_cache is not None and key in factor_cache:
        upper, used = factor_cache[key][1:]
    else:
        upper, used = inverse_hessian_factor(hessian, damping, name, n_keep, columns=cols)
        upper = upper.to(sweep_dtype)  # the sweep's precision; a float64 factor is not kept beside it
        if factor_cache is not None:
            factor_cache[key] = (hessian, upper, used)  # holds `hessian`, so its id stays its own
    source = weight.detach().to(sweep_dtype)
    importance = hessian.diagonal()[cols].to(sweep_dtype)

    with _one_thread():
        result, codes = _gptq_columns(source[:, cols].clone(), upper, group_of, quant, block_size, importance)
        kept_values, codes = _natural(result, order), _natural(codes, order)
    effective = source.clone()
    effective[:, keep] = kept_values
    scale, minimum = quant.params()
    return GPTQResult(codes.to(scheme.code_dtype), scale, minimum, effective, used, levels)


def _natural(columns: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[out, n] in processing order -> natural column order."""
    natural = torch.empty_like(columns)
    natural[:, order] = columns
    return natural


def _gptq_columns(
    w: torch.Tensor, u: torch.Tensor, group_of: list[int], quant: _Quantizer, block_size: int, importance
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over the columns of w [out, n] (in processing order; updated in place) with the
    upper factor u [n, n] and diag(H) `importance` [n]. Returns (dequantized weights, codes as floats)."""
    members: dict[int, list[int]] = {}
    for pos, g in enumerate(group_of):
        if g >= 0:
            members.setdefault(g, []).append(pos)
    n = w.shape[1]
    codes = torch.zeros_like(w)
    result = torch.empty_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block = w[:, i1:i2].clone()
        err = torch.zeros_like(block)
        for i in range(i2 - i1):
            pos, g = i1 + i, group_of[i1 + i]
            col = block[:, i]
            if g < 0:
                q = col  # an outlier column absorbing error: kept in full precision
            else:
                if members[g][0] == pos:
                    quant.fit(g, _current(members[g], w, block, err, u, i1, i2, i), importance[members[g]])
                codes[:, pos], q = quant.round(col, g)
            result[:, pos] = q
            e = (col - q) / u[pos, pos]
            block[:, i:].addr_(e, u[pos, pos:i2], alpha=-1)
            err[:, i] = e
        w[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1)
    return result, codes


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of small ops, each too small to split: extra threads only add
    synchronisation, so it runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _current(positions: list[int], w, block, err, u, i1: int, i2: int, i: int) -> torch.Tensor:
    """The current weights [out, len(positions)] of not-yet-quantized `positions`: those inside the
    block from `block`, later ones from `w` less the pending updates of the block's first `i` columns."""
    pos = torch.tensor(positions)
    inside = pos < i2
    values = torch.empty(w.shape[0], pos.numel(), dtype=w.dtype)
    values[:, inside] = block[:, pos[inside] - i1]
    later = pos[~inside]
    if later.numel():
        values[:, ~inside] = w[:, later] - err[:, :i] @ u[i1 : i1 + i, later]
    return values
