"""What GPTQ's calibration data does to its result: the shipped GPTQ recipe on SmolLM2, one calibration
source per row, every row through the user's path (`quantize_model`, then the evaluator).

    python -m eval.probes.gptq_calibration [VARIANT ...] [--tokens 16384]
        [--out eval/results/probes/gptq_calibration_smollm2.md]

Variants (default: all): `first128` (the first 128 documents of the shared C4 file, the slice sinkquant
embedded before, 112 x 512: nearly all of its tokens), `random112-seed0/1` (112 x 512 from the whole
2,000-document file, documents shuffled with seeds 0 and 1), `first512` (the first 512 documents,
128 x 512: the slice embedded now), `embedded` (the recipe as it ships, `dataset: null`). All else is
`recipes/w4-g128-gptq.yaml`. Perplexity on WikiText-2 test, windows of 1024.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.lib.common import PROBE_RESULTS, RECIPES, RUNS, SHARED, default_model, machine, quantize_and_score
from sinkquant.modeling import load_tokenizer
from sinkquant.recipe import load_recipe

C4 = SHARED / "data" / "c4-validation-2k.jsonl"


def first_documents(n: int) -> Path:
    out = RUNS / f"c4-first{n}.jsonl"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(C4.read_text().splitlines(keepends=True)[:n]))
    return out


VARIANTS = {
    "first128": lambda: {"calibration.dataset": str(first_documents(128)), "calibration.samples": 112},
    "random112-seed0": lambda: {"calibration.dataset": str(C4), "calibration.samples": 112},
    "random112-seed1": lambda: {
        "calibration.dataset": str(C4),
        "calibration.samples": 112,
        "calibration.seed": 1,
    },
    "first512": lambda: {"calibration.dataset": str(first_documents(512)), "calibration.samples": 128},
    "embedded": dict,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=PROBE_RESULTS / "gptq_calibration_smollm2.md")
    args = parser.parse_args()
    model = default_model()
    tokenizer = load_tokenizer(model)
    base = load_recipe(RECIPES / "w4-g128-gptq.yaml")
    rows = []
    for name in args.variants:
        overrides = VARIANTS[name]()
        recipe = base.with_overrides(**overrides) if overrides else base
        result, seconds = quantize_and_score(
            model, RUNS / "gptq-calibration" / name, recipe, tokenizer, args.tokens
        )
        ppl = result.perplexity
        c = recipe.calibration
        source = "embedded slice" if c.dataset is None else Path(c.dataset).name
        rows.append((name, source, f"{c.samples} x {c.seq_len}", c.seed, ppl, seconds))
        print(f"{name}: {ppl:.4f} (quantize {seconds:.0f} s)", flush=True)
    info = machine()
    lines = [
        "# GPTQ and its calibration data (SmolLM2-135M, recipes/w4-g128-gptq.yaml)",
        "",
        f"`python -m eval.probes.gptq_calibration {' '.join(args.variants)}` on {info['cpu']}, {info['threads']} threads, "
        f"{info['date']}. WikiText-2 test, first {args.tokens} tokens, windows of 1024; fp32 scores 22.552 "
        "on this protocol (eval/results/bench/gptq_smollm2.md).",
        "",
        "| variant | calibration text | samples | seed | perplexity | quantize s |",
        "|---|---|---|---:|---:|---:|",
        *(f"| {n} | {s} | {k} | {seed} | {p:.4f} | {t:.0f} |" for n, s, k, seed, p, t in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
