"""SmoothQuant's strength for a W8A8 export, swept: the export's perplexity at each alpha, in one run.

    python -m eval.probes.sweep_smooth_alpha [CHECKPOINT] [--alphas 0.3,0.4,...] [--tokens 4096] [--full-range]
        [--out eval/results/probes/smooth_alpha_smollm2.md]

CHECKPOINT is a sinkquant W8 checkpoint (default: SmolLM2-135M quantized with recipes/w8.yaml into
runs/bench/). Each alpha is exported with `--activations int8 --smooth --smooth-alpha A` (plus
`--narrow-int8` unless `--full-range`) and scored by sinkquant's evaluator on the export's effective
weights with per-token int8 activations, as vLLM computes them; the native checkpoint is the first row.
`sinkquant export --smooth-alpha` takes the best value for a model; this is how to find it on another.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from eval.lib.common import PROBE_RESULTS, RECIPES, RUNS, WIKITEXT, default_model, machine
from sinkquant.checkpoint import load
from sinkquant.evaluate import evaluate
from sinkquant.export import ExportSettings, export, exported_model
from sinkquant.modeling import load_tokenizer


def native_w8() -> Path:
    from sinkquant.pipeline import quantize_model
    from sinkquant.recipe import load_recipe

    out = RUNS / "smollm2-w8"
    if not (out / "config.json").is_file():
        quantize_model(default_model(), out, load_recipe(RECIPES / "w8.yaml"), overwrite=True, progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a sinkquant W8 checkpoint (default: SmolLM2 W8)")
    parser.add_argument("--alphas", default="0.3,0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--full-range", action="store_true", help="codes in [-127, 127], not [-64, 64]")
    parser.add_argument("--out", type=Path, default=PROBE_RESULTS / "smooth_alpha_smollm2.md")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint) if args.checkpoint else native_w8()
    tokenizer = load_tokenizer(str(checkpoint))
    work = RUNS / "smooth-alpha"

    def score(net) -> float:
        return evaluate(net, tokenizer, WIKITEXT, 1024, args.tokens, progress=False).perplexity

    start = time.perf_counter()
    native = score(load(checkpoint))
    print(f"native: {native:.4f}", flush=True)
    rows = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        settings = ExportSettings(
            activations="int8",
            smooth=True,
            smooth_alpha=alpha,
            narrow_int8=not args.full_range,
            overwrite=True,
        )
        export(checkpoint, work, settings)
        ppl = score(exported_model(load(checkpoint), work))
        rows.append((alpha, ppl))
        print(f"alpha {alpha}: {ppl:.4f} ({ppl / native - 1:+.2%})", flush=True)
    best = min(rows, key=lambda r: r[1])
    info = machine()
    codes = "[-127, 127]" if args.full_range else "[-64, 64] (`--narrow-int8`)"
    lines = [
        "# SmoothQuant's strength for the W8A8 export",
        "",
        f"`python -m eval.probes.sweep_smooth_alpha` on {info['cpu']} ({info['cpu_capability']}), "
        f"{info['threads']} threads; checkpoint `{checkpoint.name}`; weight codes in {codes}, per-token int8 "
        f"activations as vLLM computes them, scored by sinkquant's evaluator on the export's effective weights. "
        f"WikiText-2 test, first {args.tokens} tokens, windows of 1024. {time.perf_counter() - start:.0f} s.",
        "",
        "| export | perplexity | vs native W8 |",
        "|---|---:|---:|",
        f"| native W8 checkpoint | {native:.4f} | |",
        *(
            f"| `--smooth-alpha {a}`{' (best)' if (a, p) == best else ''} | {p:.4f} | {p / native - 1:+.2%} |"
            for a, p in rows
        ),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
