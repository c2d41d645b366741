"""Memory and time of quantizing and scoring models of growing size, streamed from disk layer by layer.

    python -m eval.bench.bench_scale [--limit-mib 3072] [--rows smollm2,rtn-24,gptq-24,eval-24,rtn-48]
                                     [--baseline REF] [--out eval/results/bench/scale.md]

Every job is the `sinkquant` command a user types, run as a child process (inside a cgroup memory limit
through `../shared/tools/memlimit.sh` when the machine allows one; that limit counts page cache too, and
reclaims it under pressure, so a job that reads more file bytes than the limit shows the limit as its
cgroup peak). Peak memory is the child's peak RSS (the memory the job itself held) and, under a limit,
the cgroup's peak; phase times are the ones `sinkquant quantize` prints.

Rows:
* `smollm2`: SmolLM2-135M with the default recipe (W4 g128 RTN + 1% columns, 32 x 512 calibration),
  run twice side by side: by sinkquant at git ref `--baseline` (default: the last commit before the
  streaming executor, which loaded the whole model in float32) and by this checkout (streamed); the
  ratio of their quantize times (load + calibrate + quantize + save) is printed.
* `rtn-24` / `gptq-24`: the 1.7 B random-weight Llama of `make_synthetic_model.py` (24 layers, 3.2 GiB
  bf16), W4 g128 + 1% columns, RTN / GPTQ, calibrated on 4 x 256 tokens, under `--limit-mib`.
* `eval-24`: `sinkquant eval` of the RTN checkpoint, 8 windows of 256 tokens, under the same limit.
* `rtn-48`: the 48-layer variant (6.4 GiB bf16), RTN as `rtn-24`: its peak against the 24-layer one's.

The synthetic models are written once into `runs/scale/` (git-ignored) and reused.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eval.lib.common import BENCH_RESULTS, ROOT, SHARED, WIKITEXT, default_model, machine

RUNS = ROOT / "runs" / "scale"
MEMLIMIT = SHARED / "tools" / "memlimit.sh"
BASELINE = "fc6ae61"  # the last commit that loaded the whole model in float32


def synthetic(layers: int, tokenizer_from: str) -> Path:
    folder = RUNS / f"synthetic-{layers}"
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_synthetic_model.py"), str(folder),
                        "--layers", str(layers), "--tokenizer-from", tokenizer_from], check=True)  # fmt: skip
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def can_limit() -> bool:
    if not MEMLIMIT.is_file() or os.geteuid() != 0:
        return False
    probe = subprocess.run(["bash", str(MEMLIMIT), "64", "true"], capture_output=True, text=True)
    return probe.returncode == 0


def run(command: list[str], limit_mib: int | None, pythonpath: str | None = None) -> dict:
    """Run one job; returns its wall time, peak memory, exit code and output."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", SINKQUANT_PROGRESS="0")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    full = (["bash", str(MEMLIMIT), str(limit_mib)] if limit_mib else []) + command
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        child = subprocess.Popen(full, stdout=out_file, stderr=err_file, text=True, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this job's own peak RSS (its children included)
        wall = time.perf_counter() - start
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    code = os.waitstatus_to_exitcode(status)
    peak = re.search(r"memlimit: peak (\d+) MiB", err)
    rss = usage.ru_maxrss // 1024
    times = dict(re.findall(r"(\w+) ([\d.]+)s", (re.search(r"^time: (.*)$", out, re.M) or [None, ""])[1]))
    return {
        "code": code,
        "wall": wall,
        "cgroup_mib": int(peak.group(1)) if peak else None,
        "rss_mib": rss,
        "times": {k: float(v) for k, v in times.items()},
        "out": out,
        "err": err,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from sinkquant.cli.app import main; main()", *args]


def baseline_tree(ref: str) -> Path:
    tree = Path(tempfile.mkdtemp(prefix="sinkquant-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)  # fmt: skip
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-mib", type=int, default=3072)
    ap.add_argument("--rows", default="smollm2,rtn-24,gptq-24,eval-24,rtn-48")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--out", default=str(BENCH_RESULTS / "scale.md"))
    args = ap.parse_args()
    rows = args.rows.split(",")
    RUNS.mkdir(parents=True, exist_ok=True)
    smollm2 = default_model()
    limit = args.limit_mib if can_limit() else None
    if limit is None:
        print(
            f"note: no cgroup memory limit can be set here; jobs run without the {args.limit_mib} MiB limit"
        )
    table: list[dict] = []

    def record(name: str, model: Path, job: str, result: dict, extra: str = "") -> dict:
        params = parameters(model)
        row = {"row": name, "model": model.name, "params": params, "bytes": folder_bytes(model), "job": job,
               **result, "extra": extra}  # fmt: skip
        table.append(row)
        status = (
            "ok"
            if result["code"] == 0
            else f"exit {result['code']}: {result['err'].strip().splitlines()[-1:]}"
        )
        print(f"{name}: {status}, {result['wall']:.1f} s, cgroup peak {result['cgroup_mib']} MiB, "
              f"rss {result['rss_mib']} MiB {extra}", flush=True)  # fmt: skip
        return row

    out_dir = RUNS / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    if "smollm2" in rows:
        tree = baseline_tree(args.baseline)
        try:
            source = Path(smollm2)
            before = run(cli("quantize", smollm2, str(out_dir / "smollm2-baseline")), None, str(tree))
            after = run(cli("quantize", smollm2, str(out_dir / "smollm2-streamed")), None)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        phases = ("load", "calibrate", "quantize", "save")
        spent = [sum(r["times"].get(p, 0.0) for p in phases) for r in (before, after)]
        ratio = spent[1] / spent[0] if spent[0] else float("nan")
        record("smollm2", source, f"quantize (baseline {args.baseline}, whole model in float32)", before)
        size = sum(p.stat().st_size for p in (out_dir / "smollm2-streamed").iterdir()) / sum(
            p.stat().st_size for p in source.iterdir()
        )
        record("smollm2", source, "quantize (streamed)", after,
               f"time {ratio:.2f}x the baseline's; folder {size:.3f}x the fp16 source folder")  # fmt: skip
    for layers in (24, 48):
        want = [r for r in rows if r.endswith(f"-{layers}")]
        if not want:
            continue
        model = synthetic(layers, smollm2)
        common = ["--samples", "4", "--seq-len", "256"]
        for algorithm in ("rtn", "gptq"):
            if f"{algorithm}-{layers}" in want:
                target = out_dir / f"{algorithm}-{layers}"
                result = run(
                    cli("quantize", str(model), str(target), "--algorithm", algorithm, *common), limit
                )
                record(f"{algorithm}-{layers}", model, f"quantize W4 g128 {algorithm} + 1% columns", result)
        if f"eval-{layers}" in want:
            target = out_dir / f"rtn-{layers}"
            result = run(cli("eval", str(target), "--dataset", str(WIKITEXT), "--seq-len", "256",
                             "--max-tokens", str(8 * 256)), limit)  # fmt: skip
            ppl = re.search(r"perplexity[^\d]*([\d.]+)", result["out"])
            record(f"eval-{layers}", model, "eval, 8 windows of 256 tokens", result,
                   f"perplexity {ppl.group(1) if ppl else '?'}")  # fmt: skip
    write_table(table, args, limit)


def write_table(table: list[dict], args, limit: int | None) -> None:
    lines = [
        "# Scale: peak memory and time, models streamed from disk layer by layer",
        "",
        f"Command: `python -m eval.bench.bench_scale --limit-mib {args.limit_mib} --rows {args.rows}`; "
        f"memory limit: {f'{limit} MiB (cgroup)' if limit else 'none could be set'}.",
        "",
        "| row | model | parameters | safetensors | job | exit | peak (cgroup) | peak RSS | load | calibrate | "
        "quantize | save | total | s per B params (quantize) | note |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        t = r["times"]
        per_billion = t.get("quantize", 0) / (r["params"] / 1e9) if "quantize" in t else None
        total = t.get("total", r["wall"])
        cells = [
            r["row"], r["model"], f"{r['params'] / 1e9:.3f} B", f"{r['bytes'] / 2**20:,.0f} MiB", r["job"],
            str(r["code"]), f"{r['cgroup_mib']:,} MiB" if r["cgroup_mib"] else "-", f"{r['rss_mib']:,} MiB",
            *(f"{t[p]:.1f} s" if p in t else "-" for p in ("load", "calibrate", "quantize", "save")),
            f"{total:.1f} s", f"{per_billion:.0f}" if per_billion else "-", r["extra"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    peaks = {r["row"]: r["rss_mib"] for r in table}  # a cgroup peak also counts reclaimable page cache
    if "rtn-24" in peaks and "rtn-48" in peaks:
        lines += ["", f"48 layers against 24: peak RSS {peaks['rtn-48'] / peaks['rtn-24']:.2f}x."]
    info = machine()
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
