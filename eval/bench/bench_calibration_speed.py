"""The calibration pass beside the forward pass it rides on (issue 45): how much sinkquant's measuring
costs over running the model.

    python -m eval.bench.bench_calibration_speed [MODEL] [--samples 32] [--seq-len 512] [--repeats 3]

Two rows, alternated --repeats times in one process, medians reported:
  * plain: `AutoModelForCausalLM.from_pretrained(MODEL, dtype=float32, attn_implementation="eager")`
    (load), then one forward pass per calibration sample under `torch.no_grad()` (forward);
  * sinkquant: what `sinkquant quantize MODEL OUT` does before it quantizes, timed as it prints its
    phases: `open_model` (load; a local folder is streamed from disk, layer by layer) and
    `calibrate_for` with the default recipe (calibrate: the samples drawn, then sinks, massive
    activations and every linear's input statistics measured, eager attention for the attention mass).
Both read the same samples: the default recipe's calibration section (32 x 512 tokens of the embedded
C4 slice, seed 0) unless --samples/--seq-len say otherwise. Tokens/s = samples x seq_len / seconds.
Results: a table on stdout and eval/results/bench/calibration_speed_<model>.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from eval.lib.common import BENCH_RESULTS, default_model, machine, model_name, write_report
from sinkquant.data import calibration_samples
from sinkquant.loading import open_model
from sinkquant.pipeline import calibrate_for
from sinkquant.recipe import Recipe


def plain(path: str, ids: torch.Tensor) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    loaded = time.perf_counter()
    with torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    return loaded - start, time.perf_counter() - loaded


def sinkquant(path: str, recipe: Recipe) -> tuple[float, float]:
    start = time.perf_counter()
    host, tokenizer = open_model(path, "float32")
    loaded = time.perf_counter()
    calibrate_for(host, tokenizer, recipe, progress=False)
    return loaded - start, time.perf_counter() - loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = args.model or default_model()
    overrides = {k: v for k, v in {"calibration.samples": args.samples, "calibration.seq_len": args.seq_len}.items()
                 if v is not None}  # fmt: skip
    recipe = Recipe().with_overrides(**overrides) if overrides else Recipe()
    c = recipe.calibration
    _, tokenizer = open_model(path, "float32")
    ids = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed).input_ids
    tokens = ids.numel()
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "sinkquant": []}
    for repeat in range(args.repeats):
        for row, run in (("plain", lambda: plain(path, ids)), ("sinkquant", lambda: sinkquant(path, recipe))):
            gc.collect()
            times[row].append(run())
            load, work = times[row][-1]
            print(f"repeat {repeat + 1} {row}: load {load:.1f}s, pass {work:.1f}s", flush=True)
    med = {
        row: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
        for row, v in times.items()
    }
    (p_load, p_fwd), (s_load, s_cal) = med["plain"], med["sinkquant"]
    cpu = machine()
    lines = [
        f"# Calibration speed beside a plain forward pass: {model_name(path)}",
        "",
        f"`python -m eval.bench.bench_calibration_speed {model_name(path)} --samples {c.samples} --seq-len "
        f"{c.seq_len} --repeats {args.repeats}`. {cpu['cpu']} ({cpu['cpu_capability']}), {cpu['threads']} "
        f"threads, torch {cpu['torch']}, load average {cpu['load_average']:.1f} at the start, {cpu['date']}.",
        f"{c.samples} x {c.seq_len} = {tokens:,} tokens of the default recipe's calibration text; medians of "
        f"{args.repeats} alternated runs (see the module docstring for what each row times).",
        "",
        "| row | load s | pass s | pass tokens/s | load + pass s |",
        "|---|---:|---:|---:|---:|",
        f"| plain eager forward (transformers) | {p_load:.1f} | {p_fwd:.1f} | {tokens / p_fwd:,.0f} | {p_load + p_fwd:.1f} |",
        f"| sinkquant calibrate (default recipe) | {s_load:.1f} | {s_cal:.1f} | {tokens / s_cal:,.0f} | {s_load + s_cal:.1f} |",
        "",
        f"Calibrate / forward: **{s_cal / p_fwd:.2f}x** (pass only), **{(s_load + s_cal) / (p_load + p_fwd):.2f}x** "
        "(load included).",
    ]
    write_report(BENCH_RESULTS / f"calibration_speed_{model_name(path)}.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
