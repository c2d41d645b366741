"""W4 settings tried on the way to the best recipe, each run as a user runs it: `quantize_model` from the
model folder (calibration on the recipe's data, embedded slice when it names none), the checkpoint
loaded back, perplexity on WikiText-2 test (windows of 1024).

    python -m eval.probes.sweep_w4 NAME=RECIPE[:JSON_OVERRIDES] ... [--tokens 16384]
        [--json runs/bench/sweep_w4.json] [--out eval/results/probes/sweep_w4_smollm2.md]

e.g. `gptq-damp005=recipes/w4-g128-gptq.yaml:{"weights.gptq.damping": 0.05}`.
Each run adds its row to the JSON file (rows of earlier invocations stay, a row of the same name is
replaced), and the markdown table is rendered from all of them, with the commit each row ran at:
one heavy job at a time on 2 cores, so a sweep is several invocations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from eval.lib.common import PROBE_RESULTS, ROOT, RUNS, WIKITEXT, default_model, machine, quantize_and_score
from sinkquant.evaluate import evaluate
from sinkquant.loading import open_model
from sinkquant.modeling import load_tokenizer
from sinkquant.recipe import load_recipe


def parse_variant(text: str) -> tuple[str, Path, dict]:
    name, _, spec = text.partition("=")
    recipe, _, overrides = spec.partition(":")
    if not name or not recipe:
        raise SystemExit(f"variant {text!r}: write NAME=RECIPE[:JSON_OVERRIDES]")
    return name, Path(recipe), json.loads(overrides) if overrides else {}


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "sinkquant"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def render(rows: list[dict], fp32: float | None) -> str:
    lines = [
        "| setting | recipe | overrides | perplexity | vs fp32 | KL | top-1 | quantize s | commit | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        gap = f"{100 * (r['ppl'] / fp32 - 1):+.2f}%" if fp32 else ""
        over = ", ".join(f"`{k}: {v}`" for k, v in r["overrides"].items()) or "as shipped"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "–"
        top1 = f"{r['top1']:.4f}" if r.get("top1") is not None else "–"
        lines.append(
            f"| {r['name']} | {r['recipe']} | {over} | {r['ppl']:.4f} | {gap} | {kl} | {top1} | {r['quantize_s']:.0f} | {r['commit']} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", type=parse_variant, help="none: re-render the table")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=RUNS / "sweep_w4.json")
    parser.add_argument("--out", type=Path, default=PROBE_RESULTS / "sweep_w4_smollm2.md")
    args = parser.parse_args()
    at = commit()  # the code this invocation runs, taken before it runs
    model = default_model()
    tokenizer = load_tokenizer(model)
    done = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    # the float model, streamed from its folder: the reference of every row's KL and top-1
    reference = open_model(model, "float32")[0] if args.variants else None
    if done.get("fp32") is None or done.get("tokens") != args.tokens:
        done = {"rows": [], "tokens": args.tokens}
        done["fp32"] = evaluate(reference, tokenizer, WIKITEXT, 1024, args.tokens, progress=False).perplexity
    for name, recipe_file, overrides in args.variants:
        recipe = load_recipe(recipe_file)
        recipe = recipe.with_overrides(**overrides) if overrides else recipe
        result, seconds = quantize_and_score(
            model, RUNS / "sweep-w4" / name, recipe, tokenizer, args.tokens, reference=reference
        )
        ppl = result.perplexity
        row = {"name": name, "recipe": recipe_file.name, "overrides": overrides, "ppl": ppl,
               "kl": result.kl, "top1": result.top1_agreement, "quantize_s": seconds, "commit": at}  # fmt: skip
        done["rows"] = [r for r in done["rows"] if r["name"] != name] + [row]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(done, indent=1))
        print(
            f"{name}: {ppl:.4f} ({100 * (ppl / done['fp32'] - 1):+.2f}%), KL {result.kl:.4f}, "
            f"top-1 {result.top1_agreement:.4f}, quantize {seconds:.0f} s",
            flush=True,
        )
    info = machine()
    text = "\n".join([
        "# W4 settings tried (SmolLM2-135M)",
        "",
        f"`python -m eval.probes.sweep_w4 ...` (one invocation per row or few rows, see the commit column) on {info['cpu']}, "
        f"{info['threads']} threads. Each row: `quantize_model` from the model folder as `sinkquant quantize` runs it "
        f"(calibration included in the time), the checkpoint loaded back, WikiText-2 test, first {done['tokens']} "
        f"tokens, windows of 1024; fp32 {done['fp32']:.4f}. KL(fp32 ‖ row) and top-1 agreement against the float "
        "model streamed from its folder, on the same tokens (–: a row run before the sweep recorded them). "
        "Times ran on a shared 2-core machine.",
        "",
        render(done["rows"], done["fp32"]),
        "",
    ])  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
