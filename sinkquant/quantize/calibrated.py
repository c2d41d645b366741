"""The layer loop of the weight algorithms that read each linear's inputs (GPTQ: its Hessian), apart from
what such an algorithm does with them (`gptq.py`: GPTQ's layer step; `gptq_sweep.py`: its column sweep).
One decoder layer at a time, on the run's calibration samples; each linear's H = 2/n Σ x xᵀ
over the tokens that reach it (`hessian.py`), with the report's sink positions included, dropped or
capped as the algorithm's `sink_tokens` says.

Each decoder layer runs once over all calibration tokens (batches merged into one call): a linear
layer is quantized when its input arrives, from the H of that input, and computes with its quantized
weights from then on, so later linear layers of the same layer see the quantized outputs ("true
sequential") and the layer's output is already the next layer's input. That is one forward pass per
layer instead of two. `one_pass=None` does so while the layer's activations for all tokens fit
`ONE_PASS_BYTES` and the host's memory budget (else, or with `one_pass=False`, or when the layers'
arguments cannot be merged: two passes over batches of `batch_size` samples, H from the float layer,
then the quantized layer re-run). Linear layers outside the decoder layers get `rtn_linear`
(`weights.drive_layers`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..calibrate.report import Calibration, CalibrationReport
from ..errors import InputError
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost, as_host
from ..stream.layerwise import capture_inputs, computing_in, merge_batches, observe_inputs, run_layer
from ..stream.store import HiddenStore
from .hessian import HessianAccumulator
from .linear import SinkQuantLinear
from .weights import QuantizeSummary, compute_with, drive_layers, effective_weights, float_weight, targets

BATCH_SIZE = 8  # calibration samples per forward pass of one layer (the two-pass route)
#: the most memory one decoder layer's activations over all calibration tokens may take for the
#: one-pass route (estimate: see `_one_pass_fits`); wider layers or more tokens take the two-pass
#: route, whose memory is one batch's activations
ONE_PASS_BYTES = 4 << 30


#: one linear from its inputs: (name, module, H or None where no calibration input reached it, the
#: layer's cache shared by its linears, the storage dtype) -> (its `SinkQuantLinear`, outlier columns)
LinearFromInputs = Callable[
    [str, nn.Module, "torch.Tensor | None", dict, torch.dtype], tuple[SinkQuantLinear, list[int]]
]


@torch.no_grad()
def calibrated_quantize_(
    model: nn.Module | ModelHost,
    weights: WeightsSection,
    calibration: Calibration,
    quantize_linear: LinearFromInputs,
    *,
    algorithm: str,
    sink_tokens: str = "include",
    sink_tokens_field: str = "sink_tokens",
    precision: str = "float32",
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
    writer: LayerWriter | None = None,
    batch_size: int = BATCH_SIZE,
    one_pass: bool | None = None,
) -> QuantizeSummary:
    """Quantize `model` (in memory, or a `ModelHost` streaming it) decoder layer by decoder layer on
    `calibration.samples` (see the module docstring), each linear by `quantize_linear` from its inputs'
    H; `writer` receives each layer once it is final. `algorithm` names it in progress and messages;
    `sink_tokens` is how H takes the sink positions' tokens (`include`, `exclude`, `cap`; the recipe's
    `sink_tokens_field` sets it, named in messages); `precision`
    "float64" runs each layer in float64. `storage_dtype` holds the outlier columns and bias (default:
    the dtype the source stored each weight in)."""
    if weights.bits is None:
        return QuantizeSummary()
    if calibration.samples is None:
        raise InputError(f"{algorithm} needs calibration samples (it reads each linear layer's inputs)")
    start = time.perf_counter()
    host = as_host(model)
    report = calibration.report
    chosen, skipped = targets(host.model, weights.ignore)
    sinks = _sink_positions(report, sink_tokens, sink_tokens_field)
    summary = QuantizeSummary(bits=weights.bits, group_size=weights.group, skipped=skipped)
    ids = calibration.samples.input_ids
    with host.outside("input"):
        inputs = capture_inputs(host.model, ids, batch_size, host.device)
    merged = (
        merge_batches(inputs) if _one_pass_fits(ids, chosen, one_pass, host, precision == "float64") else None
    )
    if merged is not None:
        inputs = merged

    def make_observer(name: str, in_features: int) -> HessianAccumulator:
        return HessianAccumulator(in_features, sinks, track_max=sink_tokens == "cap")

    def arrive(
        name: str, module: nn.Module, observer: HessianAccumulator | None, *, cache: dict, stored: dict
    ):
        hessian = None if observer is None else observer.hessian(sink_tokens)
        return quantize_linear(name, module, hessian, cache, stored[name])

    def step(index: int, layer: nn.Module, mine: dict[str, nn.Module]) -> dict:
        # read before `_precision` casts the layer: an in-memory model's dtypes are its storage
        stored = {
            name: storage_dtype or host.storage_dtype(name + ".weight") or float_weight(module).dtype
            for name, module in mine.items()
        }
        with _precision(layer, precision):
            quantize = partial(arrive, cache={}, stored=stored)  # the cache: this layer's shared work
            layer_step = _one_pass_layer if merged is not None else _two_pass_layer
            return layer_step(layer, index, inputs, mine, make_observer, quantize, batch_size)

    with HiddenStore(inputs.hidden, host.memory_budget) as store:
        inputs.hidden = store
        drive_layers(
            host, chosen, summary, step, weights=weights, report=report, storage_dtype=storage_dtype,
            writer=writer, progress=progress, desc=f"{algorithm} int{weights.bits}", fallback_note=algorithm,
        )  # fmt: skip
    summary.seconds = time.perf_counter() - start
    return summary


def _sink_positions(report: CalibrationReport | None, sink_tokens: str, field: str) -> list[int]:
    if report is None:
        if sink_tokens != "include":
            raise InputError(
                f"{field}: {sink_tokens} needs a calibration report (its sink positions); "
                "calibrate first or use sink_tokens: include"
            )
        return []
    return list(report.sinks.positions)


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
