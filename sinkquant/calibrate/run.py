"""One calibration pass: run real text through the model with the collectors attached."""

from __future__ import annotations

import os
import time
from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architecture import decoder_layers
from ..calibration_settings import CalibrationSection
from ..data import CalibrationSamples, calibration_samples
from ..stream.host import ModelHost, ResidentModel
from ..stream.layerwise import capture_inputs, head_logits, run_layer
from ..stream.store import HiddenStore
from .collectors import ActivationCollector, AttentionCollector, LinearInputCollector
from .report import (
    CalibrationReport,
    CalibrationSettings,
    ContentSink,
    LayerActivation,
    LinearStats,
    MassiveReport,
    SinkReport,
    sink_rows,
)


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def _per_channel(values: torch.Tensor | None) -> list[float] | None:
    """A per-channel statistic as the report stores it (4 significant digits); None stays None."""
    return None if values is None else [_sig(float(v), 4) for v in values]


def has_learned_sink_logits(model: nn.Module) -> bool:
    """Architectures such as gpt-oss give each head a learned "sink" logit instead of a sink token."""
    return any(name.endswith(".sinks") or name.endswith("attn.sinks") for name, _ in model.named_parameters())


@torch.no_grad()
def calibrate(
    model: nn.Module | ModelHost,
    tokenizer,
    dataset: str | os.PathLike | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
    data: CalibrationSamples | None = None,
    memory_budget: int | None = None,
) -> CalibrationReport:
    """Measure sinks, massive activations and linear-layer input outliers on real text.

    `model`: a model in memory, or a `ModelHost` (a model streamed from disk layer by layer).
    `dataset`: a local .txt/.jsonl/.parquet file, a hub name, or None for the embedded C4 slice;
    `dataset`, `samples`, `seq_len`, `seed` are the recipe's `calibration:` section (`CalibrationSection`,
    whose defaults fill what is not given: 32 samples of 512 tokens, seed 0).
    `data`: samples already drawn for this run (then `dataset`, `samples`, `seq_len` and `seed` are
    not used). The samples walk the decoder layers together, one layer at a time and one sample at a
    time within it, with eager attention (switched on for the pass and restored after): memory is one
    layer, every sample's hidden state (spilled to disk past `memory_budget` bytes) and one sample's
    attention map.
    """
    settings = settings or CalibrationSettings()
    host = model if isinstance(model, ModelHost) else ResidentModel(model)
    model = host.model
    start = time.perf_counter()
    if data is None:
        c = CalibrationSection.resolve(
            dataset=None if dataset is None else str(dataset), samples=samples, seq_len=seq_len, seed=seed
        )
        data = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
    seed = data.seed
    ids = data.input_ids
    attention, activations, linears = _collect(host, ids, settings, progress, memory_budget)
    flagged, occurrences, max_later_share = _content_shares(attention, ids, data.bos, settings)
    sinks = _sink_report(model, tokenizer, attention, flagged, occurrences, settings)
    sinks.max_later_share = _sig(max_later_share, 4)
    massive = _massive_report(tokenizer, activations, settings)
    linear = _linear_report(linears, settings, sink_rows(sinks, massive, settings))
    return CalibrationReport(
        model=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        model_type=str(getattr(model.config, "model_type", "")),
        num_layers=len(decoder_layers(model)),
        num_heads=attention.num_heads,
        tokens=int(ids.numel()),
        samples=int(ids.shape[0]),
        seq_len=int(ids.shape[1]),
        dataset=data.source,
        seed=seed,
        bos=data.bos,
        dtype=str(host.dtype).replace("torch.", ""),
        sinks=sinks,
        massive=massive,
        linear=linear,
        settings=settings,
        elapsed_s=round(time.perf_counter() - start, 2),
    )


def _collect(
    host: ModelHost,
    ids: torch.Tensor,
    settings: CalibrationSettings,
    progress: bool,
    memory_budget: int | None,
):
    """Run the samples through the model with the collectors attached; returns the attention,
    activation and linear-input collectors, their hooks removed."""
    model = host.model
    previous_attn = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    attention = AttentionCollector(model, settings.epsilon, settings.track_positions, settings.min_queries)
    activations = ActivationCollector(model)
    linears = LinearInputCollector(model, seq_len=ids.shape[1], track=settings.track_positions)
    attention.begin(ids.shape[0], ids.shape[1])

    def before(sample: int) -> None:
        attention.sample = sample
        activations.input_ids, activations.sample_offset = ids[sample : sample + 1], sample

    try:
        with host.outside("input"):
            inputs = capture_inputs(model, ids, 1, host.device)
        with HiddenStore(inputs.hidden, memory_budget) as store:
            inputs.hidden = store
            for index in tqdm(
                range(len(host.layers)), desc="calibrating", unit="layer", disable=not progress
            ):
                with host.layer(index) as layer:
                    run_layer(layer, inputs, index, before=before)
            with host.outside(
                "output"
            ):  # the LM head's input statistics, on the last token as generation sees it
                for sample in range(ids.shape[0]):
                    head_logits(model, store[sample], logits_to_keep=1)
    finally:
        for collector in (attention, activations, linears):
            collector.remove()
        if previous_attn:
            model.set_attn_implementation(previous_attn)
    return attention, activations, linears


def _content_shares(
    attention: AttentionCollector, ids: torch.Tensor, bos: bool, settings: CalibrationSettings
):
    """Per token, the attention shares at which it drew at least `settings.content_share` (content
    sinks), how often each token occurred, and the largest share of any later position."""
    flagged: dict[int, list[float]] = defaultdict(list)
    occurrences: dict[int, int] = defaultdict(int)
    max_later_share = 0.0
    shares = attention.shares()
    scorable = attention.scorable_positions(ids.shape[1])
    for sample in range(ids.shape[0]):
        share = shares[sample]
        for pos in range(1 if not bos else 2, ids.shape[1]):
            if not scorable[pos]:
                break
            token = int(ids[sample, pos])
            occurrences[token] += 1
            max_later_share = max(max_later_share, float(share[pos]))
            if share[pos] >= settings.content_share:
                flagged[token].append(float(share[pos]))
    return flagged, occurrences, max_later_share


def _sink_report(model, tokenizer, attention, flagged, occurrences, settings) -> SinkReport:
    means = attention.head_means()  # [layers, heads, track]
    pairs = means.shape[0] * means.shape[1]
    score = {
        k: _sig(float((means[:, :, k] > settings.epsilon).sum()) / pairs, 4) for k in range(means.shape[2])
    }
    positions = [k for k, s in score.items() if s >= settings.sink_share]
    content = [
        ContentSink(
            token=tokenizer.decode([tok]),
            token_id=tok,
            score=_sig(sum(shares) / len(shares), 4),
            count=len(shares),
            occurrences=occurrences[tok],
        )
        for tok, shares in flagged.items()
        if len(shares) >= settings.content_min_count
    ]
    content.sort(key=lambda c: (-c.count, -c.score))
    learned = has_learned_sink_logits(model)
    found = bool(positions or content)
    if learned:
        note = "the architecture has learned sink logits per head; it needs no sink tokens"
    elif not found:
        note = (
            f"no attention sinks: no position draws mean attention > {settings.epsilon} from "
            f"{settings.sink_share:.0%} of (layer, head) pairs"
        )
    else:
        note = ""
    return SinkReport(
        positions=positions,
        score=score,
        content=content,
        head_scores=[[_sig(float(v), 4) for v in row] for row in means[:, :, 0]],
        found=found,
        note=note,
    )


def _massive_report(tokenizer, acts: ActivationCollector, settings) -> MassiveReport:
    layers: list[LayerActivation] = []
    dims: set[int] = set()
    first_layer = None
    for idx, (value, dim, pos, _sample, token) in enumerate(acts.best):
        median = sorted(acts.medians[idx])[len(acts.medians[idx]) // 2] if acts.medians[idx] else 0.0
        threshold = settings.massive_threshold(median)
        per_dim = acts.dim_max[idx]
        massive_here = [int(d) for d in torch.nonzero(per_dim > threshold).flatten()]
        if massive_here and first_layer is None:
            first_layer = idx
        dims.update(massive_here)
        top = torch.topk(per_dim, min(4, per_dim.numel())).indices.tolist()
        layers.append(
            LayerActivation(
                layer=idx,
                max_abs=_sig(value),
                dim=dim,
                position=pos,
                token=tokenizer.decode([token]) if token >= 0 else "",
                ratio_to_median=_sig(value / median if median > 0 else float("inf")),
                median_abs=_sig(median),
                position0_max_abs=_sig(acts.pos0[idx][0]),
                position0_dim=acts.pos0[idx][1],
                top_dims=[int(d) for d in top],
            )
        )
    return MassiveReport(dims=sorted(dims), layers=layers, first_layer=first_layer)


def _linear_report(
    linears: LinearInputCollector, settings, sink_positions: list[int]
) -> dict[str, LinearStats]:
    report = {}
    for name, peak in linears.max_abs.items():
        k = min(settings.top_channels, peak.numel())
        top = torch.topk(peak, k)
        report[name] = LinearStats(
            in_features=linears.in_features[name],
            top_channels=[int(c) for c in top.indices],
            top_max_abs=[_sig(float(v)) for v in top.values],
            max_abs=_per_channel(peak),
            mean_abs=_per_channel(linears.mean_abs(name)),
            mean_abs_without_sinks=_per_channel(linears.mean_abs_without(name, sink_positions)),
            mean_square=_per_channel(linears.mean_square(name)),
            mean_square_without_sinks=_per_channel(linears.mean_square_without(name, sink_positions)),
        )
    return report
