"""GPTQ (Frantar et al. 2022): error-compensating int4/int8 weights, outlier input columns kept exact.

Per linear layer, with H = 2/n Σ x xᵀ over the calibration tokens that reach it, GPTQ quantizes the
input columns one at a time and spreads each column's rounding error over the columns not yet
quantized, through the upper Cholesky factor U of H⁻¹ (err = (w - q) / U[j, j]; W[:, j:] -= err U[j, j:]),
in blocks of `block_size` columns with the updates to later blocks applied lazily.

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
* H: each batch's xᵀx is a float32 matmul, summed into float64; Cholesky runs in float64, the column
  loop in float32. Tokens at the report's sink positions enter H as they are (`include`), not at all
  (`exclude`), or clipped per channel to the largest |x| of the other tokens (`cap`).
* `rotation` (recipe `weights.rotation`): each layer's kept columns are rotated first
  (`rotation.py`): GPTQ rounds W Q against Qᵀ H Q, and the layer rotates its inputs to match.
* Damping adds `damping * mean(diag H)` to the diagonal; a dead input (diag 0) then has only that and
  passes no error on (its weights are kept, not zeroed). The mean is over the quantized columns
  only: the outlier columns' huge diag(H) would otherwise inflate it. A failed Cholesky is retried
  with 10x the damping (up to 4 times) with a warning naming the layer; a non-finite result falls
  back to round-to-nearest with a warning, so no NaN weight is ever stored (see `hessian.py`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.report import Calibration, CalibrationReport
from ..errors import InputError
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost, as_host
from ..stream.layerwise import (
    capture_inputs,
    computing_in,
    merge_batches,
    observe_inputs,
    run_layer,
)
from ..stream.store import HiddenStore
from .grid import fit_levels, round_to_levels
from .hessian import HessianAccumulator, inverse_hessian_factor
from .linear import SinkQuantLinear
from .primitives import complement_indices
from .rotation import InputRotation, draw_signs
from .schemes import WeightScheme, scheme_for
from .weights import QuantizeSummary, choose_outliers, compute_with, effective_weights, float_weight, targets

BATCH_SIZE = 8  # calibration samples per forward pass of one layer (the two-pass route)
#: the most memory one decoder layer's activations over all calibration tokens may take for the
#: one-pass route (estimate: see `_one_pass_fits`); wider layers or more tokens take the two-pass
#: route, whose memory is one batch's activations
ONE_PASS_BYTES = 4 << 30


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
        log_scales: bool = False, levels: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.scheme, self.symmetric, self.clip_search = scheme, symmetric, clip_search
        self.log_scales = log_scales
        self.levels = levels  # int4 on a non-uniform grid (grid.py); None: the scheme's uniform grid
        self.scale = torch.zeros(rows, groups, dtype=scheme.scale_dtype)
        self.minimum = torch.zeros(rows, groups, dtype=torch.bfloat16)

    def fit(self, group: int, values: torch.Tensor, importance: torch.Tensor) -> None:
        """Parameters of `group` from its current weights [out, n]; `importance` [n] = diag(H)."""
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

    def _round(self, values, scale, minimum) -> tuple[torch.Tensor, torch.Tensor]:
        if self.levels is None:
            return self.scheme.round_to_range(values, scale, minimum)
        return round_to_levels(values, scale, minimum, self.levels)

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
    grid: str = "uniform",
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

    `grid` (int4, asymmetric): "lloyd" rounds to the layer's own 16 levels (`grid.fit_levels` on the
    kept columns of `weight`) instead of the uniform grid."""
    out_f, in_f = weight.shape
    nonuniform = grid == "lloyd"
    if nonuniform and (bits != 4 or symmetric or log_scales):
        raise ValueError("grid 'lloyd' is for asymmetric int4 groups without log_scales")
    idx = torch.as_tensor(outlier_idx, dtype=torch.long).sort().values
    keep = complement_indices(idx, in_f)
    n_keep = keep.numel()
    scheme = scheme_for(bits)
    gs = scheme.group_size(n_keep, group_size)
    diag = hessian.diagonal()[keep]
    order = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n_keep)
    cols = keep[order]  # processing order
    group_of = (order // gs).tolist()
    levels = fit_levels(weight[:, keep], gs) if nonuniform else None
    quant = _Quantizer(scheme, symmetric, out_f, -(-n_keep // gs), clip_search, log_scales, levels)
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


def _rtn(weight, bias, weights: WeightsSection, idx, storage, rotation=None) -> SinkQuantLinear:
    return SinkQuantLinear.from_float(
        weight, bias, weights.bits, weights.group, idx, weights.symmetric, storage_dtype=storage,
        log_scales=weights.log_scales, rotation=rotation,
    )  # fmt: skip


def _gptq_weight(
    name: str, weight: torch.Tensor, hessian: torch.Tensor, idx: list[int], weights: WeightsSection,
    factor_cache: dict | None,
) -> GPTQResult | None:  # fmt: skip
    """GPTQ of one float weight [out, in] with the recipe's settings; None (with a warning) where it gave
    non-finite numbers, so the caller falls back to round-to-nearest."""
    opts = weights.gptq
    res = gptq_quantize_weight(
        weight, hessian, weights.bits, weights.group, idx, weights.symmetric,
        opts.block_size, opts.damping, opts.act_order, name, opts.clip_search, factor_cache,
        torch.float64 if opts.precision == "float64" else torch.float32, weights.log_scales, weights.grid,
    )  # fmt: skip
    if not all(bool(torch.isfinite(t.float()).all()) for t in (res.weight, res.scale)):
        warnings.warn(f"GPTQ gave non-finite weights for {name}; using round-to-nearest", stacklevel=3)
        return None
    return res


def quantize_module(
    name: str,
    module: nn.Module,
    hessian: torch.Tensor,
    idx: list[int],
    weights: WeightsSection,
    storage: torch.dtype,
    factor_cache: dict | None = None,
) -> SinkQuantLinear:
    """One linear layer -> `SinkQuantLinear` by GPTQ (round-to-nearest if GPTQ gave non-finite numbers).
    The column sweep runs on the CPU, beside the Hessian (thousands of small dependent steps); the
    result goes back to the module's device."""
    device = module.weight.device
    weight = float_weight(module).detach().cpu()
    bias = module.bias.detach().cpu() if module.bias is not None else None
    rotation, target, target_hessian = None, weight, hessian
    if weights.rotation is not None:
        keep = complement_indices(torch.as_tensor(idx, dtype=torch.long).sort().values, weight.shape[1])
        rotation = InputRotation(draw_signs(weight.shape[1], keep.numel()), weights.rotation)
        target = rotation.rotate_columns(weight, keep).float()
        target_hessian = _rotated_hessian(hessian, rotation, keep, factor_cache)
    res = _gptq_weight(name, target, target_hessian, idx, weights, factor_cache)
    if res is None:
        return _rtn(weight, bias, weights, idx, storage, rotation).to(device)
    new = SinkQuantLinear.from_float(
        weight, bias, weights.bits, weights.group, idx, weights.symmetric,
        codes=res.codes, scale=res.scale, minimum=res.minimum, storage_dtype=storage,
        log_scales=weights.log_scales, rotation=rotation, levels=res.levels,
    )  # fmt: skip
    return new.to(device)


def _rotated_hessian(
    hessian: torch.Tensor, rotation: InputRotation, keep: torch.Tensor, cache: dict | None
) -> torch.Tensor:
    """Qᵀ H Q (`InputRotation.rotate_hessian`) in H's dtype, computed once for the linears that share H
    and outlier columns (q/k/v, gate/up): `cache` holds H beside it, so H's id stays its own."""
    key = ("rotated", id(hessian), keep.numpy().tobytes(), rotation.block)
    if cache is None or key not in cache:
        rotated = rotation.rotate_hessian(hessian, keep).to(hessian.dtype)
        if cache is None:
            return rotated
        cache[key] = (hessian, rotated)
    return cache[key][1]


def _sink_positions(report: CalibrationReport | None, sink_tokens: str) -> list[int]:
    if report is None:
        if sink_tokens != "include":
            raise InputError(
                f"weights.gptq.sink_tokens: {sink_tokens} needs a calibration report (its sink positions); "
                "calibrate first or use sink_tokens: include"
            )
        return []
    return list(report.sinks.positions)


@torch.no_grad()
def gptq_quantize_(
    model: nn.Module | ModelHost,
    weights: WeightsSection,
    calibration: Calibration,
    *,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
    writer: LayerWriter | None = None,
    batch_size: int = BATCH_SIZE,
    one_pass: bool | None = None,
) -> QuantizeSummary:
    """Quantize `model` (in memory, or a `ModelHost` streaming it) with GPTQ, decoder layer by
    decoder layer, on `calibration.samples`; `writer` receives each layer once it is final.

    Each decoder layer runs once over all calibration tokens (batches merged into one call): a linear
    layer is quantized when its input arrives, from the Hessian of that input, and computes with its
    quantized weights from then on, so later linear layers of the same layer see the quantized
    outputs ("true sequential") and the layer's output is already the next layer's input. That is one
    forward pass per layer instead of two. `one_pass=None` does so while the layer's activations for all
    tokens fit `ONE_PASS_BYTES` and the host's memory budget (else, or with `one_pass=False`, or when
    the layers' arguments cannot be merged: two passes over batches of `batch_size` samples, Hessians
    from the float layer, then the quantized layer re-run). Linear layers outside the decoder layers
    get round-to-nearest. `storage_dtype` holds the outlier columns and bias (default: the dtype the
    source stored each weight in)."""
    if weights.bits is None:
        return QuantizeSummary()
    if calibration.samples is None:
        raise InputError("GPTQ needs calibration samples (its Hessians come from the layers' inputs)")
    start = time.perf_counter()
    host = as_host(model)
    report = calibration.report
    chosen, skipped = targets(host.model, weights.ignore)
    sinks = _sink_positions(report, weights.gptq.sink_tokens)
    summary = QuantizeSummary(bits=weights.bits, group_size=weights.group, skipped=skipped)
    ids = calibration.samples.input_ids
    with host.outside("input"):
        inputs = capture_inputs(host.model, ids, batch_size, host.device)
    wide = weights.gptq.precision == "float64"
    merged = merge_batches(inputs) if _one_pass_fits(ids, chosen, one_pass, host, wide) else None
    if merged is not None:
        inputs = merged
    mode = weights.gptq.sink_tokens

    def make_observer(name: str, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features, sinks, track_max=mode == "cap")

    def quantize(
        name: str, module: nn.Module, observer: HessianAccumulator | None, factors: dict, stored: dict
    ):
        idx = choose_outliers(name, float_weight(module), weights, report)
        storage = stored[name]
        if observer is None:
            warnings.warn(f"GPTQ: {name} saw no calibration input; using round-to-nearest", stacklevel=3)
            return _rtn(float_weight(module), module.bias, weights, idx, storage), idx
        hessian = observer.hessian(mode)
        return quantize_module(name, module, hessian, idx, weights, storage, factors), idx

    with HiddenStore(inputs.hidden, host.memory_budget) as store:
        inputs.hidden = store
        for index in tqdm(range(len(host.layers)), desc=f"GPTQ int{weights.bits}", unit="layer",
                          disable=not progress):  # fmt: skip
            prefix = host.prefix(index)
            mine = {n: m for n, m in chosen.items() if n.startswith(prefix)}
            factors: dict = {}  # this layer's factorisations, shared by linears with one input
            step = _one_pass_layer if merged is not None else _two_pass_layer
            with host.layer(index) as layer:
                # read before `_precision` casts the layer: an in-memory model's dtypes are its storage
                stored = {
                    name: storage_dtype or host.storage_dtype(name + ".weight") or float_weight(module).dtype
                    for name, module in mine.items()
                }
                with _precision(layer, weights.gptq.precision):
                    done = step(layer, index, inputs, mine, make_observer,
                                partial(quantize, factors=factors, stored=stored), batch_size)  # fmt: skip
                for name, (new, idx) in done.items():
                    old = chosen.pop(name)
                    summary.swap_in(host.model, name, float_weight(old), old.bias, new, idx)
                if writer is not None:
                    writer.write_layer(host, index, layer)
    with host.outside() if chosen else contextlib.nullcontext():  # read only when one is quantized
        for name, module in chosen.items():  # outside the decoder layers: no calibration inputs
            warnings.warn(f"GPTQ: {name} is outside the decoder layers; using round-to-nearest", stacklevel=2)
            weight = float_weight(module)
            idx = choose_outliers(name, weight, weights, report)
            new = _rtn(
                weight, module.bias, weights, idx, storage_dtype or host.storage_dtype(name + ".weight")
            )
            summary.swap_in(host.model, name, weight, module.bias, new, idx)
        if writer is not None:
            writer.write_outside(host)
    summary.seconds = time.perf_counter() - start
    return summary


def _precision(layer: nn.Module, precision: str):
    """The layer computing in float64 for `precision: float64` (its hidden states stay float32)."""
    return computing_in(layer, torch.float64) if precision == "float64" else contextlib.nullcontext()


def _one_pass_layer(layer, index, inputs, mine, make_observer, quantize, batch_size) -> dict:
    """One call over all tokens: each linear is quantized as its input arrives and computes with its
    quantized weights in the same forward, whose output is the next layer's input."""
    done: dict[str, tuple[SinkQuantLinear, list[int]]] = {}

    def arrive(name, module, observer):
        done[name] = quantize(name, module, observer)
        compute_with(module, done[name][0])

    with observe_inputs(mine, make_observer, split=batch_size, on_arrival=arrive):
        run_layer(layer, inputs, index)
    for name in mine.keys() - done.keys():  # never called in this layer's forward
        done[name] = quantize(name, mine[name], None)
    return done


def _two_pass_layer(layer, index, inputs, mine, make_observer, quantize, batch_size) -> dict:
    """Batch by batch: Hessians from the float layer, then the layer re-run with quantized weights."""
    with observe_inputs(mine, make_observer) as observers:
        run_layer(layer, inputs, index, keep=False)
    done = {name: quantize(name, m, observers.get(name)) for name, m in mine.items()}
    del observers
    with effective_weights(mine, {n: new for n, (new, _) in done.items()}):
        run_layer(layer, inputs, index)
    return done


def _one_pass_fits(
    ids: torch.Tensor, chosen: dict[str, nn.Module], one_pass: bool | None, host: ModelHost,
    float64: bool = False,
) -> bool:  # fmt: skip
    """Whether to merge the calibration batches: one layer's activations for every token at once,
    estimated as 4 float32 copies of the widest linear output per token (twice the bytes in float64),
    must fit ONE_PASS_BYTES and the host's memory budget."""
    if one_pass is not None:
        return one_pass
    widest = max((m.out_features if isinstance(m, nn.Linear) else m.weight.shape[1] for m in chosen.values()),
                 default=0)  # fmt: skip
    return ids.numel() * widest * (8 if float64 else 4) * 4 <= min(ONE_PASS_BYTES, host.memory_budget)
