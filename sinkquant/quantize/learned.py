"""Learned rounding: int4 codes and group ranges chosen per decoder layer by sign-gradient descent on the
layer's output error (the idea of AutoRound and OmniQuant), made sink-aware.

Per decoder layer, on the calibration tokens entering it (the outputs of the layers already quantized):

1. the float layer's outputs are the targets;
2. every int4 linear of the layer starts from round-to-nearest with the activation-weighted clip search
   (the RTN default), expressed as learnable numbers: a rounding offset V in [-0.5, 0.5] per weight and
   a shrink factor in [0.5, 1] for each end of each group's range. With `learned.start: gptq` the
   numbers rounded are each linear's GPTQ result instead (Hessians from the float layer's inputs, the
   recipe's `gptq` settings): those lie on GPTQ's grid, so the start is GPTQ's codes and ranges, and
   each code may move one step either way;
3. `iters` steps, each on `batch_samples` samples: the layer runs with the fake-quantized weights
   (rounding passed straight through), the mean squared error against the targets is taken over the
   tokens outside the sink rows (`learned.sink_tokens: exclude`, the default: a sink token's output
   carries the massive activations, whose error would otherwise outweigh every other token's), and each
   parameter moves by `lr` against the sign of its gradient; the parameters of the step with the least
   loss are kept (the step's own batch, as AutoRound does);
4. the learned codes, scales and minima become the layer's `SinkQuantLinear`s, and the layer re-runs
   with their dequantized weights (float matmuls: the int kernels are slower on thousands of tokens)
   to give the next layer its inputs.

Only the batches the steps visit (drawn before the first step) need the float layer's outputs.
The outlier input columns stay out of the rounding: they are exact in the fake-quantized weight as in
the stored one. Scales and minima are rounded to bfloat16 inside the loss (straight through), so the
stored layer computes exactly what was optimised. Linear layers outside the decoder layers, int8
weights and symmetric grids use the same parameters (symmetric: one shrink factor); layers with no
calibration input keep their round-to-nearest start.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architecture import hidden_of
from ..calibrate.report import Calibration
from ..errors import InputError
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost, as_host
from ..stream.layerwise import capture_inputs, run_layer
from ..stream.store import HiddenStore
from .gptq import GPTQResult, gptq_layer_results
from .linear import SinkQuantLinear
from .primitives import _grouped_view, complement_indices, quantize_grouped_clipped
from .weights import (
    QuantizeSummary,
    choose_outliers,
    column_importance,
    effective_weights,
    float_weight,
    targets,
)

LEVELS = 15  # int4


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _bf16_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.bfloat16).float() - x).detach()


class _LearnedWeight(nn.Module):
    """One linear layer's int4 weight as learnable rounding offsets and range shrink factors."""

    def __init__(self, weight: torch.Tensor, idx: list[int], group: int | None, symmetric: bool,
                 importance: torch.Tensor | None, outlier_dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__()
        out_f, in_f = weight.shape
        self.idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        self.keep = complement_indices(self.idx, in_f)
        self.n_keep = self.keep.numel()
        self.group = group or self.n_keep
        self.symmetric = symmetric
        self.shape = weight.shape
        kept = weight.float()[:, self.keep]
        self.register_buffer("grouped", _grouped_view(kept, self.group))  # [out, groups, group]
        self.register_buffer("outliers", weight[:, self.idx].to(outlier_dtype).float())
        # the start: the clip search's range, as shrink factors of the plain min/max range
        _, scale, minimum = quantize_grouped_clipped(
            kept, 4, self.group, None if importance is None else importance.float()[self.keep],
            symmetric=symmetric, param_dtype=torch.bfloat16,
        )  # fmt: skip
        scale = scale.float()
        g = self.grouped
        if symmetric:
            full = g.abs().amax(-1) / 7
            up = (scale / full.clamp(min=1e-12)).clamp(0.5, 1.0)
            low = up
        else:
            lo, hi = g.amin(-1), g.amax(-1)
            width = (hi - lo).clamp(min=1e-12)
            ratio = (scale * LEVELS / width).clamp(0.5, 1.0)  # the clip search shrinks both ends alike
            up, low = ratio, ratio
        self.up = nn.Parameter(up.clone())
        self.low = nn.Parameter(low.clone())
        self.offset = nn.Parameter(torch.zeros_like(g))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, minimum) [out, groups] as they will be stored (bfloat16, straight through)."""
        g = self.grouped
        if self.symmetric:
            scale = (g.abs().amax(-1) * self.up / 7).clamp(min=1e-8)
            scale = _bf16_ste(scale)
            return scale, -8 * scale
        lo, hi = g.amin(-1) * self.low, g.amax(-1) * self.up
        scale = _bf16_ste(((hi - lo) / LEVELS).clamp(min=1e-8))
        return scale, _bf16_ste(lo)

    def codes(self, scale: torch.Tensor, minimum: torch.Tensor, exact: bool = False) -> torch.Tensor:
        x = (self.grouped - minimum[..., None]) / scale[..., None] + self.offset
        rounded = torch.round(x) if exact else _round_ste(x)
        return rounded.clamp(0, LEVELS)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight [out, in]: learned codes on the kept columns, exact outliers."""
        scale, minimum = self.grid()
        values = self.codes(scale, minimum) * scale[..., None] + minimum[..., None]
        kept = values.reshape(self.shape[0], -1)[:, : self.n_keep]
        full = torch.empty(self.shape, dtype=kept.dtype)
        full = full.index_copy(1, self.keep, kept)
        return full.index_copy(1, self.idx, self.outliers) if self.idx.numel() else full

    @torch.no_grad()
    def clamp_(self) -> None:
        self.offset.clamp_(-0.5, 0.5)
        self.up.clamp_(0.5, 1.0)
        self.low.clamp_(0.5, 1.0)

    @torch.no_grad()
    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [out, kept], scale bf16, minimum bf16): what `SinkQuantLinear` stores."""
        scale, minimum = self.grid()
        scale, minimum = scale.to(torch.bfloat16), minimum.to(torch.bfloat16)
        codes = self.codes(scale.float(), minimum.float(), exact=True)
        codes = codes.reshape(self.shape[0], -1)[:, : self.n_keep].to(torch.uint8)
        return codes, scale, minimum


def _token_mask(samples: int, seq: int, rows: list[int]) -> torch.Tensor:
    mask = torch.ones(samples, seq, 1)
    for p in rows:
        if p < seq:
            mask[:, p] = 0
    return mask


def _tune_layer(layer: nn.Module, learners: dict[str, _LearnedWeight], prefix: str, hidden: list,
                calls: list, mask_rows: list[int], opts, generator: torch.Generator) -> float:  # fmt: skip
    """Sign-gradient descent on the learners of one decoder layer, whose outputs should match the float
    layer's on the same inputs; returns the best step's loss as a fraction of its batch's loss at the
    start."""
    names = {name[len(prefix) :] + ".weight": learner for name, learner in learners.items()}
    masks: dict[tuple[int, int], torch.Tensor] = {}  # by batch shape: built once per layer, not per step

    # which batch each step sees, drawn first: only those batches need targets and start losses
    order = torch.randint(len(hidden), (opts.iters,), generator=generator).tolist()
    wanted: dict[int, torch.Tensor] = {}  # the float layer's outputs

    def loss_on(b: int) -> torch.Tensor:
        h, (args, kwargs) = hidden[b], calls[b]
        overrides = {key: learner() for key, learner in names.items()}
        out = hidden_of(torch.func.functional_call(layer, overrides, (h, *args), kwargs))
        shape = (h.shape[0], h.shape[1])
        if shape not in masks:
            masks[shape] = _token_mask(*shape, mask_rows)
        mask = masks[shape]
        return (((out - wanted[b]) ** 2) * mask).sum() / (mask.sum() * out.shape[-1])

    with torch.no_grad():
        for b in sorted(set(order)):
            args, kwargs = calls[b]
            wanted[b] = hidden_of(layer(hidden[b], *args, **kwargs))
        start = {b: float(loss_on(b)) for b in wanted}
    params = [p for learner in learners.values() for p in learner.parameters()]
    # batches differ in how hard they are, so a step is judged by its loss relative to its batch's
    # loss at the start (1.0: no better than round-to-nearest)
    best_ratio, best = 1.0, [p.detach().clone() for p in params]
    for b in order:
        loss = loss_on(b)
        ratio = float(loss.detach()) / max(start[b], 1e-30)
        if ratio < best_ratio:
            best_ratio, best = ratio, [p.detach().clone() for p in params]
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= opts.lr * p.grad.sign()
        for learner in learners.values():
            learner.clamp_()
    with torch.no_grad():
        for p, value in zip(params, best, strict=True):
            p.copy_(value)
    return best_ratio


def learned_quantize_(
    model: nn.Module | ModelHost,
    weights: WeightsSection,
    calibration: Calibration,
    *,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
    writer: LayerWriter | None = None,
) -> QuantizeSummary:
    """Quantize `model` (in memory, or a `ModelHost` streaming it) by learned rounding, decoder layer by
    decoder layer, on `calibration.samples`; see the module docstring."""
    if weights.bits is None:
        return QuantizeSummary()
    if weights.bits != 4:
        raise InputError("weights.algorithm: learned is for int4 (bits: 4); use rtn or gptq for int8")
    if calibration.samples is None:
        raise InputError("learned rounding needs calibration samples (its loss is each layer's output)")
    start = time.perf_counter()
    host = as_host(model)
    report = calibration.report
    opts = weights.learned
    chosen, skipped = targets(host.model, weights.ignore)
    rows = report.sink_rows if (report is not None and opts.sink_tokens == "exclude") else []
    summary = QuantizeSummary(bits=4, group_size=weights.group, skipped=skipped)
    ids = calibration.samples.input_ids
    with torch.no_grad(), host.outside("input"):
        inputs = capture_inputs(host.model, ids, opts.batch_samples, host.device)
    generator = torch.Generator().manual_seed(0)  # which batch each step sees: the same every run

    def learner_for(
        name: str, module: nn.Module, start: tuple[GPTQResult, list[int]] | None
    ) -> tuple[_LearnedWeight, torch.Tensor, list[int], torch.dtype]:
        weight = float_weight(module).detach().cpu()
        storage = storage_dtype or host.storage_dtype(name + ".weight")
        importance = column_importance(name, report, weights.clip_sink_tokens)
        if start is None:
            idx = choose_outliers(name, weight, weights, report)
            rounded = weight
        else:  # GPTQ's weights lie on its grid: rounding them starts at GPTQ's codes and ranges
            result, idx = start
            rounded = result.weight
        learner = _LearnedWeight(rounded, idx, weights.group, weights.symmetric, importance, storage)
        return learner, weight, idx, storage

    with HiddenStore(inputs.hidden, host.memory_budget) as store:
        inputs.hidden = store
        for index in tqdm(range(len(host.layers)), desc="learned int4", unit="layer", disable=not progress):
            prefix = host.prefix(index)
            mine = {n: m for n, m in chosen.items() if n.startswith(prefix)}
            with host.layer(index) as layer:
                starts = {}
                if opts.start == "gptq" and mine:
                    starts = gptq_layer_results(layer, index, inputs, mine, weights, report)
                learners, found = {}, {}  # found: name -> (float weight, outlier columns, storage dtype)
                for name, module in mine.items():
                    learners[name], *found[name] = learner_for(name, module, starts.pop(name, None))
                if learners:
                    for p in layer.parameters():
                        p.requires_grad_(False)
                    with torch.enable_grad():
                        ratio = _tune_layer(layer, learners, prefix, inputs.hidden, inputs.calls[index],
                                            rows, opts, generator)  # fmt: skip
                    summary.layer_error_ratios.append(ratio)
                built = {}
                for name, learner in learners.items():
                    weight, idx, storage = found[name]
                    codes, scale, minimum = learner.stored()
                    built[name] = SinkQuantLinear.from_float(
                        weight, mine[name].bias, 4, weights.group, idx, weights.symmetric,
                        codes=codes, scale=scale, minimum=minimum, storage_dtype=storage,
                    )  # fmt: skip
                # the next layer's inputs, through the quantized weights (float matmuls, as GPTQ does)
                with torch.no_grad(), effective_weights(mine, built):
                    run_layer(layer, inputs, index)
                for name, new in built.items():
                    module = chosen.pop(name)
                    weight, idx, _ = found[name]
                    summary.swap_in(host.model, name, weight, module.bias, new, idx)
                if writer is not None:
                    writer.write_layer(host, index, layer)
    with host.outside() if chosen else contextlib.nullcontext():
        for name, module in chosen.items():  # outside the decoder layers: the round-to-nearest start
            warnings.warn(
                f"learned: {name} is outside the decoder layers; using round-to-nearest", stacklevel=2
            )
            weight = float_weight(module)
            idx = choose_outliers(name, weight, weights, report)
            new = SinkQuantLinear.from_float(
                weight, module.bias, 4, weights.group, idx, weights.symmetric,
                storage_dtype=storage_dtype or host.storage_dtype(name + ".weight"),
                importance=column_importance(name, report, weights.clip_sink_tokens), clip_search=True,
            )  # fmt: skip
            summary.swap_in(host.model, name, weight, module.bias, new, idx)
        if writer is not None:
            writer.write_outside(host)
    summary.seconds = time.perf_counter() - start
    return summary
