"""Every shipped weight recipe on two model families, beside baselines this benchmark computes with its
own code, in one run: the check that a default holds beyond the model it was tuned on (issue 48).

    python -m eval.bench.bench_families [--models smollm2,qwen] [--recipes w4-g128-outliers,...]
                                        [--baselines minmax,nf4] [--out PATH]

Models: SmolLM2-135M-Instruct (Llama) scored on the first 16,384 tokens of WikiText-2 test and
Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases, no BOS, 151k vocabulary) on the first 8,192, windows
of 1024 (the fixed protocol, `sinkquant.evaluate`), both materialized by ../shared/tools. Rows:
  * fp32;
  * min/max RTN W4 g128 + 1% columns, by this file's own code: per linear layer (lm_head and embeddings
    left as they are), the 1% input columns of largest mean |x| over the recipe's calibration samples
    (32 x 512 tokens of the embedded C4 slice) kept exactly, every other weight rounded to the nearest of
    16 levels between its group's min and max (groups of 128 consecutive kept columns), in float32;
  * bitsandbytes nf4 (blocksize 64), loaded as its documentation loads it;
  * each recipe as a user runs it: `sinkquant quantize MODEL OUT --recipe recipes/NAME.yaml`, the
    checkpoint loaded back and scored; with the seconds `quantize` took (calibration included).
Results: a table per model on stdout and eval/results/bench/families.md (or --out).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from eval.lib.common import (
    BENCH_RESULTS,
    RECIPES,
    RUNS,
    SHARED,
    WIKITEXT,
    bnb_nf4,
    machine,
    one_line,
    quantize_and_score,
    write_report,
)
from sinkquant.data import calibration_samples
from sinkquant.evaluate import evaluate
from sinkquant.recipe import Recipe, load_recipe

MODELS = {  # key -> (materialize name, tokens scored)
    "smollm2": ("smollm2-135m", 16384),
    "qwen": ("qwen2.5-coder-0.5b", 8192),
}
WEIGHT_RECIPES = ("w8", "w4-g128", "w4-g128-outliers", "w4-g128-gptq", "w4-g128-compact", "w4-g128-best")


def materialize(name: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(SHARED / "tools" / "materialize_model.py"), name],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}


@torch.no_grad()
def minmax_with_columns(
    model: nn.Module, ids: torch.Tensor, fraction: float = 0.01, group: int = 128
) -> None:
    """This benchmark's own baseline, in place: mean |x| per input column of each linear over `ids`, the
    top `fraction` kept, the rest min/max RTN int4 in groups of `group` kept columns."""
    linears = _linears(model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[name] += x.abs().sum(0, dtype=torch.float64)
            counts[name] += x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    for row in ids:
        model(row[None])
    for h in handles:
        h.remove()
    for name, module in linears.items():
        n_keep = max(1, round(fraction * module.in_features))
        kept = torch.argsort(sums[name] / counts[name], descending=True)[:n_keep]
        module.weight.data = minmax_rounded(module.weight.data.float(), kept, group).to(module.weight.dtype)


def minmax_rounded(weight: torch.Tensor, kept: torch.Tensor, group: int = 128) -> torch.Tensor:
    """`weight` [out, in] with its `kept` columns exact and the others rounded to the nearest of 16
    levels between their group's min and max (groups of `group` consecutive other columns), float32."""
    rest = torch.ones(weight.shape[1], dtype=torch.bool)
    rest[kept] = False
    part, out = weight[:, rest], weight.clone()
    rounded = torch.empty_like(part)
    for start in range(0, part.shape[1], group):
        g = part[:, start : start + group]
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        step = ((hi - lo) / 15).clamp(min=1e-12)
        rounded[:, start : start + group] = torch.round((g - lo) / step).clamp(0, 15) * step + lo
    out[:, rest] = rounded
    return out


def run_model(key: str, recipes: list[str], baselines: list[str]) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = materialize(MODELS[key][0])
    tokens = MODELS[key][1]
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []

    def scored(name: str, model, seconds=None, note=""):
        result = evaluate(model, tokenizer, WIKITEXT, 1024, tokens, progress=False)
        rows.append({"row": name, "ppl": result.perplexity, "seconds": seconds, "note": note})
        print(f"{key} {name}: {result.perplexity:.4f}", flush=True)

    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    scored("fp32", fp32)
    c = Recipe().calibration
    ids = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed).input_ids
    if "minmax" in baselines:
        start = time.perf_counter()
        minmax_with_columns(fp32, ids)
        scored("min/max RTN W4 g128 + 1% columns (own code)", fp32, time.perf_counter() - start)
    del fp32
    if "nf4" in baselines:
        try:
            start = time.perf_counter()
            model = bnb_nf4(path)
            scored("bitsandbytes nf4 (blocksize 64)", model, time.perf_counter() - start)
            del model
        except Exception as exc:  # a peer that cannot run is a row with its reason
            rows.append({"row": "bitsandbytes nf4", "ppl": None, "seconds": None, "note": one_line(exc)})
    for name in recipes:
        out = RUNS / "families" / key / name
        result, seconds = quantize_and_score(
            path, out, load_recipe(RECIPES / f"{name}.yaml"), tokenizer, tokens
        )
        rows.append({"row": f"`{name}`", "ppl": result.perplexity, "seconds": seconds, "note": ""})
        print(f"{key} {name}: {result.perplexity:.4f} ({seconds:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--recipes", default=",".join(WEIGHT_RECIPES))
    parser.add_argument("--baselines", default="minmax,nf4")
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS / "families.md")
    args = parser.parse_args()
    cpu = machine()
    start = time.perf_counter()
    lines = [
        "# Weight recipes on two model families",
        "",
        f"`python -m eval.bench.bench_families --models {args.models} --recipes {args.recipes} "
        f"--baselines {args.baselines}`. {cpu['cpu']} ({cpu['cpu_capability']}), {cpu['threads']} threads, "
        f"torch {cpu['torch']}, {cpu['date']}. Protocol: WikiText-2 test, windows of 1024, SmolLM2 the "
        "first 16,384 tokens, Qwen2.5-Coder-0.5B the first 8,192 (see the module docstring for every row).",
    ]
    for key in args.models.split(","):
        rows = run_model(key, [r for r in args.recipes.split(",") if r], args.baselines.split(","))
        fp32 = rows[0]["ppl"]
        lines += ["", f"## {key} ({MODELS[key][1]:,} tokens)", "", "| row | perplexity | x fp32 | quantize s | note |",
                  "|---|---:|---:|---:|---|"]  # fmt: skip
        for r in rows:
            ppl = "–" if r["ppl"] is None else f"{r['ppl']:.4f}"
            ratio = "–" if r["ppl"] is None else f"{r['ppl'] / fp32:.4f}"
            secs = "–" if r["seconds"] is None else f"{r['seconds']:.0f}"
            lines.append(f"| {r['row']} | {ppl} | {ratio} | {secs} | {r['note']} |")
    lines += [
        "",
        f"Total {time.perf_counter() - start:.0f} s; load average at the start {cpu['load_average']:.1f}.",
    ]
    write_report(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
