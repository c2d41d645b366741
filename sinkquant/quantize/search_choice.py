"""Where RTN's int4 range search runs: per kind of linear (q_proj, gate_proj, ...), chosen by the
model's own output on calibration samples, min/max always a candidate (`weights.clip_search_judge:
kl`, the default).

Why not by the error of each layer: on Qwen2.5-Coder-0.5B the search lowers every q/k/v/o/gate/up
layer's output error on its calibration inputs (full second moment, sinks included) by 7-14% and the
MLP's output error too, yet in gate/up it raises the model's perplexity by 11% (WikiText-2 and held-out
C4 alike); on SmolLM2 the same search in the same layers is where the default's 5.5% over min/max comes
from (eval/results/probes/default_w4_cause_48.md). A squared error on calibration tokens does not tell
the two apart; the next-token distribution does.

The judgment: the first `JUDGE_SAMPLES` calibration samples walk the decoder layers once (a streamed
model's layers are read once), each layer computing, beside its float self, with the search everywhere,
with min/max everywhere, and with min/max in one kind at a time. The KL of each from the float model's
next-token distribution decides: a kind keeps min/max where that alone lowers the KL of the search
everywhere; the combination is checked in a second walk, and the lowest KL of {search everywhere,
min/max everywhere, the combination} is what the run quantizes with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibrate.report import Calibration, CalibrationReport
from ..evaluate.perplexity import score_window
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost, as_host
from ..stream.layerwise import LayerInputs, capture_inputs, head_logits, run_layer
from .weights import QuantizeSummary, effective_weight, kind_of, quantize_, rtn_linear, targets

#: calibration samples the judgment runs (2,048 tokens at the default 512): a few model passes in all
JUDGE_SAMPLES = 4


def judges_search(weights: WeightsSection) -> bool:
    """Whether `rtn` judges where its int4 range search runs (and so reads calibration samples)."""
    return weights.bits == 4 and weights.clip_search and weights.clip_search_judge == "kl"


@dataclass
class SearchChoice:
    """Which kinds keep min/max (`off`), and the KL from the float model of every configuration tried
    (nats per token, on the judge samples)."""

    off: frozenset[str] = frozenset()
    kl: dict[str, float] = field(default_factory=dict)

    def searched(self, name: str) -> bool:
        return kind_of(name) not in self.off

    def to_dict(self) -> dict:
        return {"min_max_in": sorted(self.off), "kl": {k: round(v, 6) for k, v in self.kl.items()}}


@torch.no_grad()
def choose_search(
    host: ModelHost,
    chosen: dict[str, nn.Module],
    weights: WeightsSection,
    report: CalibrationReport | None,
    input_ids: torch.Tensor,
    storage_dtype: torch.dtype | None = None,
) -> SearchChoice:
    """Judge the range search per kind of the `chosen` linears (see the module docstring)."""
    ids = input_ids[:JUDGE_SAMPLES]
    prefixes = tuple(host.prefix(i) for i in range(len(host.layers)))
    kinds = sorted({kind_of(n) for n in chosen if n.startswith(prefixes)})
    configs: dict[str, frozenset[str] | None] = {
        "float": None,
        "search": frozenset(),
        "min/max": frozenset(kinds),
        **{f"min/max in {k}": frozenset([k]) for k in kinds},
    }
    finals = _walk(host, chosen, weights, report, ids, configs, storage_dtype)
    reference = finals.pop("float")
    kl = _kls(host, ids, reference, finals)
    off = frozenset(k for k in kinds if kl[f"min/max in {k}"] < kl["search"])
    if 1 < len(off) < len(kinds):
        label = "min/max in " + ", ".join(sorted(off))
        configs[label] = off
        combined = _walk(host, chosen, weights, report, ids, {label: off}, storage_dtype)
        kl.update(_kls(host, ids, reference, combined))
    return SearchChoice(configs[min(kl, key=kl.get)], kl)


def judged_search(
    host: ModelHost, weights: WeightsSection, calibration: Calibration, storage_dtype: torch.dtype | None
) -> SearchChoice | None:
    """`choose_search` over every target linear of `host` where `weights` asks for the judgment and the
    run has samples; else None (the search wherever `weights.clip_search` says)."""
    if not judges_search(weights) or calibration.input_ids is None:
        return None
    with warnings.catch_warnings():  # the algorithm's own layer loop warns once for an unused ignore pattern
        warnings.simplefilter("ignore")
        chosen, _ = targets(host.model, weights.ignore)
    return choose_search(host, chosen, weights, calibration.report, calibration.input_ids, storage_dtype)


def rtn_quantize_(
    model: nn.Module | ModelHost,
    weights: WeightsSection,
    calibration: Calibration,
    *,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
    writer: LayerWriter | None = None,
) -> QuantizeSummary:
    """The `rtn` algorithm (the signature every weight algorithm shares, see `algorithms.py`): `quantize_`
    with the int4 range search where `choose_search` finds it helps (`weights.clip_search_judge: kl`,
    given calibration samples), else wherever `weights.clip_search` asks."""
    host = as_host(model)
    choice = judged_search(host, weights, calibration, storage_dtype)
    summary = quantize_(
        host, weights, calibration.report, storage_dtype=storage_dtype, progress=progress, writer=writer,
        searched=None if choice is None else choice.searched,
    )  # fmt: skip
    summary.range_search = None if choice is None else choice.to_dict()
    return summary


def _walk(host, chosen, weights, report, ids, configs, storage_dtype) -> dict[str, list[torch.Tensor]]:
    """The final hidden states of each configuration (None: the float weights; else the kinds that
    keep min/max), every configuration run layer by layer on the same captured inputs."""
    with host.outside("input"):
        inputs = capture_inputs(host.model, ids, 1, host.device)
    states = {label: list(inputs.hidden) for label in configs}
    variants = {True: weights.model_copy(update={"clip_search": False}), False: weights}  # keeps min/max?

    def uses(name: str) -> set[bool]:
        """Which candidates of linear `name` some configuration computes with (only those are built)."""
        return {kind_of(name) in off for off in configs.values() if off is not None}

    for index in range(len(host.layers)):
        prefix = host.prefix(index)
        with host.layer(index) as layer:
            mine = {n: m for n, m in chosen.items() if n.startswith(prefix)}
            saved = {n: m.weight.data for n, m in mine.items()}
            candidates = {  # each built and dequantized once per layer, whatever the configurations
                (n, plain): effective_weight(
                    m, rtn_linear(n, m, variants[plain], report, storage_dtype or host.storage_dtype(n + ".weight"))[0]
                )
                for n, m in mine.items()
                for plain in uses(n)
            }  # fmt: skip
            try:
                for label, off in configs.items():
                    for n, m in mine.items():
                        m.weight.data = saved[n] if off is None else candidates[(n, kind_of(n) in off)]
                    run_layer(layer, LayerInputs(states[label], inputs.calls), index)
            finally:
                for n, m in mine.items():
                    m.weight.data = saved[n]
    return states


def _kls(
    host: ModelHost, ids: torch.Tensor, reference: list[torch.Tensor], finals: dict[str, list[torch.Tensor]]
) -> dict[str, float]:
    """Mean KL(p_float || p) per predicted token of each configuration (the evaluator's `score_window`);
    the float model's logits computed once per sample."""
    totals = {label: [0.0, 0.0, 0, 0] for label in finals}
    with host.outside("output"):
        for i, ref_hidden in enumerate(reference):
            ref_logits = head_logits(host.model, ref_hidden).logits
            for label, hidden in finals.items():
                score_window(
                    head_logits(host.model, hidden[i]).logits, ids[i : i + 1], ref_logits, totals[label]
                )
    return {label: t[1] / max(1, t[3]) for label, t in totals.items()}
