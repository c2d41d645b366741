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

import contextlib
import time
import warnings
from functools import partial

import torch
from torch import nn

from ..calibrate.report import Calibration, CalibrationReport
from ..errors import InputError
from ..format import LayerSpec
from ..format.primitives import complement_indices
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
from .gptq_sweep import GPTQResult, gptq_quantize_weight
from .hessian import HessianAccumulator
from .linear import SinkQuantLinear
from .weights import (
    QuantizeSummary,
    choose_outliers,
    compute_with,
    drive_layers,
    effective_weights,
    float_weight,
    rtn_linear,
    targets,
)

BATCH_SIZE = 8  # calibration samples per forward pass of one layer (the two-pass route)
#: the most memory one decoder layer's activations over all calibration tokens may take for the
#: one-pass route (estimate: see `_one_pass_fits`); wider layers or more tokens take the two-pass
#: route, whose memory is one batch's activations
ONE_PASS_BYTES = 4 << 30


def _gptq_weight(
    name: str, weight: torch.Tensor, hessian: torch.Tensor, idx: list[int], spec: LayerSpec,
    weights: WeightsSection, factor_cache: dict | None,
) -> GPTQResult | None:  # fmt: skip
    """GPTQ of one float weight [out, in] with the recipe's settings; None (with a warning) where it gave
    non-finite numbers, so the caller falls back to round-to-nearest."""
    opts = weights.gptq
    res = gptq_quantize_weight(
        weight, hessian, spec.bits, spec.group_size, idx, spec.symmetric,
        opts.block_size, opts.damping, opts.act_order, name, opts.clip_search, factor_cache,
        torch.float64 if opts.precision == "float64" else torch.float32, spec.log_scales, spec.grid,
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
    res = _gptq_weight(name, target, target_hessian, idx, spec, weights, factor_cache)
    if res is None:
        return None
    new = SinkQuantLinear.from_float(
        weight, bias, spec.bits, spec.group_size, idx, spec.symmetric,
        codes=res.codes, scale=res.scale, minimum=res.minimum, storage_dtype=storage,
        log_scales=spec.log_scales, rotation=states.get("rotation"), levels=res.levels,
    )  # fmt: skip
    return new.to(device)


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

    def step(index: int, layer: nn.Module, mine: dict[str, nn.Module]) -> dict:
        factors: dict = {}  # this layer's factorisations, shared by linears with one input
        # read before `_precision` casts the layer: an in-memory model's dtypes are its storage
        stored = {
            name: storage_dtype or host.storage_dtype(name + ".weight") or float_weight(module).dtype
            for name, module in mine.items()
        }
        with _precision(layer, weights.gptq.precision):
            quantize = partial(_quantize_linear, weights=weights, report=report, mode=mode,
                               factors=factors, stored=stored)  # fmt: skip
            layer_step = _one_pass_layer if merged is not None else _two_pass_layer
            return layer_step(layer, index, inputs, mine, make_observer, quantize, batch_size)

    with HiddenStore(inputs.hidden, host.memory_budget) as store:
        inputs.hidden = store
        drive_layers(
            host, chosen, summary, step, weights=weights, report=report, storage_dtype=storage_dtype,
            writer=writer, progress=progress, desc=f"GPTQ int{weights.bits}", fallback_note="GPTQ",
        )  # fmt: skip
    summary.seconds = time.perf_counter() - start
    return summary


def _quantize_linear(
    name: str, module: nn.Module, observer: HessianAccumulator | None, *, weights: WeightsSection,
    report: CalibrationReport | None, mode: str, factors: dict, stored: dict,
) -> tuple[SinkQuantLinear, list[int]]:  # fmt: skip
    """One linear of a decoder layer -> (its `SinkQuantLinear`, its outlier columns): GPTQ from the
    Hessian `observer` collected (sink tokens as `mode` says), or `rtn_linear` where no calibration
    input reached it or GPTQ gave non-finite numbers. `factors`: the layer's shared factorisations;
    `stored`: each linear's storage dtype."""
    idx = choose_outliers(name, float_weight(module), weights, report)
    storage = stored[name]
    if observer is None:
        warnings.warn(f"GPTQ: {name} saw no calibration input; using round-to-nearest", stacklevel=3)
        return rtn_linear(name, module, weights, report, storage)
    new = quantize_module(name, module, observer.hessian(mode), idx, weights, storage, factors)
    if new is None:
        return rtn_linear(name, module, weights, report, storage)
    return new, idx


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
