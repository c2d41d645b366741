"""GPTQ vs round-to-nearest on SmolLM2-135M: perplexity, KL and top-1 agreement against fp32.

    python -m eval.bench.bench_gptq [--samples 128] [--seq-len 512] [--max-tokens 16384] [--rows a,b,...]
                                    [--out eval/results/bench/gptq_smollm2.md]

Protocol: WikiText-2 test, `sinkquant.evaluate` (windows of 1024 tokens, the first `max-tokens`
tokens), fp32 reference for KL / top-1. The calibration report (outlier columns, sink positions) comes
from 32 x 512 tokens of C4 validation; GPTQ calibrates on `samples` x `seq-len` tokens of the same
file. Every row starts from the same fp32 model. The GPTQ rows are timed (calibration samples, the
layer-by-layer passes and the quantization itself); the default row is run twice and its tensors
compared byte for byte.

Peer (row `llmcompressor`): llm-compressor's GPTQ W4A16 on the same calibration token ids, run in a
virtual environment of its own (`eval/lib/peers`, its pins clash with ours); its compressed-tensors
checkpoint is decompressed there and scored here with the same evaluator. llm-compressor refuses a
group size that does not divide every layer's width, so it runs at the largest of 128/64/32 that does
(64 on SmolLM2, whose hidden size is 576), and `gptq-g64` is sinkquant at that group size.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from eval.lib.common import BENCH_RESULTS, ROOT, SHARED, WIKITEXT, default_model
from sinkquant import calibrate, evaluate
from sinkquant.calibrate import Calibration
from sinkquant.data import calibration_samples
from sinkquant.loading import prepare_model
from sinkquant.quantize.gptq import gptq_quantize_
from sinkquant.quantize.weights import quantize_
from sinkquant.recipe import Recipe

C4 = SHARED / "data" / "c4-validation-2k.jsonl"

#: row name -> (label, recipe overrides on top of the GPTQ base (W4 g128 + 1% columns by mean |x|,
#: clip search on: the shipped `w4-g128-gptq.yaml` settings), None for RTN or the extra keyword options
#: of `gptq_quantize_`)
_SINK = "weights.gptq.sink_tokens"
ROWS = {
    "rtn": ("W4 g128 RTN + 1% cols (clip search)", {}, None),
    "gptq": ("W4 g128 GPTQ + 1% cols (sink_tokens include)", {}, {}),
    "gptq-no-cols": ("W4 g128 GPTQ, no outlier cols", {"weights.outliers": None}, {}),
    "gptq-exclude": ("W4 g128 GPTQ + 1% cols, sink_tokens exclude", {_SINK: "exclude"}, {}),
    "gptq-cap": ("W4 g128 GPTQ + 1% cols, sink_tokens cap", {_SINK: "cap"}, {}),
    "gptq-act-order": ("W4 g128 GPTQ + 1% cols, act_order", {"weights.gptq.act_order": True}, {}),
    "gptq-damp": ("W4 g128 GPTQ + 1% cols, damping 0.1", {"weights.gptq.damping": 0.1}, {}),
    "gptq-no-clip": ("W4 g128 GPTQ + 1% cols, min/max grid (no clip search)", {"weights.gptq.clip_search": False}, {}),
    "gptq-two-pass": ("W4 g128 GPTQ + 1% cols, two passes per layer (not true sequential)", {}, {"one_pass": False}),
    "gptq-g64": ("W4 g64 GPTQ + 1% cols (llm-compressor's group size)", {"weights.group_size": 64}, {}),
}  # fmt: skip


def _calibration(tok, recipe, report) -> Calibration:
    """The samples a run of `recipe` draws, with the report measured once for every row."""
    c = recipe.calibration
    return Calibration(calibration_samples(tok, c.dataset, c.samples, c.seq_len, c.seed), report)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))
        if a[k].numel() else True
        for k in a
    )  # fmt: skip


def run(args) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    path = default_model()
    fp32, tok = prepare_model(path, "float32")
    info = {"threads": torch.get_num_threads(), "load_start": os.getloadavg()[0]}
    t = time.perf_counter()
    report = calibrate(fp32, tok, str(C4), samples=args.report_samples, seq_len=512, progress=False)
    info["report_s"] = time.perf_counter() - t
    info["sinks"] = report.sinks.positions
    reference = fp32  # the evaluator walks it layer by layer beside each row's model
    base = Recipe().with_overrides(**{
        "weights.algorithm": "gptq", "calibration.dataset": str(C4),
        "calibration.samples": args.samples, "calibration.seq_len": args.seq_len,
        "weights.gptq.clip_search": True,
    })  # fmt: skip

    def score(label, model, seconds=None, note=""):
        res = evaluate(
            model,
            tok,
            str(WIKITEXT),
            seq_len=1024,
            max_tokens=args.max_tokens,
            reference=reference,
            progress=False,
        )
        row = {
            "label": label,
            "ppl": res.perplexity,
            "kl": res.kl,
            "top1": res.top1_agreement,
            "seconds": seconds,
            "note": note,
        }
        print(f"{label:58s} ppl {res.perplexity:8.3f}  KL {res.kl:.4f}  top1 {res.top1_agreement:.4f}"
              + (f"  quantize {seconds:6.1f} s" if seconds else "") + (f"  {note}" if note else ""), flush=True)  # fmt: skip
        return row

    rows = [score("fp32", fp32)]
    for key in args.rows:
        if key == "llmcompressor":
            rows.append(peer_row(fp32, tok, base, args, score, str(path)))
            continue
        label, overrides, extras = ROWS[key]
        recipe = base.with_overrides(**overrides)
        model = copy.deepcopy(fp32)
        t = time.perf_counter()
        if extras is not None:
            gptq_quantize_(model, recipe.weights, _calibration(tok, recipe, report), progress=False, **extras)
        else:
            quantize_(model, recipe.weights, report, progress=False)
        seconds = time.perf_counter() - t
        note = ""
        if key == "gptq" and args.repeat:
            first = _tensors(model)
            again = copy.deepcopy(fp32)
            t = time.perf_counter()
            gptq_quantize_(again, recipe.weights, _calibration(tok, recipe, report), progress=False)
            info["repeat_s"] = time.perf_counter() - t
            info["identical"] = _identical(first, _tensors(again))
            note = f"2nd run {info['repeat_s']:.0f} s, byte-identical: {info['identical']}"
            del again
        rows.append(score(label, model, seconds, note))
        del model
    info["load_end"] = os.getloadavg()[0]
    return rows, info


def peer_row(fp32: nn.Module, tok, base: Recipe, args, score, info_model: str) -> dict:
    """llm-compressor's GPTQ W4A16 on the same calibration ids, scored like every other row."""
    from eval.lib.peers import PeerUnavailable, llmcompressor_w4a16
    from sinkquant.data import calibration_samples

    widths = {m.in_features for m in fp32.modules() if isinstance(m, nn.Linear)}
    group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), None)
    label = f"llm-compressor GPTQ W4A16 g{group} (symmetric, no outlier cols)"
    if group is None:
        return {"label": "llm-compressor GPTQ W4A16", "ppl": None, "note": f"no group size divides {widths}"}
    c = base.calibration
    ids = calibration_samples(tok, c.dataset, c.samples, c.seq_len, c.seed).input_ids
    try:
        info = llmcompressor_w4a16(info_model, ids, ROOT / "runs" / "llmcompressor-gptq", group)
    except PeerUnavailable as exc:
        print(f"{label}: {exc}", flush=True)
        return {"label": label, "ppl": None, "note": str(exc)}
    model = prepare_model(info["dense"], "float32")[0]
    why = f"g128 refused: widths {sorted(widths)} not all multiples of 128; " if group != 128 else ""
    reused = " (reused from an earlier run on the same ids)" if info.get("reused") else ""
    note = f"{why}llmcompressor {info['llmcompressor']}, its run {info['quantize_s']:.0f} s{reused}"
    return score(label, model, info["quantize_s"], note)


def write(rows: list[dict], info: dict, args, out: Path) -> str:
    base = rows[0]["ppl"]
    rtn = next((r for r in rows if r["label"].startswith("W4 g128 RTN")), None)
    lines = [
        "# GPTQ on SmolLM2-135M (W4 g128, 1% outlier input columns)",
        "",
        f"WikiText-2 test, windows of 1024, first {args.max_tokens} tokens; KL(fp32 || model) and top-1 agreement "
        f"with fp32. GPTQ calibration: {args.samples} x {args.seq_len} tokens of C4 validation "
        f"(`{C4.name}`), layer by layer; outlier columns and sink positions {info['sinks']} from a {args.report_samples} x 512 report. "
        "GPTQ defaults: block_size 128, damping 0.01, act_order off, clip search on, one pass per layer "
        "(true sequential); each ablation changes one of them.",
        "",
        "| setting | perplexity | gap to fp32 | gap / RTN gap | KL | top-1 | quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["ppl"] is None:
            lines.append(f"| {r['label']} | could not run: {r['note']} | | | | | |")
            continue
        gap = r["ppl"] / base - 1
        rel = f"{gap / (rtn['ppl'] / base - 1):.2f}" if rtn and r is not rows[0] else ""
        secs = f"{r['seconds']:.0f}" if r["seconds"] else ""
        lines.append(
            f"| {r['label']} | {r['ppl']:.3f} | {gap:+.2%} | {rel} | {r['kl']:.4f} | {r['top1']:.4f} | {secs} |"
        )
    notes = [f"- {r['label']}: {r['note']}" for r in rows if r.get("note") and r["ppl"] is not None]
    lines += ["", *notes] if notes else []
    lines += [
        "",
        f"Machine: {platform.processor() or platform.machine()}, {info['threads']} torch threads, shared "
        f"(1-min load average {info['load_start']:.1f} at the start, {info['load_end']:.1f} at the end). "
        f"The calibration report took {info['report_s']:.0f} s.",
    ]
    if "identical" in info:
        lines.append(
            f"Determinism: the default GPTQ run repeated from the same fp32 model took {info['repeat_s']:.0f} s; "
            f"every tensor of the two quantized models is byte-identical: {info['identical']}."
        )
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + (args.notes.read_text() if args.notes else ""))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--report-samples", type=int, default=32, help="samples of the calibration report")
    choices = [*ROWS, "llmcompressor"]
    parser.add_argument(
        "--rows", default=",".join(choices), help=f"comma-separated, from: {', '.join(choices)}"
    )
    parser.add_argument(
        "--no-repeat", dest="repeat", action="store_false", help="skip the determinism re-run"
    )
    parser.add_argument("--notes", type=Path, help="markdown appended to the results file")
    parser.add_argument("--out", type=Path, default=BENCH_RESULTS / "gptq_smollm2.md")
    args = parser.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in choices]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(choices)}")
    rows, info = run(args)
    print(write(rows, info, args, args.out))


if __name__ == "__main__":
    main()
