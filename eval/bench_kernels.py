"""Micro-benchmark: one linear layer at batch 1 (a decode step), quantized vs bf16, side by side.

    python eval/bench_kernels.py [--threads N] [--reps 200] [--out eval/results/kernels.md]

For each shape: a bf16 `F.linear`, `SinkQuantLinear` int8 (per channel) and int4 (g128), both with 1%
outlier input columns at full precision, all timed in the same run (interleaved, median of `reps`
calls after a warm-up). Reports the time, the ratio to bf16 (>1 = faster) and the effective weight
bytes read per second (the layer's stored bytes / time).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sinkquant.quantize.linear import SinkQuantLinear

SHAPES = [  # (in, out): SmolLM2-135M's projections, then Llama-7B-sized ones
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
]


def _median_time(fn, x, reps: int) -> float:
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(reps: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for in_f, out_f in SHAPES:
        weight = torch.randn(out_f, in_f) * 0.02
        outliers = torch.randperm(in_f)[: max(1, in_f // 100)]
        bf16 = weight.bfloat16()
        layers = {
            "bf16 F.linear": (lambda x, w=bf16: F.linear(x, w), bf16.numel() * 2),
        }
        for bits, group in ((8, None), (4, 128)):
            module = SinkQuantLinear.from_float(
                weight, None, bits, group, outliers, storage_dtype=torch.bfloat16
            )
            layers[f"int{bits}" + (f" g{group}" if group else "") + " +1% cols"] = (module, module.nbytes())
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        with torch.no_grad():
            timed = {name: _median_time(fn, x, reps) for name, (fn, _) in layers.items()}
        base = timed["bf16 F.linear"]
        for name, (_, nbytes) in layers.items():
            rows.append(
                {
                    "shape": f"{in_f}->{out_f}",
                    "method": name,
                    "us": timed[name] * 1e6,
                    "speedup": base / timed[name],
                    "GBps": nbytes / timed[name] / 1e9,
                    "bytes": nbytes,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.reps)
    lines = [
        f"# Linear layer at batch 1: quantized vs bf16 ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}. "
        f"Median of {args.reps} calls after warm-up; all rows measured in one run. speedup = bf16 time / time.",
        "",
        "| shape (in->out) | method | time (us) | speedup vs bf16 | weight bytes | effective GB/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['us']:.1f} | {r['speedup']:.2f}x | {r['bytes']:,} | {r['GBps']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
