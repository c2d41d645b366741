"""Micro-benchmark: one linear layer at batch 1 (a decode step), quantized vs bf16, side by side.

    python -m eval.bench.bench_kernels [--threads N] [--reps 200] [--out eval/results/bench/kernels.md]
        [--rotation BLOCK] [--rows N] [--shapes small]

For each shape: a bf16 `F.linear`, `SinkQuantLinear` int8 (per channel) and int4 (g128), both with 1%
outlier input columns at full precision (on sinkquant's fused kernel, the layer's decode path, and
again on PyTorch's int8 / int4 kernel), and each PyTorch kernel bare (no gather, no outlier columns), all
timed in the same run (interleaved call by call, median of `reps` calls after a
warm-up). Each method rotates through copies of its layer (256 MiB of weights in all), so every call
reads its weights from memory, not from a cache that a lone layer would sit in. Reports the time, the ratio to bf16 (>1 = faster) and the effective weight bytes read per
second (the bytes the call reads / time). The ratio's base is a bf16 `nn.Linear` module, the thing a
`SinkQuantLinear` replaces in a model (a module call costs a few us more than the bare `F.linear`,
which is listed too, with a second ratio against it). The gap between a layer and its bare kernel is the fixed
cost of the full-precision columns and the op dispatch around them.

`--rotation BLOCK` adds an int4 g128 layer whose kept inputs are rotated in blocks of BLOCK
(`weights.rotation`), each call rotating its input as the first linear to read one does (q, gate), so
its cost over the same layer unrotated is measured in the same run; `--rows N`
times calls of N input rows (a prefill chunk) instead of one; `--shapes small` keeps SmolLM2's shapes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.lib.common import BENCH_RESULTS, machine
from sinkquant.format.features.rotation import InputRotation, draw_signs
from sinkquant.format.primitives import complement_indices
from sinkquant.kernels import best_isa
from sinkquant.quantize.linear import SinkQuantLinear, forget_rotated_input, use_fused_kernel

SHAPES = [  # (in, out): SmolLM2-135M's projections, then Llama-7B-sized ones
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (4096, 4096),
    (4096, 11008),
    (11008, 4096),
]


#: bytes of weights each method's copies add up to: well past the last-level cache (32 MiB on the
#: machines here), so every timed call reads its weights from memory, as in a decode step, where a
#: layer's weights come back only after all the others' (a lone 4096 x 11008 int4 layer, 23.5 MiB,
#: sits in such a cache and timed 41 GB/s on a 53 GB/s machine)
ROTATE_BYTES = 256 * 2**20


def copies_needed(nbytes: int, reps: int) -> int:
    """How many copies of an `nbytes` layer to rotate through: ROTATE_BYTES in all, at most `reps`."""
    return max(1, min(reps, -(-ROTATE_BYTES // nbytes)))


def _median_times(fns: dict, x, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn (a callable, or a list of copies called in turn so their
    weights come from memory), interleaved call by call so load changes hit all alike."""
    fns = {name: fn if isinstance(fn, list) else [fn] for name, fn in fns.items()}
    for copies in fns.values():
        for fn in copies[:1] * 10 + copies[1:]:
            fn(x)
    times = {name: [] for name in fns}
    # methods sharing one layer's copies (a layer and its bare kernel) start at different copies, so
    # one never finds the weights the other has just pulled into the cache
    starts = {name: j * len(copies) // len(fns) for j, (name, copies) in enumerate(fns.items())}
    for i in range(reps):
        for name, copies in fns.items():
            fn = copies[(i + starts[name]) % len(copies)]
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _kernel_only(module: SinkQuantLinear):
    """The bare integer kernel on an input already gathered and padded: what the layer costs without
    the gather, the outlier columns and the bookkeeping around them."""
    kernel = module._pytorch_kernel()
    act = torch.randn(1, kernel.width, dtype=torch.bfloat16)
    return lambda _x: kernel.matmul(act)


def _pytorch_kernel(module: SinkQuantLinear):
    """The layer with the fused kernel switched off: PyTorch's integer kernel plus the gather, pad and
    outlier-column ops around it."""

    def call(x):
        with use_fused_kernel(False):
            return module(x)

    return call


def _rotating_call(module: SinkQuantLinear, x):
    """The layer as the first linear to read its input (q, gate): a layer that reads the input the one
    before it rotated (k, v, up) reuses that rotation, which every call here would, on one shared x."""
    forget_rotated_input()
    return module(x)


def run(reps: int, rotation: int | None = None, n_rows: int = 1, shapes=SHAPES) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for in_f, out_f in shapes:
        weight = torch.randn(out_f, in_f) * 0.02
        outliers = torch.randperm(in_f)[: max(1, in_f // 100)]
        bf16 = weight.bfloat16()
        dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        dense.weight.data.copy_(bf16)
        n_dense = copies_needed(bf16.numel() * 2, reps)
        layers = {
            "bf16 nn.Linear": ([copy.deepcopy(dense) for _ in range(n_dense)], bf16.numel() * 2),
            "bf16 F.linear": (
                [functools.partial(_bf16_linear, w=bf16.clone()) for _ in range(n_dense)],
                bf16.numel() * 2,
            ),
        }
        for bits, group in ((8, None), (4, 128)):
            module = SinkQuantLinear.from_float(
                weight, None, bits, group, outliers, storage_dtype=torch.bfloat16
            )
            modules = [copy.deepcopy(module) for _ in range(copies_needed(module.nbytes(), reps))]
            name = f"int{bits}" + (f" g{group}" if group else "")
            layers[f"{name} +1% cols"] = (modules, module.nbytes())
            layers[f"{name} +1% cols, PyTorch kernel"] = (
                [_pytorch_kernel(m) for m in modules],
                module.nbytes(),
            )
            layers[f"{name} kernel alone"] = (
                [_kernel_only(m) for m in modules],
                module.weight.numel() + module.weight_scale.numel() * 2 * (1 if bits == 8 else 2),
            )
        if rotation is not None:
            kept = complement_indices(outliers.sort().values, in_f).numel()
            module = SinkQuantLinear.from_float(
                weight, None, 4, 128, outliers, storage_dtype=torch.bfloat16,
                rotation=InputRotation(draw_signs(in_f, kept), rotation),
            )  # fmt: skip
            modules = [copy.deepcopy(module) for _ in range(copies_needed(module.nbytes(), reps))]
            layers[f"int4 g128 +1% cols, inputs rotated (blocks of {rotation})"] = (
                [functools.partial(_rotating_call, m) for m in modules],
                module.nbytes(),
            )
        x = torch.randn(n_rows, in_f, dtype=torch.bfloat16)
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
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS / "kernels.md")
    parser.add_argument(
        "--rotation", type=int, default=None, help="add a layer with inputs rotated in blocks of this"
    )
    parser.add_argument("--rows", type=int, default=1, help="input rows per call (1: a decode step)")
    parser.add_argument(
        "--shapes", choices=["all", "small"], default="all", help="small: SmolLM2's shapes only"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if max(s) <= 1536]
    rows = run(args.reps, args.rotation, args.rows, shapes)
    info = machine()
    lines = [
        f"# Linear layer at {'batch 1' if args.rows == 1 else f'{args.rows} input rows'}: quantized vs bf16 "
        f"({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {info['cpu']} ({info['cpu_capability']}), {args.threads} threads, torch {torch.__version__}; "
        f"sinkquant's fused kernel: {best_isa() or 'off'} build. "
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
