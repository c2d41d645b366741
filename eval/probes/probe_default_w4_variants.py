"""Issue 48, the cause at the model's output: which part of the default W4's range search moves a
model's perplexity, by turning it off (or changing its weighting) one part at a time.

One calibration (the default recipe's 32 x 512 tokens), then each variant quantizes a copy of the
float32 model with the default recipe's int4 g128 RTN and 1% outlier columns (fake-quantized: each
linear computes with its `SinkQuantLinear`'s dequantized weight, which is the weight sinkquant stores),
and is scored on the first --tokens of WikiText-2 test in windows of 1024 (`sinkquant.evaluate`).
Variants:
  * min/max: no search;
  * default: each group's shrink (1.0 down to 0.6) by the error weighted with mean x² over the
    non-sink tokens;
  * sinks in: the same weighted with mean x² over every token;
  * search off in one kind of layer (q/k/v, o, gate/up, down) or in one third of the depth.

    python -m eval.probes.probe_default_w4_variants --model PATH [--tokens 8192] [--only a,b]
writes eval/results/probes/default_w4_variants_<model>.md.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from eval.lib.common import PROBE_RESULTS, SHARED, WIKITEXT, machine, model_name, write_report
from sinkquant import calibrate
from sinkquant.calibrate.report import CalibrationReport
from sinkquant.data import calibration_samples
from sinkquant.evaluate import evaluate
from sinkquant.format.primitives import complement_indices, dequantize_grouped, quantize_grouped_clipped
from sinkquant.loading import open_model
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.quantize.weights import choose_outliers, column_importance, targets
from sinkquant.recipe import Recipe

KINDS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def _layer(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else -1


def sink_balanced(name: str, report, tokens: int) -> torch.Tensor:
    """Mean x² over the ordinary tokens plus mean x² over the sink tokens, each normalised to a mean of 1:
    the sink tokens' error weighs as much as all the other tokens' together."""
    stats = report.linear[name]
    sinks = tokens // 512 * len(report.sink_rows)
    every = torch.tensor(stats.mean_square, dtype=torch.float64)
    ordinary = torch.tensor(stats.mean_square_without_sinks, dtype=torch.float64)
    sink = ((every * tokens - ordinary * (tokens - sinks)) / sinks).clamp(min=0)
    return ordinary / ordinary.mean() + sink / sink.mean()


def magnitude_weighted(
    weight: torch.Tensor, importance: torch.Tensor, idx: list[int], power: float = 0.5
) -> torch.Tensor:
    """The default's search with each weight's error also weighted by sqrt(σ² + w²) (σ² the mean w² of
    its row's group), as llama.cpp's quantizer weighs its search: a large weight's error costs more.
    Returns the fake-quantized weight (the outlier columns exact)."""
    keep = complement_indices(torch.as_tensor(idx, dtype=torch.long).sort().values, weight.shape[1])
    kept = weight.float()[:, keep]
    imp = importance.float()[keep]
    out = weight.float().clone()
    parts = []
    for start in range(0, kept.shape[0], 256):
        rows = kept[start : start + 256]
        groups = torch.nn.functional.pad(rows, (0, -rows.shape[1] % 128)).reshape(rows.shape[0], -1, 128)
        sigma2 = groups.pow(2).mean(-1, keepdim=True).expand_as(groups).reshape(rows.shape[0], -1)
        per_element = imp * (sigma2[:, : rows.shape[1]] + rows.pow(2)).pow(power)
        codes, scale, minimum = quantize_grouped_clipped(
            rows, 4, 128, per_element, param_dtype=torch.bfloat16
        )
        parts.append(dequantize_grouped(codes, scale, minimum, 128))
    out[:, keep] = torch.cat(parts)
    return out


def variants(depth: int) -> dict[str, tuple[Callable[[str], bool], str]]:
    """name -> (whether the search runs on this linear, which tokens weigh it)."""
    out = {
        "min/max": (lambda n: False, "exclude"),
        "default": (lambda n: True, "exclude"),
        "sinks in": (lambda n: True, "include"),
        "sink-balanced": (lambda n: True, "balanced"),
        "magnitude-weighted": (lambda n: True, "magnitude"),
        "magnitude²-weighted": (lambda n: True, "magnitude2"),
        "default + rows debiased": (lambda n: True, "debias"),
        "default + rows refit": (lambda n: True, "refit"),
    }
    for kind, leaves in KINDS.items():
        out[f"search off: {kind}"] = (lambda n, leaves=leaves: n.rsplit(".", 1)[-1] not in leaves, "exclude")
    attention = KINDS["qkv"] + KINDS["o"]
    out["search in attention only"] = (lambda n: n.rsplit(".", 1)[-1] in attention, "exclude")
    for third, label in enumerate(("first", "middle", "last")):
        out[f"search off: {label} third"] = (lambda n, t=third: 3 * _layer(n) // depth != t, "exclude")
    return out


@torch.no_grad()
def fake_quantize(model, recipe: Recipe, report, searched: Callable[[str], bool], sink_tokens: str) -> None:
    weights = recipe.weights
    chosen, _ = targets(model, weights.ignore)
    for name, module in chosen.items():
        idx = choose_outliers(name, module.weight, weights, report)
        if sink_tokens.startswith("magnitude"):
            importance = column_importance(name, report, "exclude")
            power = 1.0 if sink_tokens == "magnitude2" else 0.5
            module.weight.data = magnitude_weighted(module.weight, importance, idx, power).to(
                module.weight.dtype
            )
            continue
        rescale = sink_tokens in ("debias", "refit")
        new = SinkQuantLinear.from_float(
            module.weight, module.bias, weights.bits, weights.group, idx, weights.symmetric,
            importance=sink_balanced(name, report, 32 * 512) if sink_tokens == "balanced"
            else column_importance(name, report, "exclude" if rescale else sink_tokens),
            clip_search=searched(name),
        )  # fmt: skip
        quantized = new.dequantized_weight().float()
        if rescale:
            quantized = rescaled_rows(module.weight.float(), quantized, column_importance(name, report, "exclude"),
                                      idx, sink_tokens)  # fmt: skip
        module.weight.data = quantized.to(module.weight.dtype)


def rescaled_rows(weight, quantized, importance, idx, how: str) -> torch.Tensor:
    """Each row's quantized kept columns times one factor: `debias` makes the row's output unbiased in
    the regression of the quantized output on the float one, under the per-column weights (alpha = Σ imp w²
    / Σ imp q w: a clipped row's features are not shrunk); `refit` is the weighted least-squares factor
    (Σ imp q w / Σ imp q²). A factor on a row is one on its groups' scales and minima, so int4 holds it."""
    keep = complement_indices(torch.as_tensor(idx, dtype=torch.long).sort().values, weight.shape[1])
    w, q, imp = weight[:, keep].double(), quantized[:, keep].double(), importance.double()[keep]
    if how == "debias":
        alpha = (imp * w * w).sum(1) / (imp * q * w).sum(1)
    else:
        alpha = (imp * q * w).sum(1) / (imp * q * q).sum(1)
    alpha = torch.where(torch.isfinite(alpha), alpha, torch.ones_like(alpha))
    out = quantized.clone()
    out[:, keep] = (q * alpha[:, None]).float()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument(
        "--dataset",
        default="wikitext",
        choices=["wikitext", "c4-heldout"],
        help="c4-heldout: C4 validation documents 1,000 on (the calibration reads the first 512)",
    )
    parser.add_argument("--report", default=None, help="a calibration report to reuse (written if absent)")
    args = parser.parse_args()
    start = time.perf_counter()
    dataset = WIKITEXT
    if args.dataset == "c4-heldout":
        lines_ = (SHARED / "data" / "c4-validation-2k.jsonl").read_text().splitlines()[1000:]
        dataset = Path(tempfile.mkdtemp()) / "c4_heldout.jsonl"
        dataset.write_text("\n".join(lines_) + "\n")
    recipe = Recipe()
    host, tokenizer = open_model(args.model, "float32", stream=False)
    model = host.model
    if args.report and Path(args.report).exists():
        report = CalibrationReport.load(args.report)
    else:
        c = recipe.calibration
        samples = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
        report = calibrate(model, tokenizer, data=samples, progress=False)
        if args.report:
            report.save(args.report)
    print(f"calibrated in {time.perf_counter() - start:.0f}s; sink rows {report.sink_rows}", flush=True)
    chosen = variants(report.num_layers)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    fp32 = evaluate(model, tokenizer, dataset, 1024, args.tokens, progress=False).perplexity
    print(f"fp32 {fp32:.4f}", flush=True)
    rows = []
    for label, (searched, sink_tokens) in chosen.items():
        t0 = time.perf_counter()
        copy_ = copy.deepcopy(model)
        fake_quantize(copy_, recipe, report, searched, sink_tokens)
        ppl = evaluate(copy_, tokenizer, dataset, 1024, args.tokens, progress=False).perplexity
        del copy_
        rows.append((label, ppl))
        print(f"{label}: {ppl:.4f} ({ppl / fp32:.4f}x, {time.perf_counter() - t0:.0f}s)", flush=True)
    cpu = machine()
    lines = [
        f"# The default W4's range search, part by part: {model_name(args.model)}",
        "",
        f"`python -m eval.probes.probe_default_w4_variants --model {model_name(args.model)} --tokens {args.tokens}"
        f" --dataset {args.dataset}{'' if not args.only else f' --only {args.only!r}'}`"
        f" ({time.perf_counter() - start:.0f} s). {cpu['cpu']} ({cpu['cpu_capability']}), {cpu['threads']} threads,"
        f" {cpu['date']}. Calibration: the default recipe's 32 x 512 C4 tokens; sink rows {report.sink_rows}.",
        f"{'WikiText-2 test' if args.dataset == 'wikitext' else 'C4 validation documents 1,000 on'}, first {args.tokens} tokens, windows of 1024. Weights int4 g128, 1% outlier columns",
        "(mean |x|), fake-quantized (each linear computes with the dequantized weight sinkquant stores).",
        "",
        "| variant | perplexity | x fp32 |",
        "|---|---:|---:|",
        f"| fp32 | {fp32:.4f} | 1.0000 |",
    ]
    lines += [f"| {label} | {ppl:.4f} | {ppl / fp32:.4f} |" for label, ppl in rows]
    suffix = "" if args.dataset == "wikitext" else f"_{args.dataset}"
    write_report(PROBE_RESULTS / f"default_w4_variants_{model_name(args.model)}{suffix}.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
