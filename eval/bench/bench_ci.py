"""How long CI takes, at two git refs, run one after the other on this machine.

    python -m eval.bench.bench_ci [--baseline 61f3431] [--ref HEAD] [--out eval/results/bench/ci_time.md]

Each ref is cloned afresh into a temporary folder with `shared` beside it (a link to this checkout's
`../shared`), and its own `.ci/run` runs there under `CI=true`, as the CI machine runs it: a new virtual
environment, the install README gives, then README's test command. Both runs get an empty torch
extension folder and an empty model cache, so each compiles its C++ kernels and converts SmolLM2 as a
fresh machine would. Printed and written: wall time, exit code and pytest's summary line per ref, and
the ratio of the two wall times. The default baseline is the last commit before the restructuring
(issue 15), whose CI took about five minutes on the CI machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from eval.lib.common import BENCH_RESULTS, ROOT, SHARED, machine

BASELINE = "61f3431"


def run_ci(ref: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sinkquant-ci-"))
    try:
        clone = work / "main"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", "--detach", ref], check=True)
        (work / "shared").symlink_to(SHARED.resolve())
        env = dict(os.environ, CI="true", TORCH_EXTENSIONS_DIR=str(work / "torch-extensions"),
                   SINKQUANT_ASSETS=str(work / "assets"))  # fmt: skip
        env.pop("VIRTUAL_ENV", None)
        start = time.perf_counter()
        done = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        summary = re.findall(r"^=+ (.*(?:passed|failed).*) =+$", done.stdout, re.M)
        commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        return {"ref": ref, "commit": commit, "code": done.returncode, "wall": wall,
                "summary": summary[-1] if summary else done.stderr.strip().splitlines()[-1:]}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--ref", default="HEAD")
    ap.add_argument("--out", default=str(BENCH_RESULTS / "ci_time.md"))
    args = ap.parse_args()
    ref = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    rows = []
    for r in (args.baseline, ref):
        rows.append(run_ci(r))
        print(rows[-1], flush=True)
    lines = [
        "# CI time: `.ci/run` at two refs, one after the other on this machine",
        "",
        f"Command: `python -m eval.bench.bench_ci --baseline {args.baseline} --ref {args.ref}`. Each run: a fresh clone, "
        "`CI=true bash .ci/run` (new virtual environment, install, README's test command), empty torch "
        "extension and model caches.",
        "",
        "| ref | commit | exit | wall | pytest |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ref']} | {row['commit']} | {row['code']} | {row['wall']:.0f} s | {row['summary']} |"
        )
    lines += ["", f"Ratio {rows[1]['ref']} / {rows[0]['ref']}: **{rows[1]['wall'] / rows[0]['wall']:.2f}**", "",
              f"Machine: {machine()}"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
