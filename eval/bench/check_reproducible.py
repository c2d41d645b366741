"""Is a GPTQ checkpoint the same whatever the machine does? One recipe, one set of calibration ids, run at
1 and 2 torch threads, each checkpoint scored through the fused kernel and through PyTorch's kernels.

    python -m eval.bench.check_reproducible [--recipe recipes/w4-g128-gptq.yaml] [--tokens 16384]
        [--precision float32|float64] [--setups 1,2,mkl,sse] [--out eval/results/bench/reproducible_smollm2.md]

Each quantize and each evaluation runs in a process of its own (the thread count and
`SINKQUANT_FUSED_KERNEL` are process-wide). The checkpoints are compared tensor by tensor
(`tensor_hashes.py`); the perplexities are compared as a spread, max / min - 1 (the goal: under 0.3%).
A third checkpoint is made at 2 threads on a narrower instruction set, as a CPU without AVX2 would run
it: ATen's vectorised kernels at their `default` (no AVX) build, MKL on its `COMPATIBLE` code path (the
SSE2 one every x86 CPU runs) and oneDNN limited to SSE4.1 (`NARROW_ISA`). Vector width and kernel
choice are what differ between CPUs, so this row stands in for another machine where none is at hand;
it is evaluated on the same narrowed build. A fourth (`mkl`) narrows MKL alone, to its `COMPATIBLE` path:
MKL picks its code path by CPU and, unlike ATen (`ATEN_CPU_CAPABILITY`), cannot be pinned to one across
AVX2 and AVX-512 CPUs ([mkl_numerics.md](../results/bench/mkl_numerics.md)). The AVX-512 leg proper needs an
AVX-512 machine: the table names this one's CPU, and a run there adds its rows. `--precision` sets the
recipe's `weights.gptq.precision`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from eval.bench.tensor_hashes import tensor_hashes
from eval.lib.common import BENCH_RESULTS, RECIPES, RUNS, WIKITEXT, default_model, machine, write_report
from sinkquant.recipe import load_recipe

QUANTIZE = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from sinkquant.pipeline import quantize_model
from sinkquant.recipe import load_recipe
recipe = load_recipe(sys.argv[4])
if sys.argv[5]:
    recipe = recipe.with_overrides(**{"weights.gptq.precision": sys.argv[5]})
quantize_model(sys.argv[2], sys.argv[3], recipe, overwrite=True, progress=False)
"""

SCORE = """
import json, sys
from sinkquant.checkpoint import load
from sinkquant.evaluate import evaluate
from sinkquant.modeling import load_tokenizer
net = load(sys.argv[1])
result = evaluate(net, load_tokenizer(sys.argv[1]), sys.argv[2], 1024, int(sys.argv[3]), progress=False)
print(json.dumps({"ppl": result.perplexity}))
"""


#: what a CPU without AVX2 would run: every library's SIMD narrowed to SSE (each reads its variable at
#: start-up, so each process gets them in its environment). MKL by its CBWR `COMPATIBLE` path: the one
#: code path it takes on any x86 CPU, where MKL_ENABLE_INSTRUCTIONS only caps what it may dispatch to.
NARROW_ISA = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}
#: key: (label, torch threads, environment) of each checkpoint
SETUPS = {
    "1": ("1 thread", 1, {}),
    "2": ("2 threads", 2, {}),
    "mkl": ("2 threads, MKL on its SSE2 path (MKL_CBWR=COMPATIBLE)", 2, {"MKL_CBWR": "COMPATIBLE"}),
    "sse": ("2 threads, SSE only (ATen default, MKL COMPATIBLE, oneDNN SSE41)", 2, NARROW_ISA),
}


def run(code: str, args: list[str], env: dict | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    if done.returncode != 0:
        raise SystemExit(f"failed: {done.stderr.strip().splitlines()[-1]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPES / "w4-g128-gptq.yaml")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--precision", choices=["float32", "float64"], default=None)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated keys of SETUPS, in order")
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS / "reproducible_smollm2.md")
    args = parser.parse_args()
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    if not keys or any(k not in SETUPS for k in keys):
        raise SystemExit(f"--setups: choose from {', '.join(SETUPS)} (got {args.setups!r})")
    model = default_model()
    work = RUNS / "reproducible"
    rows, hashes, seconds = [], {}, {}
    for key in keys:
        label, threads, env = SETUPS[key]
        out = work / f"setup-{key}"
        start = time.perf_counter()
        run(QUANTIZE, [str(threads), model, str(out), str(args.recipe), args.precision or ""], env)
        seconds[label] = time.perf_counter() - start
        hashes[label] = tensor_hashes(out)
        print(f"quantized at {label} in {seconds[label]:.0f} s", flush=True)
        # a CPU without AVX2 has no fused kernel: the SSE-only checkpoint is scored through PyTorch's
        kernels = ("1", "0") if "ATEN_CPU_CAPABILITY" not in env else ("0",)
        for kernel in kernels:
            scored = run(
                SCORE, [str(out), str(WIKITEXT), str(args.tokens)], {**env, "SINKQUANT_FUSED_KERNEL": kernel}
            )
            ppl = json.loads(scored)["ppl"]
            rows.append(
                (label, "fused (this CPU's best build)" if kernel == "1" else "PyTorch's kernels", ppl)
            )
            print(f"  kernel {kernel}: {ppl:.4f}", flush=True)
    labels = [SETUPS[k][0] for k in keys]
    first = labels[0]
    compare = []
    for label in labels[1:]:
        differ = [k for k in hashes[first] if hashes[first][k] != hashes[label].get(k)]
        compare.append(
            f"- Checkpoint at {label} against {first}: {len(hashes[label])} tensors, "
            + ("byte-identical." if not differ else f"{len(differ)} differ (first: {differ[0]}).")
        )
    values = [p for *_, p in rows]
    spread = max(values) / min(values) - 1
    info = machine()
    precision = args.precision or load_recipe(args.recipe).weights.gptq.precision
    flags = f" --precision {args.precision}" if args.precision else ""
    lines = [
        "# One GPTQ recipe across thread counts and kernel paths",
        "",
        f"`python -m eval.bench.check_reproducible --setups {','.join(keys)}{flags}` on {info['cpu']} "
        f"({info['cpu_capability']}), {info['date']}; recipe `{args.recipe.name}` (embedded calibration, "
        f"`gptq.precision: {precision}`), SmolLM2-135M; WikiText-2 test, first {args.tokens} tokens, "
        "windows of 1024.",
        "",
        "| quantized at | evaluated through | perplexity |",
        "|---|---|---:|",
        *(f"| {t} | {k} | {p:.4f} |" for t, k, p in rows),
        "",
        *compare,
        "- Quantize time: " + ", ".join(f"{seconds[label]:.0f} s at {label}" for label in labels) + ".",
        f"- Perplexity spread over the {len(rows)} rows: {spread:.4%} (goal: under 0.3%).",
        "",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
