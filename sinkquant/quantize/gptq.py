"""GPTQ (Frantar et al. 2022) over a model: decoder layer by decoder layer, each linear's Hessian from the
calibration tokens that reach it, then its integers by GPTQ's column sweep (`gptq_sweep.py`, where the
algorithm and its per-weight choices are described; `gptq_quantize_weight` and `GPTQResult` are
importable from here too).

sinkquant's choices here:
* Outlier columns (`select_outliers`) are chosen per linear before the sweep and never quantized.
* H: each batch's xᵀx is a float32 matmul, summed into float64 (`hessian.py`). Tokens at the report's sink
  positions enter H as they are (`include`), not at all (`exclude`), or clipped per channel to the largest
  |x| of the other tokens (`cap`).
* `rotation` (recipe `weights.rotation`): each layer's kept columns are rotated first
  (`format/features/rotation.py`): GPTQ rounds W Q against Qᵀ H Q, and the layer rotates its inputs to match.
* A non-finite sweep result falls back to round-to-nearest with a warning, so no NaN weight is ever
  stored; so does a linear that saw no calibration input or sits outside the decoder layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..calibrate.report import Calibration, CalibrationReport
from ..format import LayerSpec
from ..format.primitives import complement_indices
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost, as_host
from .calibrated import BATCH_SIZE, calibrated_quantize_
from .gptq_sweep import GPTQResult, gptq_quantize_weight
from .linear import SinkQuantLinear
from .search_choice import judged_search
from .weights import (
    QuantizeSummary,
    choose_outliers,
    float_weight,
    rtn_linear,
)


def _gptq_weight(
    name: str, weight: torch.Tensor, hessian: torch.Tensor, idx: list[int], spec: LayerSpec,
    weights: WeightsSection, factor_cache: dict | None, ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GPTQResult | None:  # fmt: skip
    """GPTQ of one float weight [out, in] with the recipe's settings; None (with a warning) where it gave
    non-finite numbers, so the caller falls back to round-to-nearest."""
    opts = weights.gptq
    res = gptq_quantize_weight(
        weight, hessian, spec.bits, spec.group_size, idx, spec.symmetric,
        opts.block_size, opts.damping, opts.act_order, name, opts.clip_search, factor_cache,
        torch.float64 if opts.precision == "float64" else torch.float32, spec.log_scales, spec.grid, ranges,
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
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SinkQuantLinear | None:
    """One linear layer -> `SinkQuantLinear` by GPTQ; None where GPTQ gave non-finite numbers (with a
    warning: the caller rounds it to nearest, `weights.rtn_linear`).
    Each of the layer's features first prepares the weight and Hessian GPTQ rounds (`prepare`: a
    rotation rotates both). The column sweep runs on the CPU, beside the Hessian (thousands of small
    dependent steps); the result goes back to the module's device."""
    device = module.weight.device
    weight = float_weight(module).detach().cpu()
    bias = module.bias.detach().cpu() if module.bias is not None else None
    spec = weights.layer_spec(*weight.shape, len(idx), bias is not None, storage or weight.dtype)
    keep = complement_indices(torch.as_tensor(idx, dtype=torch.long).sort().values, weight.shape[1])
    target, target_hessian, states = weight, hessian, {}
    for feature in spec.features():
        target, target_hessian, state = feature.prepare(spec, target, target_hessian, keep, factor_cache)
        if state is not None:
            states[feature.field] = state
    res = _gptq_weight(name, target, target_hessian, idx, spec, weights, factor_cache, ranges)
    if res is None:
        return None
    new = SinkQuantLinear.from_float(
        weight, bias, spec.bits, spec.group_size, idx, spec.symmetric,
        codes=res.codes, scale=res.scale, minimum=res.minimum, storage_dtype=storage,
        log_scales=spec.log_scales, rotation=states.get("rotation"), levels=res.levels,
    )  # fmt: skip
    return new.to(device)


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
    """Quantize `model` (in memory, or a `ModelHost` streaming it) with GPTQ, decoder layer by decoder
    layer, on `calibration.samples` (`calibrated.calibrated_quantize_`: one pass per layer, "true
    sequential"); `writer` receives each layer once it is final. Linear layers outside the decoder
    layers get round-to-nearest. `storage_dtype` holds the outlier columns and bias (default: the dtype
    the source stored each weight in)."""
    choice = None  # where the rtn ranges GPTQ takes (gptq.ranges: rtn) come from the range search
    if weights.gptq.ranges == "rtn":
        model = as_host(model)
        choice = judged_search(model, weights, calibration, storage_dtype)
    quantize = partial(
        _quantize_linear, weights=weights, report=calibration.report,
        searched=None if choice is None else choice.searched,
    )  # fmt: skip
    summary = calibrated_quantize_(
        model, weights, calibration, quantize, algorithm="GPTQ", sink_tokens=weights.gptq.sink_tokens,
        sink_tokens_field="weights.gptq.sink_tokens",
        precision=weights.gptq.precision, storage_dtype=storage_dtype, progress=progress, writer=writer,
        batch_size=batch_size, one_pass=one_pass,
    )  # fmt: skip
    summary.range_search = None if choice is None else choice.to_dict()
    return summary


def _quantize_linear(
    name: str, module: nn.Module, hessian: torch.Tensor | None, factors: dict, storage: torch.dtype, *,
    weights: WeightsSection, report: CalibrationReport | None, searched: Callable[[str], bool] | None = None,
) -> tuple[SinkQuantLinear, list[int]]:  # fmt: skip
    """One linear of a decoder layer -> (its `SinkQuantLinear`, its outlier columns): GPTQ from its
    inputs' `hessian`, or `rtn_linear` where no calibration input reached it or GPTQ gave non-finite
    numbers. `factors`: the layer's shared factorisations."""
    idx = choose_outliers(name, float_weight(module), weights, report)
    if hessian is None:
        warnings.warn(f"GPTQ: {name} saw no calibration input; using round-to-nearest", stacklevel=3)
        return rtn_linear(name, module, weights, report, storage)
    ranges = None
    if weights.gptq.ranges == "rtn" and weights.bits == 4:  # the rtn algorithm's ranges, where it searches
        search = weights.clip_search and (searched is None or searched(name))
        rounded, _ = rtn_linear(
            name, module, weights.model_copy(update={"clip_search": search}), report, storage
        )
        ranges = (rounded.group_scale(), rounded.group_minimum())
    new = quantize_module(name, module, hessian, idx, weights, storage, factors, ranges)
    if new is None:
        return rtn_linear(name, module, weights, report, storage)
    return new, idx
