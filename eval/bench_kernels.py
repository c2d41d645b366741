"""Micro-benchmark: one linear layer at batch 1 (a decode step), quantized vs bf16, side by side.

    python eval/bench_kernels.py [--threads N] [--reps 200] [--out eval/results/kernels.md]

For each shape: a bf16 `F.linear`, `SinkQuantLinear` int8 (per channel) and int4 (g128), both with 1%
outlier input columns at full precision (int4 on sinkquant's fused kernel, the layer's decode path, and
again on PyTorch's int4 kernel), and each PyTorch kernel bare (no gather, no outlier columns), all
timed in the same run (interleaved call by call, median of `reps` calls after a
warm-up). Reports the time, the ratio to bf16 (>1 = faster) and the effective weight bytes read per
second (the bytes the call reads / time). The ratio's base is a bf16 `nn.Linear` module, the thing a
`SinkQuantLinear` replaces in a model (a module call costs a few us more than the bare `F.linear`,
which is listed too, with a second ratio against it). The gap between a layer and its bare kernel is the fixed
cost of the full-precision columns and the op dispatch around them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sinkquant.quantize.linear import SinkQuantLinear, use_fused_kernel

SHAPES = [  # (in, out): SmolLM2-135M's projections, then Llama-7B-sized ones
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
]


def _median_times(fns: dict, x, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved call by call so load changes hit all alike."""
    for fn in fns.values():
        for _ in range(10):
            fn(x)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _kernel_only(module: SinkQuantLinear):
    """The bare integer kernel on an input already gathered and padded: what the layer costs without
    the gather, the outlier columns and the bookkeeping around them."""
    if module.bits == 8:
        weight, scale, padded = module._int8_kernel_args()
        act = torch.randn(1, padded, dtype=torch.bfloat16)
        return lambda _x: torch.ops.aten._weight_int8pack_mm(act, weight, scale)
    packed, scales_zeros, padded = module._int4_kernel_args()
    group = module.group_size
    act = torch.randn(1, padded, dtype=torch.bfloat16)
    return lambda _x: torch.ops.aten._weight_int4pack_mm_for_cpu(act, packed, group, scales_zeros)


def _pytorch_int4(module: SinkQuantLinear):
    """The int4 layer with the fused kernel switched off: PyTorch's int4 kernel plus the gather, pad and
    outlier-column ops around it."""

    def call(x):
        with use_fused_kernel(False):
            return module(x)

    return call


def run(reps: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for in_f, out_f in SHAPES:
        weight = torch.randn(out_f, in_f) * 0.02
        outliers = torch.randperm(in_f)[: max(1, in_f // 100)]
        bf16 = weight.bfloat16()
        dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        dense.weight.data.copy_(bf16)
        layers = {
            "bf16 nn.Linear": (dense, bf16.numel() * 2),
            "bf16 F.linear": (lambda x, w=bf16: F.linear(x, w), bf16.numel() * 2),
        }
        for bits, group in ((8, None), (4, 128)):
            module = SinkQuantLinear.from_float(
                weight, None, bits, group, outliers, storage_dtype=torch.bfloat16
            )
            name = f"int{bits}" + (f" g{group}" if group else "")
            layers[f"{name} +1% cols"] = (module, module.nbytes())
            if bits == 4:
                layers[f"{name} +1% cols, PyTorch kernel"] = (_pytorch_int4(module), module.nbytes())
            layers[f"{name} kernel alone"] = (
                _kernel_only(module),
                module.weight.numel() + module.weight_scale.numel() * 2 * (1 if bits == 8 else 2),
            )
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        with torch.no_grad():
            timed = _median_times({name: fn for name, (fn, _) in layers.items()}, x, reps)
        base, functional = timed["bf16 nn.Linear"], timed["bf16 F.linear"]
        for name, (_, nbytes) in layers.items():
            rows.append(
                {
                    "shape": f"{in_f}->{out_f}",
                    "method": name,
                    "us": timed[name] * 1e6,
                    "speedup": base / timed[name],
                    "vs_functional": functional / timed[name],
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
        f"Median of {args.reps} calls after warm-up; all rows measured in one run. speedup = bf16 nn.Linear time / time.",
        "",
        "| shape (in->out) | method | time (us) | speedup vs bf16 nn.Linear | vs bf16 F.linear | weight bytes | effective GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['us']:.1f} | {r['speedup']:.2f}x | {r['vs_functional']:.2f}x "
            f"| {r['bytes']:,} | {r['GBps']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
