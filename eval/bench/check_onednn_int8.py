"""Is vLLM's CPU W8A8 product exact? oneDNN's int8 GEMM, as vLLM calls it, against the exact integer sum.

    python -m eval.bench.check_onednn_int8 [--out eval/results/bench/onednn_int8_avx2.md]

vLLM's CPU backend runs compressed-tensors W8A8 through oneDNN (`CPUInt8ScaledMMLinearKernel`): the
activations are quantized per token to int8, multiplied by the int8 weights, and the int32 sums are
scaled. On x86 CPUs without VNNI, oneDNN forms those sums with vpmaddubsw, which multiplies unsigned
8-bit activations (the signed ones shifted by 128) by signed 8-bit weights and adds each pair into a
saturating int16. This script measures, for weight codes drawn uniformly from [-L, L] and activations
quantized by vLLM's own dynamic per-token op, how far oneDNN's integer sums are from the exact ones.
The export's `--narrow-int8` (codes in [-64, 64]) rests on it.

It runs inside vLLM's virtual environment (made on first use, as bench_serving.py makes it): this
file, by path, with `--inside`, which imports only torch and vLLM (nothing from eval.lib or sinkquant).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

LIMITS = (127, 96, 65, 64, 48)
SHAPES = ((64, 576, 576), (64, 1536, 576))  # tokens, in, out: SmolLM2's q_proj and down_proj


def measure() -> list[dict]:
    """In vLLM's environment: one row per (shape, code limit)."""
    import torch
    from vllm import _custom_ops as ops

    rows = []
    for m, k, n in SHAPES:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=generator)
        x[0, :4] = 300.0  # a token with massive activations, as sink tokens carry
        x = x.to(torch.bfloat16)
        for limit in LIMITS:
            codes = torch.randint(-limit, limit + 1, (n, k), generator=generator, dtype=torch.int8)
            scale = torch.ones(n, 1)
            # the weight is given as a [k, n] view of the [n, k] codes, as vLLM passes it
            handler = ops.create_onednn_scaled_mm(codes.t(), scale, torch.float32, True, False, 32)
            x_q, x_s, x_zp = ops.onednn_scaled_int8_quant(x, None, None, True)
            out = torch.empty(m, n)
            ops.onednn_scaled_mm(handler, x_q, out, x_s, x_zp, None, None)
            exact = x_q.double() @ codes.double().t()
            got = out.double() / x_s.double()
            error = (got - exact).abs()
            rows.append(
                {
                    "tokens": m,
                    "in": k,
                    "out": n,
                    "limit": limit,
                    "max_abs_error": float(error.max()),
                    "relative_error": float(error.norm() / exact.norm()),
                    "outputs_off": float((error > 0.5).double().mean()),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(measure()))
        return

    from eval.bench.bench_serving import VLLM_SPEC, int8_isa, vllm_python
    from eval.lib.common import BENCH_RESULTS, machine

    python = vllm_python()
    done = subprocess.run([str(python), __file__, "--inside"], capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    info = machine()
    lines = [
        "# vLLM's CPU W8A8 product (oneDNN) against the exact integer sum",
        "",
        f"`python -m eval.bench.check_onednn_int8` on {info['cpu']} ({info['cpu_capability']}, {int8_isa()}), "
        f"{VLLM_SPEC}. Weight codes uniform in [-L, L]; activations N(0, 1) with one token carrying 300 in "
        "four channels, quantized by vLLM's dynamic per-token int8 op; `error` is oneDNN's sum (its "
        "output divided by the token's scale) against the exact integer sum of the same int8 operands.",
        "",
        "| tokens x in -> out | L | max abs error | relative error | outputs off by > 0.5 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} x {r['in']} -> {r['out']} | {r['limit']} | {r['max_abs_error']:.1f} | "
            f"{r['relative_error']:.2e} | {r['outputs_off']:.1%} |"
        )
    lines.append("")
    text = "\n".join(lines)
    out = Path(args.out) if args.out else BENCH_RESULTS / "onednn_int8_avx2.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
