"""`quantize_(model, weights, report)`: swap linear layers for `SinkQuantLinear`, in place.

This is the "where" layer: it decides which modules are quantized and which input columns each keeps
at full precision (from the calibration report), then asks `SinkQuantLinear` (the storage) to do it.
It also holds what every weight algorithm shares: `drive_layers`, the one decoder-layer driver (walk
the layers, swap each result in, count it, hand the layer to the writer, then the linears outside the
layers), and `rtn_linear`, the one round-to-nearest of a linear, which is the `rtn` algorithm and the
fallback of every other one (a linear outside the decoder layers, one no calibration input reached, one
where an algorithm gave non-finite numbers): such a layer is rounded the same whatever the recipe's
algorithm.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architecture import is_linear, linears_outside_text_model, replace_module
from ..calibrate.report import CalibrationReport
from ..errors import InputError
from ..format import LayerSpec
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost, as_host
from .linear import SinkQuantLinear


@dataclass
class QuantizeSummary:
    modules: int = 0
    bits: int = 0
    group_size: int | None = None
    outlier_columns: int = 0
    input_columns: int = 0
    bytes_before: int = 0  # fp16 bytes of the quantized modules' weights
    bytes_after: int = 0  # bytes of every buffer of the quantized modules
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    layers: dict[str, dict] = field(default_factory=dict)  # name -> spec for the checkpoint config
    range_search: dict | None = None  # where RTN's int4 range search ran and why (search_choice.py)
    # RTN int4 with the range search on: kind of linear -> [groups whose range it moved, groups]
    range_moved: dict[str, list[int]] = field(default_factory=dict)

    def swap_in(
        self,
        model: nn.Module,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        new: SinkQuantLinear,
        outlier_idx: list[int],
    ) -> None:
        """Put `new` in place of the linear layer `name` (float `weight` [out, in], `bias`) and count it."""
        replace_module(model, name, new)
        self.modules += 1
        self.outlier_columns += len(outlier_idx)
        self.input_columns += weight.shape[1]
        self.bytes_before += weight.numel() * 2 + (bias.numel() * 2 if bias is not None else 0)
        self.bytes_after += new.nbytes()
        self.layers[name] = layer_spec(new)

    def count_moved(self, name: str, rounded: SinkQuantLinear, min_max: SinkQuantLinear) -> None:
        """Count the int4 groups of linear `name` whose range (scale or minimum) differs from min/max's."""
        moved = rounded.group_scale() != min_max.group_scale()
        if rounded.group_minimum() is not None:
            moved |= rounded.group_minimum() != min_max.group_minimum()
        counts = self.range_moved.setdefault(kind_of(name), [0, 0])
        counts[0] += int(moved.sum())
        counts[1] += moved.numel()


def kind_of(name: str) -> str:
    """The kind of a linear: the last component of its name (q_proj, down_proj, c_attn, ...)."""
    return name.rsplit(".", 1)[-1]


def matches(name: str, pattern: str) -> bool:
    """`re:<regex>` matches the whole qualified name; a plain name matches it or its last components."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def float_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] weight of an nn.Linear or a GPT-2 Conv1D (stored [in, out])."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@contextlib.contextmanager
def effective_weights(modules: dict[str, nn.Module], quantized: dict[str, SinkQuantLinear]):
    """The float modules compute with their quantized weights (float32 matmuls: faster than the int
    kernels on thousands of tokens, and the exact quantized weights), restored after the block."""
    saved = {name: module.weight.data for name, module in modules.items()}
    try:
        for name, module in modules.items():
            compute_with(module, quantized[name])
        yield
    finally:
        for name, module in modules.items():
            module.weight.data = saved[name]


def compute_with(module: nn.Module, quantized: SinkQuantLinear) -> None:
    """Point a float linear layer (nn.Linear or Conv1D, [in, out]) at the effective weights of its
    quantized replacement, in the float layer's dtype."""
    module.weight.data = effective_weight(module, quantized)


def effective_weight(module: nn.Module, quantized: SinkQuantLinear) -> torch.Tensor:
    """The weight a float linear layer (nn.Linear, or Conv1D stored [in, out]) holds to compute as its
    quantized replacement does, in the float layer's dtype and layout."""
    w = quantized.dequantized_weight().to(module.weight.dtype)
    return w if isinstance(module, nn.Linear) else w.t().contiguous()


def select_outliers(
    name: str, in_features: int, weights: WeightsSection, report: CalibrationReport | None
) -> list[int]:
    rule = weights.outliers
    if rule is None:
        return []
    if report is None:
        raise InputError(
            "keeping outlier input columns needs a calibration report; calibrate first or set weights.outliers: null"
        )
    stats = report.linear.get(name)
    if stats is None or stats.in_features != in_features:
        raise InputError(
            f"the calibration report has no input statistics for {name}; it was made for another model — re-run calibration"
        )
    if rule.select == "threshold":
        chosen = [c for c, v in enumerate(stats.max_abs) if v > rule.threshold]
        return chosen[: in_features // 2]
    return stats.outlier_channels(rule.fraction, rule.select)


def column_importance(
    name: str, report: CalibrationReport | None, sink_tokens: str = "include"
) -> torch.Tensor | None:
    """Mean x² per input column from calibration: how much a column's weight error costs. A row's output
    error on an input x is Σ_j e_j x_j, whose expected square is Σ_j e_j² E[x_j²] once the cross terms
    are dropped (the diagonal of GPTQ's Hessian), so E[x²], not (E|x|)², is the weight: it counts a
    column's rare large inputs at what they cost. With `sink_tokens="exclude"` the mean leaves out the
    sink positions' tokens (when calibration found any). A report written before the report kept
    sums of squares gives (mean |x|)², the weight used then."""
    stats = report.linear.get(name) if report is not None else None
    if stats is None:
        return None
    exclude = sink_tokens == "exclude"
    if stats.mean_square is not None:
        without = stats.mean_square_without_sinks if exclude else None
        return torch.tensor(stats.mean_square if without is None else without)
    without = stats.mean_abs_without_sinks if exclude else None
    return torch.tensor(stats.mean_abs if without is None else without).pow(2)


def targets(model: nn.Module, ignore: list[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """Linear modules to quantize and the names skipped; warns for an ignore pattern matching nothing.
    A multimodal model's linear layers outside its language model are skipped too (no text reaches them)."""
    chosen, skipped, used = {}, [], set()
    not_text = set(linears_outside_text_model(model))
    for name, module in model.named_modules():
        if not is_linear(module) or isinstance(module, SinkQuantLinear):
            continue
        if name in not_text:
            skipped.append(name)
            continue
        hit = [p for p in ignore if matches(name, p)]
        if hit:
            skipped.append(name)
            used.update(hit)
        else:
            chosen[name] = module
    for pattern in ignore:
        if pattern not in used and pattern not in ("re:.*wte$", "re:.*wpe$", "re:.*embed.*"):
            warnings.warn(
                f"ignore pattern {pattern!r} matches no linear module; check its spelling in weights.ignore",
                stacklevel=2,
            )
    return chosen, skipped


#: one decoder layer's quantization: (index, the layer, its target linears by name) -> each linear's
#: `SinkQuantLinear` and outlier columns
LayerStep = Callable[[int, nn.Module, dict[str, nn.Module]], dict[str, tuple[SinkQuantLinear, list[int]]]]


def rtn_linear(
    name: str, module: nn.Module, weights: WeightsSection, report: CalibrationReport | None,
    storage_dtype: torch.dtype | None,
) -> tuple[SinkQuantLinear, list[int]]:  # fmt: skip
    """Round-to-nearest of one linear (nn.Linear or Conv1D) as the `rtn` algorithm makes it: the report's
    outlier columns kept, each int4 group's range by the activation-weighted clip search, on the uniform
    grid (no rotation: its signs are GPTQ's), and its outlier columns."""
    weight = float_weight(module)
    idx = choose_outliers(name, weight, weights, report)
    new = SinkQuantLinear.from_float(
        weight, module.bias, weights.bits, weights.group, idx, weights.symmetric, storage_dtype=storage_dtype,
        importance=column_importance(name, report, weights.clip_sink_tokens), clip_search=weights.clip_search,
        log_scales=weights.log_scales,
    )  # fmt: skip
    return new.to(weight.device), idx


def drive_layers(
    host: ModelHost, chosen: dict[str, nn.Module], summary: QuantizeSummary, step: LayerStep, *,
    weights: WeightsSection, report: CalibrationReport | None, storage_dtype: torch.dtype | None,
    writer: LayerWriter | None, progress: bool, desc: str, fallback_note: str | None = None,
) -> None:  # fmt: skip
    """Quantize the `chosen` linears (popped as they are done) decoder layer by decoder layer with
    `step`, swap each in and count it in `summary`; hand each finished layer to `writer`. The linears
    left outside the decoder layers get `rtn_linear`, with a warning naming them after `fallback_note`
    (an algorithm that needs calibration inputs says it could not run there)."""
    for index in tqdm(range(len(host.layers)), desc=desc, unit="layer", disable=not progress):
        prefix = host.prefix(index)
        mine = {name: module for name, module in chosen.items() if name.startswith(prefix)}
        with host.layer(index) as layer:
            for name, (new, idx) in step(index, layer, mine).items():
                old = chosen.pop(name)
                summary.swap_in(host.model, name, float_weight(old), old.bias, new, idx)
            if writer is not None:
                writer.write_layer(host, index, layer)
    # the modules outside the layers are read only when one is quantized (else written as stored)
    with host.outside() if chosen else contextlib.nullcontext():
        for name, module in list(chosen.items()):
            if fallback_note is not None:
                warnings.warn(f"{fallback_note}: {name} is outside the decoder layers; using round-to-nearest",
                              stacklevel=3)  # fmt: skip
            storage = storage_dtype or host.storage_dtype(name + ".weight")
            new, idx = rtn_linear(name, module, weights, report, storage)
            chosen.pop(name)
            summary.swap_in(host.model, name, float_weight(module), module.bias, new, idx)
        if writer is not None:
            writer.write_outside(host)


@torch.no_grad()
def quantize_(
    model: nn.Module | ModelHost,
    weights: WeightsSection,
    report: CalibrationReport | None = None,
    *,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
    writer: LayerWriter | None = None,
    searched: Callable[[str], bool] | None = None,
) -> QuantizeSummary:
    """Replace every target linear layer of `model` (in memory, or a `ModelHost` streaming it) with a
    round-to-nearest `SinkQuantLinear` (`rtn_linear`), keeping the outlier columns `report` names,
    decoder layer by decoder layer; `writer` receives each layer once it is final. `storage_dtype` holds
    those columns and the bias (default: the dtype the source stored each weight in, so they stay
    bit-identical). `searched(name)`: whether `weights.clip_search` runs in that linear (default: in
    every one; the `rtn` algorithm passes the judgment of search_choice.py)."""
    if weights.algorithm != "rtn":  # not a silent RTN in place of what the section asks for
        raise InputError(
            f"quantize_ rounds to nearest, and this weights section asks for algorithm {weights.algorithm} "
            "(which rotation and grid need too); call sinkquant.quantize_weights(model, weights, calibration), "
            "which runs the algorithm the section names"
        )
    if weights.bits is None:
        return QuantizeSummary()
    start = time.perf_counter()
    host = as_host(model)
    chosen, skipped = targets(host.model, weights.ignore)
    summary = QuantizeSummary(bits=weights.bits, group_size=weights.group, skipped=skipped)

    plain = weights.model_copy(update={"clip_search": False})
    counts_moves = weights.bits == 4 and weights.clip_search

    def step(index: int, layer: nn.Module, linears: dict[str, nn.Module]) -> dict:
        done = {}
        for name, module in linears.items():
            storage = storage_dtype or host.storage_dtype(name + ".weight")
            searching = searched is None or searched(name)
            done[name] = rtn_linear(name, module, weights if searching else plain, report, storage)
            if counts_moves:  # against min/max's own rounding (one more plain rounding, no search)
                min_max = rtn_linear(name, module, plain, report, storage)[0] if searching else done[name][0]
                summary.count_moved(name, done[name][0], min_max)
        return done

    drive_layers(
        host, chosen, summary, step, weights=weights, report=report, storage_dtype=storage_dtype, writer=writer,
        progress=progress, desc=f"quantizing to int{weights.bits}",
    )  # fmt: skip
    summary.seconds = time.perf_counter() - start
    return summary


def choose_outliers(
    name: str, weight: torch.Tensor, weights: WeightsSection, report: CalibrationReport | None
) -> list[int]:
    """The input columns of layer `name` (float weight [out, in]) kept at full precision; a group
    wider than the layer is refused first."""
    in_features = weight.shape[1]
    if weights.group and weights.group > in_features:
        raise InputError(
            f"group_size {weights.group} exceeds the input width {in_features} of {name}; use a smaller group_size"
        )
    return select_outliers(name, in_features, weights, report)


def layer_spec(module: SinkQuantLinear) -> dict:
    """What the loader needs to rebuild an empty module of the right shapes (the checkpoint's dict)."""
    return module.spec.to_dict()


def empty_from_spec(spec: dict, device=None) -> SinkQuantLinear:
    """An empty layer from a checkpoint's layer dict (keys older formats lack take their defaults)."""
    return SinkQuantLinear(LayerSpec.from_dict(spec), device=device)
