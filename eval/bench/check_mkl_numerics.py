"""Can the BLAS under torch be pinned to one code path, so float32 products are the same bits on every CPU?

    python -m eval.bench.check_mkl_numerics [--out eval/results/bench/mkl_numerics.md]

GPTQ checkpoints differ across instruction sets because the layers' inputs differ in their last bits
(docs/gptq.md). A fix by pinning would need MKL, which computes torch's float32 products on x86, to run
one code path on AVX2 and AVX-512 CPUs alike: its Conditional Numerical Reproducibility (CNR) branches.
For each branch this asks torch's own MKL, in a fresh process, before any MKL call
(`mkl_serv_cbwr_set`, the entry point behind `mkl_cbwr_set`), whether it takes the branch, and hashes
two products at 1 and 2 threads: an aligned 4096x576 @ 576x1536 and a 333x1536 slice starting one float
into its rows @ 1536x77 (misaligned, as views are). The `AVX2` branch is what a portable mode would
pin; `COMPATIBLE` is the SSE2 path every x86 CPU runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from eval.lib.common import BENCH_RESULTS, machine, write_report

PROBE = r"""
import ctypes, hashlib, json, os, sys, time, importlib.util
torch_dir = os.path.dirname(importlib.util.find_spec("torch").origin)
mkl = ctypes.CDLL(os.path.join(torch_dir, "lib", "libtorch_cpu.so"), mode=ctypes.RTLD_GLOBAL)
mkl.mkl_serv_cbwr_set.argtypes = [ctypes.c_int]
mkl.mkl_serv_cbwr_get.argtypes = [ctypes.c_int]
branch, threads = int(sys.argv[1]), int(sys.argv[2])
status = mkl.mkl_serv_cbwr_set(branch) if branch else 0
import torch
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
a, b = torch.randn(4096, 576, generator=g), torch.randn(576, 1536, generator=g)
c, d = torch.randn(333, 1537, generator=g)[:, 1:], torch.randn(1536, 77, generator=g)
digest = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:10]
aligned = a @ b
start = time.perf_counter()
for _ in range(10):
    a @ b
seconds = time.perf_counter() - start
print(json.dumps({"status": status, "in_effect": mkl.mkl_serv_cbwr_get(-1),
                  "aligned": digest(aligned), "misaligned": digest(c @ d), "seconds": seconds}))
"""

STRICT = 0x10000
#: (name, value for mkl_cbwr_set; 0: leave MKL as it starts) from mkl_service.h
BRANCHES = [
    ("as torch starts it (no CNR)", 0),
    ("AUTO", 2),
    ("COMPATIBLE", 3),
    ("COMPATIBLE,STRICT", 3 | STRICT),
    ("SSE4_2", 8),
    ("AVX", 9),
    ("AVX2", 10),
    ("AVX2,STRICT", 10 | STRICT),
    ("AVX512", 12),
]
#: mkl_cbwr_set's return codes
STATUS = {0: "taken", -1: "invalid input", -2: "unsupported branch", -3: "refused (mode change failure)"}


def probe(value: int, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(value), str(threads)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS / "mkl_numerics.md")
    args = parser.parse_args()
    info = machine()
    rows = []
    for name, value in BRANCHES:
        one, two = probe(value, 1), probe(value, 2)
        rows.append(
            f"| {name} | {STATUS.get(one['status'], one['status'])} | {one['in_effect']} | {one['aligned']} | "
            f"{two['aligned']} | {one['misaligned']} | {two['misaligned']} | {two['seconds']:.2f} |"
        )
        print(rows[-1], flush=True)
    lines = [
        "# MKL's code paths under torch: can float32 products be pinned across CPUs?",
        "",
        f"`python -m eval.bench.check_mkl_numerics` on {info['cpu']} ({info['cpu_capability']}), {info['date']}; "
        f"torch {info.get('torch', '')}. Values as in mkl_service.h (1: no CNR, 2: AUTO, 3: COMPATIBLE, "
        "+65536: STRICT). Hashes: the first 10 hex digits of the sha256 of each product; time: 10 aligned "
        "products at 2 threads.",
        "",
        "| branch asked for | mkl_cbwr_set | in effect (mkl_cbwr_get) | aligned, 1 thread | aligned, 2 threads "
        "| misaligned, 1 thread | misaligned, 2 threads | time s |",
        "|---|---|---:|---|---|---|---|---:|",
        *rows,
        "",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
