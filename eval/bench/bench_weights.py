"""Weight quantization quality on one model, every row measured in one run.

    python -m eval.bench.bench_weights [MODEL] [--tokens 16384] [--dataset WIKITEXT] [--calib-samples 32]

Rows: fp32; sinkquant W8 per channel; W4 g128 round-to-nearest (min/max, and with the clip search);
W4 g128 + 1% outlier input columns chosen by max |x| and by mean |x| (min/max only, clip search
weighted without the sink tokens (the default) and with them); W4 per channel + 1%; bitsandbytes
nf4 (`BitsAndBytesConfig`).
Each row: perplexity (the fixed protocol: seq-len 1024, first N tokens), ratio to fp32, KL divergence
to fp32, top-1 agreement, and bytes of the quantized tensors vs their fp16 bytes. Writes a markdown
table to eval/results/bench/weights_<model>.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from eval.lib.common import BENCH_RESULTS, WIKITEXT, bnb_nf4, default_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dataset", default=str(WIKITEXT))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--no-bnb", action="store_true")
    parser.add_argument(
        "--out", default=None, help="results file (default: eval/results/bench/weights_<model>.md)"
    )
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    from sinkquant import calibrate, evaluate
    from sinkquant.loading import prepare_model
    from sinkquant.quantize.weights import quantize_
    from sinkquant.recipe import Recipe

    model_path = args.model or default_model()
    fp32, tok = prepare_model(model_path, "float32")
    start = time.perf_counter()
    report = calibrate(fp32, tok, None, samples=args.calib_samples, seq_len=512, progress=False)
    print(
        f"calibration: {args.calib_samples} x 512 tokens of the embedded C4 slice, {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    reference = fp32  # the evaluator walks it layer by layer beside each row's model

    def score(model):
        return evaluate(
            model,
            tok,
            args.dataset,
            1024,
            args.tokens,
            reference=reference if model is not fp32 else None,
            progress=False,
        )

    rows = []
    base = score(fp32)
    rows.append(("fp32", base, None))
    print(f"fp32: {base.perplexity:.4f}", flush=True)
    no_cols = {"weights.outliers": None}
    variants = [
        ("sinkquant W8 per channel", {"weights.bits": 8, **no_cols}),
        ("sinkquant W4 g128 RTN, min/max only", {"weights.clip_search": False, **no_cols}),
        ("sinkquant W4 g128 RTN, clip search, no cols", no_cols),
        ("sinkquant W4 g128 + 1% cols (max |x|), clip search", {"weights.outliers.select": "max"}),
        ("sinkquant W4 g128 + 1% cols (mean |x|), min/max only", {"weights.clip_search": False}),
        (
            "sinkquant W4 g128 + 1% cols (mean |x|), clip search without the sink tokens (default)",
            {"weights.outliers.select": "mean"},
        ),
        (
            "sinkquant W4 g128 + 1% cols (mean |x|), clip search with the sink tokens",
            {"weights.clip_sink_tokens": "include"},
        ),
        ("sinkquant W4 per channel + 1% cols (mean |x|), clip search", {"weights.group_size": "channel"}),
    ]
    for name, overrides in variants:
        model = copy.deepcopy(fp32)
        summary = quantize_(model, Recipe().with_overrides(**overrides).weights, report, progress=False)
        result = score(model)
        rows.append((name, result, summary.bytes_after / summary.bytes_before))
        print(f"{name}: {result.perplexity:.4f}", flush=True)
        del model
    if not args.no_bnb:
        try:
            model = bnb_nf4(model_path)
            result = score(model)
            rows.append(("bitsandbytes nf4", result, None))
            print(f"bnb nf4: {result.perplexity:.4f}", flush=True)
        except Exception as exc:  # a peer that cannot run is a row that says why
            rows.append(
                (
                    f"bitsandbytes nf4 (could not run: {type(exc).__name__}: {str(exc).splitlines()[0][:80]})",
                    None,
                    None,
                )
            )

    lines = [
        f"# Weight quantization quality: {Path(model_path).name} ({time.strftime('%Y-%m-%d')})",
        "",
        f"Protocol: {Path(args.dataset).name}, first {args.tokens} tokens, seq-len 1024, fp32 activations unless the "
        "kernel needs bf16 (int4). Calibration: "
        f"{args.calib_samples} x 512 tokens of the embedded C4 slice. All rows measured in this one run.",
        "",
        "| method | perplexity | vs fp32 | KL to fp32 | top-1 agree | quantized bytes / fp16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, res, ratio in rows:
        if res is None:
            lines.append(f"| {name} | – | – | – | – | – |")
            continue
        kl = f"{res.kl:.4f}" if res.kl is not None else "0"
        top1 = f"{res.top1_agreement:.4f}" if res.top1_agreement is not None else "1"
        lines.append(
            f"| {name} | {res.perplexity:.3f} | {res.perplexity / base.perplexity - 1:+.2%} | {kl} | {top1} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else BENCH_RESULTS / f"weights_{Path(model_path).name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
