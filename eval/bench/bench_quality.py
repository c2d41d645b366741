"""Quality of sinkquant against fp32, bf16 and the peer quantizers on one model, every row in one run.

    python -m eval.bench.bench_quality [MODEL] [--tokens 16384] [--rows PATTERNS] [--skip PATTERNS] [--quick]
                                       [--list] [--calib-samples 32] [--gptq-samples 128] [--json PATH]
                                       [--save-calibration PATH]

MODEL: any HF causal-LM folder (default SmolLM2-135M, materialized by ../shared/tools).

Protocol (`sinkquant.evaluate`, the fixed one of the README): WikiText-2 test, the first --tokens
tokens, non-overlapping windows of 1024 scored on their own; perplexity = exp(mean NLL); KL(p_fp32 ||
p_row) and top-1 agreement against the fp32 model on the same tokens (its logits computed once and
reused by every row). Weight rows run the whole window in one pass with fp32 activations (kernels
that need bf16 see bf16, as they would in use); KV-cache rows feed each window 64 tokens at a time
through the cache under test (protocol step 5) on the fp32 weights.

Rows (`--list` prints keys; `--rows` takes comma-separated keys or shell patterns, e.g. 'sq-*,bnb-*';
`--skip` leaves rows out the same way, and the table keeps them with the reason):
fp32, bf16; sinkquant W8, W4 g128 with and without 1% outlier columns (RTN with clip search: the
recipes), GPTQ W4 g128 with and without columns and the best recipe (GPTQ with act_order), KV8/KV4/KV2 with and without sinks (the kv recipes),
the combined W4 + KV4 recipe with and without sinks; peers: bitsandbytes LLM.int8 (threshold 6.0) and
nf4, optimum-quanto int8/int4, torchao int4 (CPU kernel), HQQ 4-bit, llm-compressor GPTQ, AWQ and AWQ +
GPTQ W4A16 and AutoRound W4A16 (each in its own venv, eval/lib/peers), transformers QuantizedCache (quanto 4/2, HQQ 8/4/2 bits; its defaults: group 64,
residual 128). A row that cannot run is kept, with the one-line reason.

Shared work: one calibration report (--calib-samples x 512 tokens of the C4 slice embedded in
sinkquant, the recipes' default data) for every sinkquant row; GPTQ (sinkquant and llm-compressor)
calibrates on the same --gptq-samples x 512 token ids (128, as the GPTQ recipes ship), and so do AWQ and AutoRound.
A peer's checkpoint is kept under runs/bench/ by model, group and calibration ids and reused by later runs
on the same ids (its note says so), since AWQ and AutoRound take 20 minutes and more on 2 cores. Group sizes: 128 where every layer is at least 128 wide, else the largest of
64/32 that fits (said in the table); peers whose kernels need the group to divide every width
(torchao, llm-compressor) get the largest of 128/64/32 that does, and their row says which.
Results: a table on stdout and JSON (--json, default runs/bench/quality_<model>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import gc
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from eval.bench.bench_kv import Recorder
from eval.lib.common import (
    RECIPES,
    RUNS,
    WIKITEXT,
    bits_per_weight,
    bnb_int8,
    bnb_nf4,
    count_converted,
    default_model,
    dividing_group,
    hqq_weights,
    machine,
    model_name,
    one_line,
    package_version,
    quantizable_linears,
    quanto_weights,
    sinkquant_group,
    tensor_bytes,
    torchao_int4,
)
from sinkquant import calibrate, evaluate, load_recipe
from sinkquant.calibrate import Calibration
from sinkquant.calibrate.keys import measure_key_outlier_idx
from sinkquant.data import calibration_samples
from sinkquant.kv import SinkQuantizedCache, build_cache
from sinkquant.kv.hooks import ModelHooks
from sinkquant.loading import prepare_model
from sinkquant.modeling import stored_dtype
from sinkquant.quantize.algorithms import calibration_needs, quantize_weights
from sinkquant.recipe import Recipe

SEQ_LEN = 1024
CHUNK = 64


@dataclass
class Built:
    """What a row evaluates: a model, optionally a KV-cache factory, and what it costs."""

    model: torch.nn.Module
    factory: Callable | None = None
    bits: float | None = None
    note: str = ""


@dataclass
class Row:
    key: str
    label: str
    family: str  # reference | sinkquant | ablation | peer
    kind: str  # weights | kv | both
    build: Callable[[Bench], Built]


class KVRecorder(Recorder):
    """bench_kv's Recorder, also reading transformers' HQQ-backed QuantizedCache (tuple storage)."""

    def _summarize(self):
        cache = self.last
        layers = getattr(cache, "layers", None) or []
        if not layers or isinstance(cache, SinkQuantizedCache) or not hasattr(layers[0], "_quantized_keys"):
            return super()._summarize()
        qbytes = sum(_qbytes(layer._quantized_keys) + _qbytes(layer._quantized_values) for layer in layers)
        qtok = sum(_qtokens(layer._quantized_keys) for layer in layers)
        self.windows.append({"qbytes": qbytes, "qtok": qtok, "sinks": [], "total": None, "seen": None})
        self.last = None


def _qbytes(q) -> int:
    if isinstance(q, tuple):  # HQQ: (packed tensor, meta dict with scale/zero tensors)
        return tensor_bytes(q[0]) + sum(tensor_bytes(v) for v in q[1].values() if isinstance(v, torch.Tensor))
    return tensor_bytes(q)


def _qtokens(q) -> int:
    if isinstance(q, tuple):
        return int(q[1]["shape"][-2])
    return int(q.shape[-2])


class Bench:
    """The fp32 model (also the KL reference) and the calibration every sinkquant row shares."""

    def __init__(self, args) -> None:
        self.args = args
        self.path = args.model
        self.fp32, self.tok = prepare_model(self.path, "float32")
        self.reference = self.fp32  # the evaluator walks it layer by layer beside each row's model
        linears = quantizable_linears(self.fp32)
        self.linears = {name: m.weight.numel() for name, m in linears.items()}
        self.storage = stored_dtype(self.path)
        self.widths = sorted({m.in_features for m in linears.values()})
        self.group, self.group_why = sinkquant_group(self.widths)
        self.peer_group = dividing_group(self.widths)
        cfg = self.fp32.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_fp16 = 2 * cfg.num_key_value_heads * head_dim * 2  # bytes/token/layer, K and V in fp16
        self.timings: dict[str, float] = {}
        self.models: dict[str, torch.nn.Module] = {}  # quantized models a later row reuses
        self.uses: Counter = Counter()

    @property
    def gtext(self) -> str:
        return f"g{self.group}" if self.group != "channel" else "per channel"

    @cached_property
    def report(self):
        a = self.args
        t = time.perf_counter()
        report = calibrate(self.fp32, self.tok, None, a.calib_samples, a.calib_seq_len, 0, progress=False)
        self.timings["calibration_s"] = time.perf_counter() - t
        if a.save_calibration:
            Path(a.save_calibration).parent.mkdir(parents=True, exist_ok=True)
            report.save(a.save_calibration)
        print(
            f"calibration: {a.calib_samples} x {a.calib_seq_len} tokens, {self.timings['calibration_s']:.0f} s; "
            f"sinks {report.sinks.positions}, massive dims {report.massive.dims}",
            flush=True,
        )
        return report

    @cached_property
    def key_channels(self):
        """2 post-RoPE key channels per KV head (kv2 recipe), from 8 of the calibration samples."""
        a = self.args
        ids = calibration_samples(self.tok, None, min(8, a.calib_samples), a.calib_seq_len, 0).input_ids
        return measure_key_outlier_idx(self.fp32, ids, 2, self.report.sink_positions)

    def gptq_ids(self) -> torch.Tensor:
        a = self.args
        return calibration_samples(self.tok, None, a.gptq_samples, a.gptq_seq_len, 0).input_ids

    def recipe(self, name: str, **overrides) -> Recipe:
        """A recipe file from recipes/, its group fitted to this model, with overrides."""
        recipe = load_recipe(RECIPES / name)
        fields = dict(overrides)
        w = recipe.weights
        if w is not None and w.bits == 4 and w.group == 128 and self.group != 128:
            fields.setdefault("weights.group_size", self.group)
        if w is not None and w.algorithm == "gptq":
            fields.setdefault("calibration.samples", self.args.gptq_samples)
            fields.setdefault("calibration.seq_len", self.args.gptq_seq_len)
            fields.setdefault("calibration.dataset", None)
        return recipe.with_overrides(**fields) if fields else recipe


# -- row builders ---------------------------------------------------------------------------------------


def weights_key(recipe: Recipe) -> str:
    """Rows whose recipes give the same weights share one quantized model (e.g. W4 and W4 + KV4)."""
    key = recipe.weights.model_dump_json()
    return key + recipe.calibration.model_dump_json() if calibration_needs(recipe.weights)[0] else key


def _quantized(b: Bench, recipe: Recipe) -> torch.nn.Module:
    key = weights_key(recipe)
    model = b.models.pop(key, None)
    if model is None:
        model = copy.deepcopy(b.fp32)
        samples = None
        if calibration_needs(recipe.weights)[0]:
            c = recipe.calibration
            samples = calibration_samples(b.tok, c.dataset, c.samples, c.seq_len, c.seed)
        # full-precision columns in the source's dtype, as `sinkquant quantize` stores them
        quantize_weights(model, recipe.weights, Calibration(samples, b.report), storage_dtype=b.storage,
                         progress=False)  # fmt: skip
    b.uses[key] -= 1
    if b.uses[key] > 0:  # a later row evaluates the same weights
        b.models[key] = model
    return model


def _group_note(b: Bench, recipe: Recipe) -> str:
    return b.group_why if recipe.weights.bits == 4 else ""


def sq_weights(recipe_file: str, **overrides) -> Callable[[Bench], Built]:
    def build(b: Bench) -> Built:
        recipe = b.recipe(recipe_file, **overrides)
        model = _quantized(b, recipe)
        return Built(model, bits=bits_per_weight(model, b.linears), note=_group_note(b, recipe))

    build.weights_key = lambda b: weights_key(b.recipe(recipe_file, **overrides))
    return build


def sq_kv(recipe_file: str, weights: bool = False, **changes) -> Callable[[Bench], Built]:
    def build(b: Bench) -> Built:
        recipe = b.recipe(recipe_file)
        config = recipe.kv_cache.model_copy(update=changes)
        outliers = b.key_channels if config.key_outlier_channels else None
        report = b.report

        def factory(model):
            return build_cache(model, config, report, outliers)

        if weights:
            model = _quantized(b, recipe)
            return Built(model, factory, bits_per_weight(model, b.linears), _group_note(b, recipe))
        return Built(b.fp32, factory, 32.0)

    if weights:
        build.weights_key = lambda b: weights_key(b.recipe(recipe_file))
    return build


def bf16(b: Bench) -> Built:
    return Built(copy.deepcopy(b.fp32).to(torch.bfloat16), bits=16.0)


def peer_bnb(kind: str) -> Callable[[Bench], Built]:
    def build(b: Bench) -> Built:
        model = (bnb_int8 if kind == "int8" else bnb_nf4)(b.path)
        return Built(model, bits=bits_per_weight(model, b.linears), note=_coverage(b, model))

    return build


def peer_quanto(bits: int) -> Callable[[Bench], Built]:
    def build(b: Bench) -> Built:
        model, groups = quanto_weights(b.path, bits)
        return Built(model, bits=bits_per_weight(model, b.linears), note=f"{groups}; {_coverage(b, model)}")

    return build


def peer_hqq(b: Bench) -> Built:
    group = (
        b.group if isinstance(b.group, int) else 64
    )  # sinkquant's group (HQQ groups need not divide widths)
    model = hqq_weights(b.fp32, 4, group)
    return Built(model, bits=bits_per_weight(model, b.linears), note=f"g{group} along the flattened weight")


def peer_torchao(b: Bench) -> Built:
    """bf16 model: the CPU kernel takes bf16 activations; with an fp32 model torchao's int4 tensor
    took more than 20 minutes for 16,384 tokens on 2 cores (a slow path), bf16 is its real use."""
    group = b.peer_group or 32
    model, done = torchao_int4(b.fp32, group, torch.bfloat16)
    notes = ["bf16 activations"]
    if group != 128 and b.peer_group:
        notes.append(f"g128 does not divide every width {b.widths}")
    if done < len(b.linears):
        notes.append(
            f"ONLY {done} of {len(b.linears)} linear layers quantized (the CPU kernel needs out % 16 == 0 "
            f"and in % {group} == 0), the rest stay fp32"
        )
    return Built(model, bits=bits_per_weight(model, b.linears), note="; ".join(notes))


LLMCOMPRESSOR_METHODS = {"gptq": "GPTQ", "awq": "AWQ", "awq-gptq": "AWQ + GPTQ"}


def peer_llmcompressor(method: str) -> Callable[[Bench], Built]:
    """llm-compressor's W4A16 `method` (eval/lib/peers/llmcompressor_oneshot.py) on the GPTQ ids."""

    def build(b: Bench) -> Built:
        from eval.lib.peers import llmcompressor_w4a16

        group = b.peer_group
        if group is None:
            raise RuntimeError(
                f"llm-compressor needs a group that divides every input width {b.widths}; none of 128/64/32 does"
            )
        ids = b.gptq_ids()
        suffix = "" if method == "gptq" else f"-{method}"
        out = RUNS / f"llmcompressor{suffix}-{model_name(b.path)}-g{group}-{ids.shape[0]}x{ids.shape[1]}"
        info = llmcompressor_w4a16(b.path, ids, out, group, method)
        model, _ = prepare_model(info["dense"], "float32")
        # bits: the compressed checkpoint less the tensors it keeps unquantized (float32 as loaded)
        other = sum(p.numel() for n, p in b.fp32.named_parameters() if n.rpartition(".")[0] not in b.linears)
        bits = 8 * (info["compressed_bytes"] - 4 * other) / sum(b.linears.values())
        why = "" if group == 128 else f", 128 does not divide every width {b.widths}"
        note = (
            f"group {group}{why}; {info.get('scheme', method)}; calibration {ids.shape[0]} x {ids.shape[1]} "
            f"(the ids sinkquant GPTQ uses); llmcompressor {info.get('llmcompressor')}, quantize "
            f"{info.get('quantize_s')} s{' (reused from an earlier run on the same ids)' if info.get('reused') else ''}; "
            "bits from the compressed checkpoint's size"
        )
        return Built(model, bits=bits, note=note)

    return build


def peer_autoround(preset: str) -> Callable[[Bench], Built]:
    """AutoRound W4A16 (eval/lib/peers/autoround_run.py), symmetric as its preset, on the GPTQ ids."""

    def build(b: Bench) -> Built:
        from eval.lib.peers import autoround_w4a16

        group = b.group if isinstance(b.group, int) else 128
        ids = b.gptq_ids()
        out = RUNS / f"autoround-{preset}-{model_name(b.path)}-g{group}-{ids.shape[0]}x{ids.shape[1]}"
        info = autoround_w4a16(b.path, ids, out, group, preset)
        model, _ = prepare_model(info["dense"], "float32")
        bits = 8 * info["quantized_bytes"] / sum(b.linears.values())
        diff = info.get("max_abs_logit_diff_dense_vs_compressed")
        check = (
            f"dense copy vs packed checkpoint: max logit diff {diff:.2g}" if isinstance(diff, float) else diff
        )
        note = (
            f"group {group}; {info['scheme']}; calibration {ids.shape[0]} x {ids.shape[1]} (the ids sinkquant "
            f"GPTQ uses); auto-round {info['auto_round']}, quantize {info['quantize_s']} s"
            f"{' (reused from an earlier run on the same ids)' if info.get('reused') else ''}; bits from the "
            f"packed layers' tensors; {check}"
        )
        return Built(model, bits=bits, note=note)

    return build


def peer_kv(backend: str, bits: int) -> Callable[[Bench], Built]:
    def build(b: Bench) -> Built:
        from transformers import QuantizedCache

        QuantizedCache(backend=backend, config=b.fp32.config, nbits=bits)  # fail here, not mid-window

        def factory(model):
            return QuantizedCache(backend=backend, config=model.config, nbits=bits)

        return Built(b.fp32, factory, 32.0, "transformers defaults: group 64, residual 128")

    return build


def _coverage(b: Bench, model) -> str:
    done = count_converted(model, b.linears)
    return "all linear layers but lm_head" if done == len(b.linears) else f"{done} of {len(b.linears)} layers"


def rows_for(b: Bench) -> list[Row]:
    g = b.gtext
    gq = f"{b.args.gptq_samples} x {b.args.gptq_seq_len} calib"
    pg = f" g{b.peer_group}" if b.peer_group else ""
    hg = b.group if isinstance(b.group, int) else 64
    ag = b.group if isinstance(b.group, int) else 128
    rows = [
        Row("fp32", "fp32", "reference", "weights", lambda b: Built(b.reference, bits=32.0)),
        Row("bf16", "bf16", "reference", "weights", bf16),
        Row("sq-w8", "sinkquant W8 per channel (w8)", "sinkquant", "weights", sq_weights("w8.yaml")),
        Row(
            "sq-w4-cols",
            f"sinkquant W4 {g} + 1% cols, RTN (w4-g128-outliers)",
            "sinkquant",
            "weights",
            sq_weights("w4-g128-outliers.yaml"),
        ),
        Row(
            "sq-w4-cols-minmax",
            f"sinkquant W4 {g} + 1% cols, RTN min/max (no clip search: the plain baseline)",
            "ablation",
            "weights",
            sq_weights("w4-g128-outliers.yaml", **{"weights.clip_search": False}),
        ),
        Row(
            "sq-w4",
            f"sinkquant W4 {g}, no cols, RTN (w4-g128)",
            "ablation",
            "weights",
            sq_weights("w4-g128.yaml"),
        ),
    ]
    if b.peer_group and b.peer_group != b.group:
        rows.append(
            Row(
                "sq-w4-cols-peer-group",
                f"sinkquant W4 g{b.peer_group} + 1% cols, RTN (the group torchao / llm-compressor get here)",
                "sinkquant",
                "weights",
                sq_weights("w4-g128-outliers.yaml", **{"weights.group_size": b.peer_group}),
            )
        )
    rows += [
        Row(
            "sq-gptq-cols",
            f"sinkquant GPTQ W4 {g} + 1% cols ({gq})",
            "sinkquant",
            "weights",
            sq_weights("w4-g128-gptq.yaml"),
        ),
        Row(
            "sq-best",
            f"sinkquant best W4 {g} + 1% cols: GPTQ, act_order, rotated inputs (w4-g128-best, {gq})",
            "sinkquant",
            "weights",
            sq_weights("w4-g128-best.yaml"),
        ),
        Row(
            "sq-compact",
            f"sinkquant W4 {g} symmetric, 1-byte log scales + 0.7% cols: GPTQ, act_order (w4-g128-compact, {gq})",
            "sinkquant",
            "weights",
            sq_weights("w4-g128-compact.yaml"),
        ),
        Row(
            "sq-gptq-sym-lean",
            f"sinkquant GPTQ W4 {g} symmetric (no stored minima) + 0.3% cols ({gq})",
            "sinkquant",
            "weights",
            sq_weights("w4-g128-gptq.yaml", **{"weights.symmetric": True, "weights.outliers.fraction": 0.003}),
        ),
        Row(
            "sq-gptq",
            f"sinkquant GPTQ W4 {g}, no cols ({gq})",
            "ablation",
            "weights",
            sq_weights("w4-g128-gptq.yaml", **{"weights.outliers": None}),
        ),
        Row("sq-kv8", "sinkquant KV8, sinks", "sinkquant", "kv", sq_kv("kv4-sinks.yaml", bits=8)),
        Row("sq-kv8-nosinks", "sinkquant KV8, no sinks", "ablation", "kv", sq_kv("kv4-sinks.yaml", bits=8, sinks="none")),
        Row("sq-kv4", "sinkquant KV4, sinks (kv4-sinks)", "sinkquant", "kv", sq_kv("kv4-sinks.yaml")),
        Row("sq-kv4-nosinks", "sinkquant KV4, no sinks", "ablation", "kv", sq_kv("kv4-sinks.yaml", sinks="none")),
        Row("sq-kv2", "sinkquant KV2, sinks + 2 key cols (kv2-sinks)", "sinkquant", "kv", sq_kv("kv2-sinks.yaml")),
        Row("sq-kv2-nosinks", "sinkquant KV2, no sinks, 2 key cols", "ablation", "kv", sq_kv("kv2-sinks.yaml", sinks="none")),
        Row(
            "sq-w4-kv4",
            f"sinkquant W4 {g} + 1% cols + KV4 sinks (w4-g128-kv4-sinks)",
            "sinkquant",
            "both",
            sq_kv("w4-g128-kv4-sinks.yaml", weights=True),
        ),
        Row(
            "sq-w4-kv4-nosinks",
            f"sinkquant W4 {g} + 1% cols + KV4, no sinks",
            "ablation",
            "both",
            sq_kv("w4-g128-kv4-sinks.yaml", weights=True, sinks="none"),
        ),
        Row("bnb-int8", "bitsandbytes LLM.int8 (threshold 6.0)", "peer", "weights", peer_bnb("int8")),
        Row("bnb-nf4", "bitsandbytes nf4 (block 64)", "peer", "weights", peer_bnb("nf4")),
        Row("quanto-int8", "optimum-quanto int8 weights", "peer", "weights", peer_quanto(8)),
        Row("quanto-int4", "optimum-quanto int4 weights", "peer", "weights", peer_quanto(4)),
        Row("torchao-int4", f"torchao int4 weight-only g{b.peer_group or 32} (CPU kernel, bf16)", "peer", "weights", peer_torchao),
        Row("hqq-4", f"HQQ 4-bit g{hg}", "peer", "weights", peer_hqq),
        Row("llmc-gptq", f"llm-compressor GPTQ W4A16{pg} ({gq})", "peer", "weights", peer_llmcompressor("gptq")),
        Row("llmc-awq", f"llm-compressor AWQ W4A16{pg} asym ({gq})", "peer", "weights", peer_llmcompressor("awq")),
        Row("llmc-awq-gptq", f"llm-compressor AWQ + GPTQ W4A16{pg} asym ({gq})", "peer", "weights", peer_llmcompressor("awq-gptq")),
        Row("autoround", f"AutoRound W4A16 g{ag} sym, default: 200 iters ({gq})", "peer", "weights", peer_autoround("default")),
        Row("autoround-light", f"AutoRound W4A16 g{ag} sym, light: 50 iters ({gq})", "peer", "weights", peer_autoround("light")),
        Row("qc-quanto-4", "QuantizedCache quanto 4-bit", "peer", "kv", peer_kv("quanto", 4)),
        Row("qc-quanto-2", "QuantizedCache quanto 2-bit", "peer", "kv", peer_kv("quanto", 2)),
        Row("qc-hqq-8", "QuantizedCache HQQ 8-bit", "peer", "kv", peer_kv("hqq", 8)),
        Row("qc-hqq-4", "QuantizedCache HQQ 4-bit", "peer", "kv", peer_kv("hqq", 4)),
        Row("qc-hqq-2", "QuantizedCache HQQ 2-bit", "peer", "kv", peer_kv("hqq", 2)),
    ]  # fmt: skip
    return rows


def select(rows: list[Row], patterns: str | None) -> list[Row]:
    """Rows whose key matches one of the comma-separated patterns (fp32, the baseline, always kept)."""
    if not patterns or patterns == "all":
        return rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [r for r in rows if r.key == "fp32" or any(fnmatch.fnmatchcase(r.key, p) for p in wanted)]


# -- running ------------------------------------------------------------------------------------------


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int | None):
    """Raise RowTimeout in the main thread once `seconds` have passed (checked between Python
    bytecodes, so within one forward pass of a window); None or 0: no limit."""
    if not seconds:
        yield
        return

    def alarm(*_):
        raise RowTimeout(f"ran past the row time limit of {seconds} s (--row-timeout); stopped")

    before = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def run_row(b: Bench, row: Row) -> dict:
    out = {"key": row.key, "label": row.label, "family": row.family, "kind": row.kind}
    t = time.perf_counter()
    with time_limit(b.args.row_timeout):
        return _run_row(b, row, out, t)


def _run_row(b: Bench, row: Row, out: dict, t: float) -> dict:
    try:
        built = row.build(b)
        out["prep_s"] = time.perf_counter() - t
        recorder = KVRecorder(built.factory) if built.factory else None
        t = time.perf_counter()
        res = evaluate(
            built.model,
            b.tok,
            b.args.dataset,
            SEQ_LEN,
            b.args.tokens,
            reference=b.reference if row.key != "fp32" else None,
            chunk_size=CHUNK if recorder else None,
            cache_factory=recorder,
            progress=False,
        )
        out["eval_s"] = time.perf_counter() - t
        out.update(
            ppl=res.perplexity,
            kl=res.kl if res.kl is not None else 0.0,
            top1=res.top1_agreement if res.top1_agreement is not None else 1.0,
            bits=built.bits,
            kv_bytes=recorder.bytes_per_token() if recorder else None,
            note=built.note,
        )
        if recorder:
            out["kv_sinks"] = sorted({p for w in recorder.windows for p in w["sinks"]})
    except Exception as exc:  # a row (or RowTimeout) that cannot run says why, in one line
        out.update(error=one_line(exc), prep_s=time.perf_counter() - t)
    finally:
        for model in (b.fp32, *b.models.values()):  # a sinkquant cache leaves hooks on its model
            ModelHooks.detach_all(model)
        built = None
        gc.collect()
    return out


def fmt(x, spec: str, empty: str = "–") -> str:
    return empty if x is None else format(x, spec)


def table(result: dict) -> str:
    """The markdown table of one quality run."""
    rows = result["rows"]
    base = next((r["ppl"] for r in rows if r["key"] == "fp32" and "ppl" in r), None)
    kv16 = result["kv_fp16_bytes"]
    lines = [
        "| method | perplexity | vs fp32 | KL to fp32 | top-1 agree | bits / weight | KV bytes/token/layer | "
        "time s (prep + eval) | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        secs = f"{r.get('prep_s', 0):.0f} + {r.get('eval_s', 0):.0f}"
        if "error" in r:
            lines.append(f"| {r['label']} | – | – | – | – | – | – | {secs} | could not run: {r['error']} |")
            continue
        kv = r.get("kv_bytes")
        kv_text = f"{kv:.1f} ({kv / kv16:.3f} × fp16)" if kv else "–"
        vs = f"{r['ppl'] / base - 1:+.2%}" if base else "–"
        lines.append(
            f"| {r['label']} | {r['ppl']:.3f} | {vs} | {r['kl']:.4f} | {r['top1']:.4f} | {fmt(r.get('bits'), '.2f')} | "
            f"{kv_text} | {secs} | {r.get('note') or ''} |"
        )
    return "\n".join(lines)


def protocol(result: dict) -> str:
    p = result["protocol"]
    return (
        f"WikiText-2 test (`{Path(p['dataset']).name}`), first {p['tokens']} tokens, windows of {p['seq_len']} "
        f"scored on their own; KL(fp32 ‖ row) and top-1 agreement on the same tokens. KV rows: windows fed "
        f"{p['chunk']} tokens at a time through the cache, fp32 weights; KV bytes are the quantized part per token "
        f"per layer (sinks and the full-precision recent window excluded; fp16 = {result['kv_fp16_bytes']}). "
        f"Calibration report: {p['calib_samples']} x {p['calib_seq_len']} tokens of sinkquant's embedded C4 slice, "
        f"shared by every sinkquant row; GPTQ rows (sinkquant and llm-compressor): {p['gptq_samples']} x "
        f"{p['gptq_seq_len']} tokens of the same slice (the GPTQ recipes say 128 x 512; AWQ and AutoRound rows use the same ids). "
        f"sinkquant group: {p['group']}{' (' + p['group_why'] + ')' if p['group_why'] else ''}; "
        f"bits / weight: bytes held by the quantized linear layers (scales, minima, kept columns included) "
        f"x 8 / their weights; lm_head and embeddings stay as they are in every row."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=None, help="HF model folder (default: SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=None, help="evaluation tokens (16384; --quick 4096)")
    parser.add_argument("--dataset", default=str(WIKITEXT))
    parser.add_argument("--rows", default=None, help="comma-separated row keys or patterns (default: all)")
    parser.add_argument(
        "--skip", default=None, help="comma-separated row keys or patterns to leave out (listed as not run)"
    )
    parser.add_argument("--quick", action="store_true", help="4096 tokens, 8 x 256 calibration and GPTQ")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--calib-seq-len", type=int, default=None)
    parser.add_argument("--gptq-samples", type=int, default=None)
    parser.add_argument("--gptq-seq-len", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="default runs/bench/quality_<model>.json")
    parser.add_argument("--save-calibration", type=Path, default=None, help="write the report here")
    parser.add_argument("--list", action="store_true", help="print the row keys and exit")
    parser.add_argument(
        "--row-timeout", type=int, default=600, help="seconds a row may take (build + eval); 0: no limit"
    )
    args = parser.parse_args(argv)
    quick = {"tokens": 4096, "calib_samples": 8, "calib_seq_len": 256, "gptq_samples": 8, "gptq_seq_len": 256}
    full = {
        "tokens": 16384,
        "calib_samples": 32,
        "calib_seq_len": 512,
        "gptq_samples": 128,
        "gptq_seq_len": 512,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import transformers

    transformers.logging.set_verbosity_error()
    args.model = args.model or default_model()
    start = time.perf_counter()
    b = Bench(args)
    rows = select(rows_for(b), args.rows)
    if args.list:
        for r in rows_for(b):
            print(f"{r.key:24s} {r.label}")
        return 0
    out_path = args.json or RUNS / f"quality_{model_name(args.model)}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": model_name(args.model),
        "model_path": str(args.model),
        "machine": machine(),
        "versions": {
            name: package_version(name)
            for name in ("bitsandbytes", "optimum-quanto", "torchao", "hqq", "optimum", "sinkquant")
        },
        "protocol": {
            "dataset": args.dataset,
            "tokens": args.tokens,
            "seq_len": SEQ_LEN,
            "chunk": CHUNK,
            "calib_samples": args.calib_samples,
            "calib_seq_len": args.calib_seq_len,
            "gptq_samples": args.gptq_samples,
            "gptq_seq_len": args.gptq_seq_len,
            "group": b.gtext,
            "group_why": b.group_why,
            "peer_group": b.peer_group,
            "widths": b.widths,
        },
        "kv_fp16_bytes": b.kv_fp16,
        "rows": [],
    }
    if args.save_calibration:
        _ = b.report  # written even when no selected row needs it (bench_speed reuses it)
    skipped = {r.key for r in select(rows, args.skip) if r.key != "fp32"} if args.skip else set()
    for row in rows:
        if hasattr(row.build, "weights_key") and row.key not in skipped:  # a skipped row holds no model
            b.uses[row.build.weights_key(b)] += 1
    print(f"{len(rows)} rows on {args.model}: {', '.join(r.key for r in rows)}", flush=True)
    for row in rows:
        if row.key in skipped:
            r = {"key": row.key, "label": row.label, "family": row.family, "kind": row.kind}
            r["error"] = "not run in this run (--skip)"
        else:
            r = run_row(b, row)
        result["rows"].append(r)
        secs = f"({r.get('prep_s', 0):.0f} + {r.get('eval_s', 0):.0f} s)"
        if "error" in r:
            print(f"{row.key:24s} could not run: {r['error']} {secs}", flush=True)
        else:
            print(
                f"{row.key:24s} ppl {r['ppl']:9.4f}  KL {r['kl']:.4f}  top1 {r['top1']:.4f} {secs}",
                flush=True,
            )
        result["timings"] = {**b.timings, "total_s": time.perf_counter() - start}
        out_path.write_text(json.dumps(result, indent=1))
    print("\n" + protocol(result) + "\n\n" + table(result))
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s; JSON: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
