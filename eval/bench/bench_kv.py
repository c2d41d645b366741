"""Measured table for the sink-aware KV cache: perplexity, ratio to fp32 and KV bytes per token.

    python -m eval.bench.bench_kv MODEL [--tokens 16384] [--stream-tokens 8192] [--stream-max-tokens 256,1024]
                                    [--out eval/results/bench/kv_smollm2.md]

Protocol: WikiText-2 test, the first --tokens tokens, windows of 1024 fed 64 tokens at a time through
the cache under test (sinkquant.evaluate), residual 64, float32 model. Calibration (sinks, massive
activations) on 16 x 512 tokens of C4 validation; key outlier channels from 8 x 512 of the same.
Streaming: for each --stream-max-tokens M, windows of 8 x M tokens (the first --stream-tokens tokens)
fed in chunks of 64 with eviction beyond M, against the full cache on the same windows (scored in one
pass, which the protocol makes equal to the chunked pass). M=1024 (windows of 8192, SmolLM2's trained
context) is the headline; M=256 shows how a small budget costs context, sinks or not.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from eval.lib.common import BENCH_RESULTS, SHARED, WIKITEXT, tensor_bytes
from sinkquant import calibrate
from sinkquant.architecture import decoder_layers, hidden_of
from sinkquant.calibrate.keys import key_channel_stats, top_key_channels
from sinkquant.data import calibration_samples, load_documents, tokenize_text
from sinkquant.evaluate import evaluate
from sinkquant.kv import KVCacheConfig, SinkDetection, SinkQuantizedCache, build_cache
from sinkquant.loading import prepare_model

C4 = SHARED / "data" / "c4-validation-2k.jsonl"


class Recorder:
    """A cache factory that remembers, per window, what the cache held at the end of the window."""

    def __init__(self, make):
        self.make, self.last, self.windows = make, None, []

    def __call__(self, model):
        self._summarize()
        self.last = self.make(model)
        return self.last

    def _summarize(self):
        cache = self.last
        if cache is None:
            return
        if isinstance(cache, SinkQuantizedCache):
            layers = [layer for layer in cache.layers if hasattr(layer, "quantized_length")]
            mem = cache.memory_bytes()
            qtok = sum(layer.quantized_length for layer in layers)
            sinks = cache.flags.sink.nonzero().flatten().tolist()
            self.windows.append(
                {
                    "qbytes": mem["codes"] + mem["scales"] + mem["key_outlier_channels"],
                    "qtok": qtok,
                    "sinks": sinks,
                    "total": mem["total"],
                    "seen": cache.get_seq_length(),
                }
            )
        elif hasattr(cache.layers[0], "_quantized_keys"):  # transformers QuantizedCache
            qbytes = sum(
                tensor_bytes(layer._quantized_keys) + tensor_bytes(layer._quantized_values)
                for layer in cache.layers
            )
            qtok = sum(layer._quantized_keys.shape[-2] for layer in cache.layers)
            self.windows.append({"qbytes": qbytes, "qtok": qtok, "sinks": [], "total": None, "seen": None})
        self.last = None

    def bytes_per_token(self) -> float | None:
        """Quantized-part bytes per token per layer (sinks and the full-precision residual excluded)."""
        self._summarize()
        qtok = sum(w["qtok"] for w in self.windows)
        return sum(w["qbytes"] for w in self.windows) / qtok if qtok else None


def run_row(name, model, tok, seq_len, tokens, factory, fp16_bytes, rows, base=None, chunk_size=64):
    recorder = Recorder(factory) if factory is not None else None
    start = time.perf_counter()
    try:
        result = evaluate(
            model,
            tok,
            WIKITEXT,
            seq_len=seq_len,
            max_tokens=tokens,
            chunk_size=chunk_size,
            cache_factory=recorder,
            progress=False,
        )
    except Exception as exc:  # a row that cannot run says why (e.g. optimum-quanto missing)
        rows.append(
            {"name": name, "ppl": None, "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
        )
        print(f"{name}: could not run ({rows[-1]['note']})", flush=True)
        return None
    bpt = recorder.bytes_per_token() if recorder else fp16_bytes * 2
    sinks = sorted({p for w in recorder.windows for p in w["sinks"]}) if recorder else []
    row = {
        "name": name,
        "ppl": result.perplexity,
        "ratio": result.perplexity / base if base else 1.0,
        "bytes": bpt,
        "vs_fp16": bpt / fp16_bytes if bpt else None,
        "sinks": sinks,
        "seconds": time.perf_counter() - start,
        "note": "",
    }
    rows.append(row)
    print(
        f"{name}: ppl {row['ppl']:.4f} ratio {row['ratio']:.4f} bytes/token/layer "
        f"{bpt if bpt is None else round(bpt, 1)} sink positions {sinks[:8]} ({row['seconds']:.0f} s)",
        flush=True,
    )
    return result.perplexity


def detection_margin(model, tok, detect: SinkDetection) -> tuple[float, float]:
    """(|h| at position 0, largest |h| at any later position) in the detection dims, first window."""
    ids = torch.tensor(tokenize_text(tok, "\n\n".join(load_documents(WIKITEXT)))[:1024])[None]
    seen = {}
    layer = decoder_layers(model)[detect.layer]
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.__setitem__("h", hidden_of(out)))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    h = seen["h"][0][:, detect.dims].abs().amax(dim=-1)
    return float(h[0]), float(h[1:].max())


def greedy_equal(model, tok, report) -> tuple[bool, int]:
    """Greedy generation, 32 new tokens after a 256-token WikiText prompt: int8 cache vs DynamicCache."""
    ids = torch.tensor(tokenize_text(tok, "\n\n".join(load_documents(WIKITEXT)))[2000:2256])[None]
    kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        cache = build_cache(model, KVCacheConfig(bits=8), report)
        out = model.generate(ids, past_key_values=cache, **kwargs)
        cache.detach()
    quantized = cache.layers[0].quantized_length
    return bool(torch.equal(ref, out)), quantized


def fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows, title, ratio_to="fp32") -> str:
    lines = [
        f"### {title}",
        "",
        f"| cache | perplexity | ratio to {ratio_to} | KV bytes/token/layer | × fp16 | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {fmt(r['ppl'], '.4f')} | {fmt(r.get('ratio'), '.4f')} | "
            f"{fmt(r.get('bytes'), '.1f')} | {fmt(r.get('vs_fp16'), '.3f')} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--stream-tokens", type=int, default=8192)
    parser.add_argument(
        "--stream-max-tokens",
        default="256,1024",
        help="comma-separated cache budgets; each is scored on windows of 8 x the budget",
    )
    parser.add_argument(
        "--parts",
        default="quant,stream",
        help="which tables to measure: quant (quantized cache rows), stream (eviction rows), or both",
    )
    parser.add_argument("--out", default=str(BENCH_RESULTS / "kv_smollm2.md"))
    args = parser.parse_args(argv)

    model, tok = prepare_model(args.model, "float32")
    cfg = model.config
    fp16_bytes = (
        2 * cfg.num_key_value_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * 2
    )
    t0 = time.perf_counter()
    report = calibrate(model, tok, C4, samples=16, seq_len=512, progress=False)
    detect = SinkDetection.from_report(report)
    samples = calibration_samples(tok, C4, 8, 512, 1).input_ids
    top2 = top_key_channels(key_channel_stats(model, samples, exclude=report.sinks.positions or [0]), 2)
    print(
        f"calibration {time.perf_counter() - t0:.0f} s: sinks {report.sinks.positions}, detection {detect}",
        flush=True,
    )
    margin = detection_margin(model, tok, detect) if detect else None

    def sq(**kw):
        config = KVCacheConfig(residual=64, **kw)
        return lambda m: build_cache(m, config, report, top2 if config.key_outlier_channels else None)

    def quanto(bits):
        from transformers import QuantizedCache

        return lambda m: QuantizedCache(backend="quanto", config=m.config, nbits=bits)

    parts = set(args.parts.split(","))
    rows: list[dict] = []
    specs = [
        ("int8, sinks", sq(bits=8)),
        ("int4 per-channel keys, sinks", sq(bits=4)),
        ("int4 per-channel keys, no sinks", sq(bits=4, sinks="none")),
        ("int2 per-channel keys, sinks", sq(bits=2)),
        ("int2 per-channel keys, no sinks", sq(bits=2, sinks="none")),
        ("int2 per-channel keys, sinks + 2 key outlier channels", sq(bits=2, key_outlier_channels=2)),
        ("transformers QuantizedCache quanto int2 (defaults)", quanto(2)),
        ("transformers QuantizedCache quanto int4", quanto(4)),
    ]
    if "quant" in parts:
        base = run_row("fp32 DynamicCache", model, tok, 1024, args.tokens, None, fp16_bytes, rows)
        rows[-1]["bytes"], rows[-1]["vs_fp16"] = 2 * fp16_bytes, 2.0
        for name, factory in specs:
            run_row(name, model, tok, 1024, args.tokens, factory, fp16_bytes, rows, base)

    stream: list[dict] = []
    budgets = [int(b) for b in args.stream_max_tokens.split(",") if b] if "stream" in parts else []
    for budget in budgets:
        window = 8 * budget
        full = run_row(
            f"fp32 DynamicCache, full {window}", model, tok, window, args.stream_tokens, None, fp16_bytes,
            stream, chunk_size=None,
        )  # fmt: skip
        stream[-1]["bytes"], stream[-1]["vs_fp16"] = 2 * fp16_bytes, 2.0
        for name, factory in [
            (f"int4, sinks, max_tokens {budget}", sq(bits=4, max_tokens=budget)),
            (f"int4, no sinks, max_tokens {budget}", sq(bits=4, sinks="none", max_tokens=budget)),
        ]:
            run_row(name, model, tok, window, args.stream_tokens, factory, fp16_bytes, stream, full)

    same, quantized = greedy_equal(model, tok, report)
    quant_notes = [
        f"- calibration (16 x 512 tokens of C4): sinks {report.sinks.positions}; run-time detection {detect}.",
        f"- detection margin on the first window: |h| at position 0 = {margin[0]:.0f}, largest later |h| = "
        f"{margin[1]:.1f}, threshold {detect.threshold:.0f}."
        if margin
        else "- no run-time detection.",
        f"- greedy generate, 32 new tokens after a 256-token prompt: int8 cache equals the fp cache: {same} "
        f"({quantized} tokens per layer quantized).",
    ]
    if rows:
        quant_notes[:0] = [
            f"- model `{args.model}`, float32; WikiText-2 test, first {args.tokens} tokens, windows of 1024 fed in chunks "
            "of 64, residual 64, group 64 (keys: 64 tokens per channel; values: per token over head_dim), "
            "scales/minimums float16; bytes exclude sinks and the full-precision residual (fp16 = "
            f"{fp16_bytes} bytes/token/layer).",
            f"- sink positions kept per window: {rows[1].get('sinks') if len(rows) > 1 else 'n/a'}.",
        ]
    stream_notes = [
        f"- streaming: first {args.stream_tokens} tokens in windows of 8 x max_tokens ({budgets}), chunks of "
        "64; once a window holds max_tokens the oldest quantized groups are evicted (sinks kept or not); the "
        "ratio is to the full cache on the same windows, scored in one pass.",
    ]
    text = (
        "\n\n".join(
            [
                f"## KV cache: {Path(args.model).name}",
                *([table(rows, "Quantized KV cache")] if rows else []),
                *([table(stream, "Streaming (eviction)", "full cache")] if stream else []),
                "\n".join(quant_notes + (stream_notes if stream else [])),
            ]
        )
        + "\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
