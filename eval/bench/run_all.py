"""The peer comparison in one command: quality, then speed, then eval/RESULTS.md with its plots.

    python -m eval.bench.run_all [MODEL] [--quick] [--rows PATTERNS] [--skip PATTERNS] [--tokens N]
                                 [--out eval/RESULTS.md]
    python -m eval.bench.run_all [MODEL] --render-only      # rebuild RESULTS.md from the last run's JSON

MODEL: any HF causal-LM folder; default SmolLM2-135M (materialized by ../shared/tools);
/work/shared/models/stories260k is the quick case. The record run scores the first 8,192 WikiText-2
tokens (8 windows of 1024; `--tokens 16384` for the README's full protocol). --quick: 8 x 256
calibration and GPTQ tokens, 3 speed repeats (for trying the harness, not for the record).

Runs eval/bench/bench_quality.py and eval/bench/bench_speed.py, each in its own process (the speed run reuses the
calibration report the quality run wrote), with the protocols their docstrings state. Their JSON goes
to runs/bench/; RESULTS.md (next to --out: plots/*.png) holds the date, the machine, the protocols,
both tables, three plots (perplexity vs bits per weight, perplexity vs KV bytes per token, decode
tokens/s per method) and a "claims" section computed from the measured numbers: each claim of the
issue gets ✓ or ✗ with the numbers it was judged on, or says why it could not be judged. A quality
claim holds when sinkquant's perplexity and KL are both lower at equal or fewer bits per weight (KV
bytes per token for cache rows). --skip leaves quality rows out (peers that take an hour on 2 cores and
have no checkpoint from an earlier run); the table lists them as not run. RESULTS.md
is generated, never edited by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from eval.bench import bench_quality, bench_speed
from eval.lib.common import ROOT, RUNS, default_model, machine, model_name

EVAL = ROOT / "eval"  # RESULTS.md and its plots/

#: the issue's claims: (quality row of sinkquant, peer rows it must beat, what the claim is about)
QUALITY_CLAIMS = [
    ("sq-w4-cols", ["bnb-nf4", "quanto-int4", "hqq-4", "torchao-int4"], "W4 weights, RTN"),
    (
        "sq-gptq-cols",
        ["llmc-gptq", "autoround", "autoround-light", "llmc-awq", "llmc-awq-gptq"],
        "W4 weights, GPTQ",
    ),
    (
        "sq-compact",
        ["autoround", "autoround-light", "llmc-awq", "llmc-awq-gptq"],
        "W4 weights at AutoRound's bits (one-byte log scales)",
    ),
    ("sq-kv4", ["qc-quanto-4", "qc-hqq-4"], "KV cache, 4 bits"),
    ("sq-kv2", ["qc-quanto-2", "qc-hqq-2"], "KV cache, 2 bits"),
]
SPEEDUP_VS_BF16 = 1.25
#: evaluation tokens of the quality half: 8 windows of 1024, so that a claim rests on more than two
#: windows (the README protocol's 16,384 doubles the quality half's evaluation time; `--tokens 16384`).
RECORD_TOKENS = 8192
#: the speed half's methods: the issue's list plus bf16 and sinkquant W4 with a static cache and
#: torch.compile; the static-cache-only rows stay in `eval/bench/bench_speed.py` (about a minute each).
SPEED_ROWS = [
    "fp32", "bf16", "sq-w8", "sq-w4", "sq-w4-kv4", "bnb-int8", "bnb-nf4", "torchao-int4",
    "bf16-compile", "sq-w4-compile",
]  # fmt: skip
SPEED_TIMEOUT = 420  # seconds per speed method (compilation included)
BANDWIDTH_SHARE = 0.60
BUSY = 0.05  # other processes' share of the CPUs above which a timing is flagged as unreliable


# -- claims ---------------------------------------------------------------------------------------------


def _by_key(rows: list[dict]) -> dict[str, dict]:
    return {r["key"]: r for r in rows}


def _missing(row: dict | None, key: str) -> str | None:
    if row is None:
        return f"`{key}` was not measured in this run"
    if "error" in row:
        return f"{row['label']} could not run ({row['error']})"
    return None


def quality_claims(quality: dict) -> list[str]:
    rows = _by_key(quality["rows"])
    lines = []
    for mine, peers, what in QUALITY_CLAIMS:
        ours = rows.get(mine)
        for peer_key in peers:
            peer = rows.get(peer_key)
            reason = _missing(ours, mine) or _missing(peer, peer_key)
            if reason:
                lines.append(f"- – {what}: not judged: {reason}.")
                continue
            if "ONLY" in (peer.get("note") or ""):
                lines.append(
                    f"- – {what}: not judged against {peer['label']}: it quantized only part of the model "
                    f"({peer['note']}); perplexity {ours['ppl']:.3f} vs {peer['ppl']:.3f}."
                )
                continue
            better = ours["ppl"] < peer["ppl"] and ours["kl"] < peer["kl"]  # both, as the issues ask
            size = "kv_bytes" if ours["kind"] == "kv" else "bits"
            # at equal or fewer bits (KV bytes): a win bought with more storage is not the claim
            cheaper = ours.get(size) is None or peer.get(size) is None or ours[size] <= peer[size] + 0.005
            cost = (
                f"KV bytes/token/layer {_num(ours.get('kv_bytes'), '.1f')} vs {_num(peer.get('kv_bytes'), '.1f')}"
                if size == "kv_bytes"
                else f"bits/weight {_num(ours.get('bits'), '.2f')} vs {_num(peer.get('bits'), '.2f')}"
            )
            verdict = "<" if better else "≥"
            if better and not cheaper:
                verdict = "< (but at more " + ("KV bytes" if size == "kv_bytes" else "bits per weight") + ")"
            lines.append(
                f"- {'✓' if better and cheaper else '✗'} {what}: {ours['label']} perplexity **{ours['ppl']:.3f}** "
                f"{verdict} {peer['label']} **{peer['ppl']:.3f}** "
                f"(KL {ours['kl']:.4f} vs {peer['kl']:.4f}; {cost}{'; ' + peer['note'] if peer.get('note') else ''})."
            )
    return lines


def _num(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _busy(*rows: dict) -> str:
    """A warning when other processes used the CPUs while these timings were taken."""
    shares = [r.get("other_load") for r in rows if r and r.get("other_load") is not None]
    if shares and max(shares) > BUSY:
        return (
            f" ⚠ measured while other processes used up to {max(shares):.0%} of the CPUs: rerun on an idle "
            "machine before relying on this verdict."
        )
    return ""


def speed_claims(speed: dict) -> list[str]:
    rows = _by_key(speed["rows"])
    lines = []
    ours, bf16, nf4 = rows.get("sq-w4"), rows.get("bf16"), rows.get("bnb-nf4")
    reason = _missing(ours, "sq-w4") or _missing(bf16, "bf16")
    if reason:
        lines.append(f"- – decode speed vs bf16: not judged: {reason}.")
    else:
        ratio = ours["decode_tps"] / bf16["decode_tps"]
        ok = ratio >= SPEEDUP_VS_BF16
        lines.append(
            f"- {'✓' if ok else '✗'} decode: {ours['label']} **{ours['decode_tps']:.1f}** tok/s = **{ratio:.2f}x** "
            f"bf16 ({bf16['decode_tps']:.1f} tok/s); the claim is ≥ {SPEEDUP_VS_BF16:.2f}x."
            + _busy(ours, bf16)
        )
    for variant, what in (("static", "static cache"), ("compile", "static cache + torch.compile")):
        mine, base = rows.get(f"sq-w4-{variant}"), rows.get(f"bf16-{variant}")
        if _missing(mine, f"sq-w4-{variant}") or _missing(base, f"bf16-{variant}") or reason:
            continue
        ratio, eager = mine["decode_tps"] / base["decode_tps"], mine["decode_tps"] / bf16["decode_tps"]
        lines.append(
            f"- {'✓' if eager >= SPEEDUP_VS_BF16 else '✗'} decode with {what}: {mine['label']} "
            f"**{mine['decode_tps']:.1f}** tok/s = **{eager:.2f}x** eager bf16 and {ratio:.2f}x bf16 with "
            f"the same {what} ({base['decode_tps']:.1f} tok/s)." + _busy(mine, base)
        )
    reason = _missing(ours, "sq-w4") or _missing(nf4, "bnb-nf4")
    if reason:
        lines.append(f"- – decode speed vs nf4: not judged: {reason}.")
    else:
        ok = ours["decode_tps"] >= nf4["decode_tps"]
        lines.append(
            f"- {'✓' if ok else '✗'} decode: {ours['label']} **{ours['decode_tps']:.1f}** tok/s "
            f"{'≥' if ok else '<'} {nf4['label']} **{nf4['decode_tps']:.1f}** tok/s." + _busy(ours, nf4)
        )
    kernels = speed.get("kernels") or []
    if not kernels:
        lines.append("- – int4 matmul vs memory bandwidth: not judged: no kernel timings in this run.")
    else:
        big = max(kernels, key=lambda k: k["int4_bytes"])
        ok = big["int4_of_bandwidth"] >= BANDWIDTH_SHARE
        shapes = ", ".join(f"{k['shape']} {k['int4_of_bandwidth']:.0%}" for k in kernels if k is not big)
        lines.append(
            f"- {'✓' if ok else '✗'} int4 matmul at batch 1: sinkquant's int4 layer on {big['shape']} "
            f"({big['int4_bytes'] / 2**20:.1f} MiB of weights; copies rotated so they come from memory) reads "
            f"**{big['int4_Bps'] / 1e9:.1f} GB/s = {big['int4_of_bandwidth']:.0%}** of the measured "
            f"{speed['bandwidth']['read_Bps'] / 1e9:.1f} GB/s; the claim is ≥ {BANDWIDTH_SHARE:.0%}. The model's own "
            f"shapes (small layers: fixed costs per call weigh more): {shapes or 'none'}."
            + _busy(speed["bandwidth"])
        )
    return lines


# -- plots ----------------------------------------------------------------------------------------------

COLORS = {
    "ablation": "#9ecae1",
    "reference": "#777777",
    "peer": "#ff7f0e",
    "sinkquant": "#1f77b4",
}  # drawn in this order


def _save(fig, path: Path) -> Path:
    """Write a finished figure as a PNG, free it, and return where it went."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _scatter(ax, points: list[tuple[float, float, str, str]]) -> None:
    for family in COLORS:
        pts = [p for p in points if p[3] == family]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=COLORS[family], label=family, zorder=3)
    for x, y, text, _ in points:
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plots(quality: dict | None, speed: dict | None, folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    if quality:
        ok = [r for r in quality["rows"] if "ppl" in r]
        weights = [
            (r["bits"], r["ppl"], r["key"], r["family"])
            for r in ok
            if r["kind"] in ("weights", "both") and r.get("bits")
        ]
        if weights:
            fig, ax = plt.subplots(figsize=(8, 5.5))
            _scatter(ax, weights)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bits per weight of the quantized linear layers (log scale)")
            ax.set_ylabel("WikiText-2 perplexity")
            ax.set_title(f"{quality['model']}: perplexity vs bits per weight")
            made["ppl_vs_bits"] = _save(fig, folder / "ppl_vs_bits.png")
        kv = [(r["kv_bytes"], r["ppl"], r["key"], r["family"]) for r in ok if r.get("kv_bytes")]
        base = next((r for r in ok if r["key"] == "fp32"), None)
        if kv:
            if base:
                kv.append((quality["kv_fp16_bytes"], base["ppl"], "fp16 cache (fp32 ppl)", "reference"))
            fig, ax = plt.subplots(figsize=(8, 5.5))
            _scatter(ax, kv)
            ax.set_xlabel("KV bytes per token per layer (quantized part)")
            ax.set_ylabel("WikiText-2 perplexity (chunks of 64)")
            ax.set_yscale("log")
            ax.set_title(f"{quality['model']}: perplexity vs KV-cache bytes")
            made["ppl_vs_kv"] = _save(fig, folder / "ppl_vs_kv.png")
    if speed:
        ok = [r for r in speed["rows"] if "decode_tps" in r]
        if ok:
            fig, ax = plt.subplots(figsize=(8, 0.45 * len(ok) + 1.5))
            names = [r["label"] for r in ok]
            colors = [
                COLORS["reference"]
                if r["key"].startswith(("fp32", "bf16"))
                else COLORS["sinkquant"]
                if r["key"].startswith("sq-")
                else COLORS["peer"]
                for r in ok
            ]
            ax.barh(names, [r["decode_tps"] for r in ok], color=colors)
            bf16 = next((r for r in ok if r["key"] == "bf16"), None)
            if bf16:
                ax.axvline(bf16["decode_tps"], color="black", lw=0.8, ls="--", label="bf16")
                ax.axvline(
                    SPEEDUP_VS_BF16 * bf16["decode_tps"], color="red", lw=0.8, ls=":", label="1.25x bf16"
                )
                ax.legend(fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(f"decode tokens/s (batch 1, median of {speed['protocol']['repeats']})")
            ax.set_title(f"{speed['model']}: decode speed, {speed['protocol']['threads']} threads")
            made["decode_tps"] = _save(fig, folder / "decode_tps.png")
    return made


# -- RESULTS.md -----------------------------------------------------------------------------------------


def render(quality: dict | None, speed: dict | None, out: Path, run: dict) -> str:
    made = plots(quality, speed, out.parent / "plots")
    m = (quality or speed)["machine"]
    model = (quality or speed)["model"]

    def img(key: str, alt: str) -> str:
        return f"![{alt}]({made[key].relative_to(out.parent).as_posix()})" if key in made else ""

    versions = (quality or {}).get("versions") or {}
    peers = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "sinkquant") or "none installed"
    lines = [
        f"# sinkquant against its peers: {model}",
        "",
        f"Generated by `{run.get('command', 'python -m eval.bench.run_all')}` on {m['date']}; every number below was "
        "measured in that run and every verdict is computed from them (do not edit by hand: rerun, or "
        "`--render-only` to rebuild this page from the run's JSON).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']} ({m['cores']} cores, {m['cpu_capability']}), {m['threads']} torch threads, "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB memory; 1-minute load average {m['load_average']:.1f} at the start.",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; peers: {peers}.",
        f"- Model: `{(quality or speed)['model_path']}`.",
    ]
    if run.get("seconds"):
        s = run["seconds"]
        lines.append(
            "- Wall time: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in s.items())
            + (" (--quick: not the record protocol)" if run.get("quick") else "")
            + "."
        )
    lines += ["", "## Claims", ""]
    if quality:
        lines += quality_claims(quality)
    if speed:
        lines += speed_claims(speed)
    if quality:
        lines += [
            "",
            "## Quality",
            "",
            bench_quality.protocol(quality),
            "",
            bench_quality.table(quality),
            "",
            img("ppl_vs_bits", "perplexity vs bits per weight"),
            "",
            img("ppl_vs_kv", "perplexity vs KV bytes per token"),
        ]
    if speed:
        lines += ["", "## Speed", "", bench_speed.protocol(speed), "", bench_speed.table(speed), ""]
        lines += [img("decode_tps", "decode tokens/s per method"), ""]
        if speed.get("kernels"):
            lines += [
                "### sinkquant's int4 layer against memory bandwidth",
                "",
                bench_speed.kernel_table(speed),
                "",
            ]
        for r in speed["rows"]:
            if "profile" in r:
                lines += [
                    f"### Where a decode step goes: {r['label']}",
                    "",
                    bench_speed.profile_text(r["profile"], "torch.profiler"),
                    "",
                ]
    return "\n".join(line for line in lines if line is not None).rstrip() + "\n"


def run_bench(module: str, args: list[str]) -> float:
    """`python -m eval.bench.MODULE ARGS` from this working directory (the repository root)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", f"eval.bench.{module}", *args]
    print("$ " + " ".join(cmd), flush=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ}  # local files only, unless told
    done = subprocess.run(cmd, check=False, env=env)
    if done.returncode != 0:
        print(f"{module} exited with {done.returncode}; RESULTS.md keeps what it wrote", flush=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", default=None, help="row keys or patterns for both benchmarks (default all)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"evaluation tokens (default {RECORD_TOKENS}, quick 4096; the full README protocol is 16384)",
    )
    parser.add_argument(
        "--skip", default=None, help="quality rows to leave out (patterns; the table lists them as not run)"
    )
    parser.add_argument("--out", type=Path, default=EVAL / "RESULTS.md")
    parser.add_argument("--render-only", action="store_true", help="rebuild RESULTS.md from the last JSON")
    args = parser.parse_args(argv)
    args.model = args.model or default_model()
    name = model_name(args.model)
    RUNS.mkdir(parents=True, exist_ok=True)
    qjson, sjson, calib = (
        RUNS / f"quality_{name}.json",
        RUNS / f"speed_{name}.json",
        RUNS / f"calib_{name}.json",
    )
    run_json = RUNS / f"run_{name}.json"
    if args.render_only:
        run = json.loads(run_json.read_text()) if run_json.is_file() else {}
    else:
        for path in (qjson, sjson):
            path.unlink(missing_ok=True)
        shared = (
            [args.model] + (["--quick"] if args.quick else []) + (["--rows", args.rows] if args.rows else [])
        )
        start = time.perf_counter()
        seconds = {
            "quality": run_bench(
                "bench_quality",
                shared
                + ["--json", str(qjson), "--save-calibration", str(calib)]
                + (["--skip", args.skip] if args.skip else [])
                + ["--tokens", str(args.tokens or (4096 if args.quick else RECORD_TOKENS))],
            )
        }
        speed_rows = [] if args.rows else ["--rows", ",".join(SPEED_ROWS), "--timeout", str(SPEED_TIMEOUT)]
        seconds["speed"] = run_bench(
            "bench_speed",
            shared
            + speed_rows
            + ["--json", str(sjson)]
            + (["--calibration", str(calib)] if calib.is_file() else []),
        )
        seconds["total"] = time.perf_counter() - start
        run = {
            "command": "python -m eval.bench.run_all " + " ".join(a for a in (argv or sys.argv[1:])),
            "seconds": seconds,
            "quick": args.quick,
            "load_average_end": os.getloadavg()[0],
            "machine": machine(),
        }
        run_json.write_text(json.dumps(run, indent=1))
    quality = json.loads(qjson.read_text()) if qjson.is_file() else None
    speed = json.loads(sjson.read_text()) if sjson.is_file() else None
    if quality is None and speed is None:
        print("no results to write (both benchmarks failed before their first row)", file=sys.stderr)
        return 1
    text = render(quality, speed, args.out, run)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
