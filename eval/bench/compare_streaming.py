"""SmolLM2 before and after the streaming executor: the same tensors, the same calibration report.

    python -m eval.bench.compare_streaming [--baseline REF] [--recipes w4-g128-outliers,w4-g128-gptq,w8]
                                           [--out eval/results/bench/streaming_identical.md]

Each recipe runs as a user runs it (`sinkquant quantize MODEL OUT --recipe recipes/NAME.yaml`) once with
sinkquant at git ref `--baseline` (a worktree; that code loaded the whole model in float32 and saved
every tensor as float32) and once with this checkout (streamed; tensors outside the quantized layers
saved in the source's dtype, fp16 for SmolLM2). Compared per tensor:
* the quantized layers' buffers (codes, scales, minima, outlier columns, indices): byte for byte;
* every other tensor: the new one must equal the old float32 one cast to the new dtype, and that cast
  must be exact (the old float32 value is the fp16 source value, so nothing is lost by storing fp16).
Then `sinkquant calibrate` (32 x 512 embedded C4) is run by both and the JSON reports compared field by
field (`elapsed_s` left out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from eval.lib.common import BENCH_RESULTS, ROOT, WIKITEXT, default_model

BASELINE = "fc6ae61"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def compare(old: Path, new: Path) -> dict:
    a, b = tensors(old), tensors(new)
    quantized = set(json.loads((new / "config.json").read_text())["quantization_config"]["layers"])
    exact = cast = differ = 0
    bad: list[str] = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            differ += 1
            bad.append(name)
            continue
        x, y = a[name], b[name]
        if name.rpartition(".")[0] in quantized or name.rpartition(".")[0].rpartition(".")[0] in quantized:
            ok = x.dtype == y.dtype and torch.equal(x, y)
            exact += ok
        else:
            ok = torch.equal(x.to(y.dtype), y) and torch.equal(x.to(y.dtype).to(x.dtype), x)
            cast += ok
        if not ok:
            differ += 1
            bad.append(name)
    return {"tensors": len(b), "exact": exact, "cast": cast, "differ": differ, "bad": bad[:5],
            "old_bytes": sum(p.stat().st_size for p in old.iterdir()),
            "new_bytes": sum(p.stat().st_size for p in new.iterdir())}  # fmt: skip


def cli(tree: Path | None, *args: str) -> str:
    env_path = f"import sys; sys.path.insert(0, {str(tree)!r}); " if tree else ""
    code = env_path + "from sinkquant.cli.app import main; main()"
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--recipes", default="w4-g128-outliers,w4-g128-gptq,w8")
    ap.add_argument("--out", default=str(BENCH_RESULTS / "streaming_identical.md"))
    ap.add_argument(
        "--score",
        action="store_true",
        help="also score both checkpoints of every recipe (this checkout's evaluator, 16,384 tokens)",
    )
    args = ap.parse_args()
    model = default_model()
    work = Path(tempfile.mkdtemp(prefix="sinkquant-compare-"))
    tree = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True,
                   capture_output=True)  # fmt: skip
    lines = [
        "# SmolLM2 before and after the streaming executor",
        "",
        f"`python -m eval.bench.compare_streaming --baseline {args.baseline} --recipes {args.recipes}`: each recipe run "
        f"by sinkquant at {args.baseline} (whole model in float32, every tensor saved float32) and by this "
        "checkout (streamed layer by layer, tensors outside the quantized layers saved in the source's fp16).",
        "",
        "| recipe | tensors | quantized-layer buffers byte-identical | other tensors equal (old cast exactly to fp16) "
        "| differ | folder before | folder after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    scored = "not run (w4-g128-outliers not among the recipes)"
    scores: list[str] = []
    try:
        for recipe in args.recipes.split(","):
            path = ROOT / "recipes" / f"{recipe}.yaml"
            cli(tree, "quantize", model, str(work / f"{recipe}-old"), "--recipe", str(path))
            cli(None, "quantize", model, str(work / f"{recipe}-new"), "--recipe", str(path))
            r = compare(work / f"{recipe}-old", work / f"{recipe}-new")
            if recipe == "w4-g128-outliers":  # the foundation protocol, by the streamed evaluator
                scored = cli(None, "eval", str(work / f"{recipe}-new"), "--dataset", str(WIKITEXT),
                             "--max-tokens", "16384").strip().splitlines()[-1]  # fmt: skip
            if args.score:
                for who in ("old", "new"):
                    out = cli(None, "eval", str(work / f"{recipe}-{who}"), "--dataset", str(WIKITEXT),
                              "--max-tokens", "16384").strip().splitlines()[-1]  # fmt: skip
                    scores.append(
                        f"- `{recipe}`, quantized by {'the baseline' if who == 'old' else 'this checkout'}: `{out}`"
                    )
            print(recipe, r, flush=True)
            lines.append(f"| `{recipe}` | {r['tensors']} | {r['exact']} | {r['cast']} | {r['differ']} "
                         f"{r['bad'] or ''} | {r['old_bytes'] / 2**20:.1f} MiB | {r['new_bytes'] / 2**20:.1f} MiB |")  # fmt: skip
        lines += ["", f"`sinkquant eval OUT --dataset wikitext-2-raw-test.txt --max-tokens 16384` on the new "
                  f"`w4-g128-outliers` checkpoint (streamed): `{scored}`"]  # fmt: skip
        if scores:
            lines += ["", "Both checkpoints of each recipe scored by this checkout's `sinkquant eval` (16,384 tokens):", "",
                      *scores]  # fmt: skip
        for who, where in (("old", tree), ("new", None)):
            cli(where, "calibrate", model, "--out", str(work / f"calib-{who}.json"))
        reports = [json.loads((work / f"calib-{w}.json").read_text()) for w in ("old", "new")]
        for r in reports:
            r.pop("elapsed_s", None)
        added = sorted({k for stats in reports[1]["linear"].values() for k in stats}
                       - {k for stats in reports[0]["linear"].values() for k in stats})  # fmt: skip
        for stats in reports[1]["linear"].values():  # fields the baseline did not measure
            for key in added:
                stats.pop(key, None)
        fields = sorted(set(reports[0]) | set(reports[1]))
        differ = [f for f in fields if reports[0].get(f) != reports[1].get(f)]
        sinks = reports[1]["sinks"]["positions"]
        dims = reports[1]["massive"]["dims"]
        lines += [
            "",
            f"`sinkquant calibrate MODEL --out REPORT.json` (32 x 512 embedded C4) by both: {len(fields)} top-level "
            f"fields, {len(differ)} differ{': ' + ', '.join(differ) if differ else ''}. Sink positions {sinks}, "
            f"massive dims {dims}; per-channel statistics of all {len(reports[1]['linear'])} linear layers "
            f"{'identical' if reports[0]['linear'] == reports[1]['linear'] else 'different'}"
            f"{' (fields new since the baseline, not compared: ' + ', '.join(added) + ')' if added else ''}.",
        ]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
