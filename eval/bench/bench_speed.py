"""CPU speed of sinkquant against bf16 and the peers on one model: decode, prefill, memory, bytes.

    python -m eval.bench.bench_speed [MODEL] [--rows PATTERNS] [--quick] [--repeats 5] [--threads N]
                                     [--calibration calib.json] [--timeout 600] [--json PATH] [--list]

Protocol: batch 1, a 512-token WikiText-2 prompt (the first 512 tokens of the test text, BOS first
where the tokenizer adds one), 128 new tokens, greedy (`generate`, min_new_tokens=128 so every run
decodes the same count). A logits processor stamps each generated token: prefill tokens/s = 512 /
time to the first token; decode tokens/s = 127 / time from the first to the last token. One warm-up
run (the same prompt, 8 new tokens: every shape the measured runs meet, at a sixteenth of the decode
time; compiled rows: two full runs, so compilation and any recompile happen before the clock), then
the median of --repeats runs (5; --quick 3). Each method runs in a fresh subprocess, so its
peak RSS is its own: "peak RSS" is the high-water mark of the whole process (loading included),
"peak RSS, generate" the high-water mark after loading (reset through /proc/self/clear_refs before
the warm-up). Checkpoint bytes: the loaded model's state dict (what `save_pretrained` writes; tied
tensors once). KV bytes per token: the cache after a run, all layers, divided by the tokens it holds
(a static cache by the tokens it has room for). Every ratio is to bf16 measured in the same run.

Methods: fp32, bf16, sinkquant W8 and W4 g128 + 1% columns (+ the combined KV4 recipe; the best
recipe with and without its input rotation, whose GPTQ checkpoints `--checkpoint NAME=PATH` can reuse), saved with
`sinkquant.quantize_model` and loaded in bf16 (the int4/int8 CPU kernels take bf16 activations),
bitsandbytes int8 / nf4 (bf16 compute), torchao int4 (CPU kernel, bf16); extra rows: a static cache
(`cache_implementation="static"`) and `torch.compile` of the decode step on top of it, for bf16 and
sinkquant W4 (as transformers' own `generate` compiles it: one-token steps only; the 512-token
prefill runs eager, so its tokens/s is the eager one and its graph is never compiled). A method that fails or runs past --timeout is a row with the one-line reason.

Also, in the same run: the memory bandwidth (a large float32 sum, reads only, and a copy), and
sinkquant's int4 layer at batch 1 on the model's shapes and on a 4096 x 11008 layer, each rotating
through copies of 256 MiB in all so the weights come from memory, as in a decode step: weight bytes
read per second / bandwidth (timing code of eval/bench/bench_kernels.py); a
torch.profiler trace of bf16 decode steps (and sinkquant W4's): top ops by self CPU time and the share
of linear layers, the attention kernel and KV-cache updates.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import fnmatch
import functools
import gc
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from eval.bench.bench_kernels import _bf16_linear, _median_times, copies_needed
from eval.lib.common import (
    RECIPES,
    RUNS,
    WIKITEXT,
    bnb_int8,
    bnb_nf4,
    default_model,
    dividing_group,
    machine,
    model_name,
    quantizable_linears,
    sinkquant_group,
    state_bytes,
    tensor_bytes,
    torchao_int4,
)

PROMPT = 512
NEW = 128

#: key -> (label, how it is loaded, generate options)
METHODS = {
    "fp32": ("fp32", "fp32", {}),
    "bf16": ("bf16", "bf16", {}),
    "sq-w8": ("sinkquant W8 per channel", "ckpt:w8", {}),
    "sq-w4": ("sinkquant W4 {g} + 1% cols", "ckpt:w4", {}),
    "sq-w4-kv4": ("sinkquant W4 {g} + 1% cols + KV4 sinks", "ckpt:w4-kv4", {}),
    "sq-best": ("sinkquant best W4 {g} (w4-g128-best: GPTQ, rotated inputs, Lloyd grid)", "ckpt:best", {}),
    "sq-best-uniform": ("sinkquant best W4 {g}, grid: uniform", "ckpt:best-uniform", {}),
    "sq-best-unrotated": ("sinkquant best W4 {g}, rotation: null", "ckpt:best-unrotated", {}),
    "bnb-int8": ("bitsandbytes LLM.int8 (threshold 6.0)", "bnb-int8", {}),
    "bnb-nf4": ("bitsandbytes nf4", "bnb-nf4", {}),
    "torchao-int4": ("torchao int4{peer_g} (CPU kernel)", "torchao", {}),
    "bf16-static": ("bf16, static cache", "bf16", {"cache_implementation": "static"}),
    "bf16-compile": ("bf16, static cache + torch.compile", "bf16", {"cache_implementation": "static", "compile": True}),
    "sq-w4-static": ("sinkquant W4 {g} + 1% cols, static cache", "ckpt:w4", {"cache_implementation": "static"}),
    "sq-w4-compile": (
        "sinkquant W4 {g} + 1% cols, static cache + torch.compile",
        "ckpt:w4",
        {"cache_implementation": "static", "compile": True},
    ),
}  # fmt: skip

#: checkpoint name -> recipe file, or (recipe file, overrides)
CHECKPOINTS: dict[str, str | tuple[str, dict]] = {
    "w8": "w8.yaml",
    "w4": "w4-g128-outliers.yaml",
    "w4-kv4": "w4-g128-kv4-sinks.yaml",
    "best": "w4-g128-best.yaml",
    "best-unrotated": ("w4-g128-best.yaml", {"weights.rotation": None}),
    "best-uniform": ("w4-g128-best.yaml", {"weights.grid": "uniform"}),
}


# -- process memory ---------------------------------------------------------------------------------------


def _status(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak() -> bool:
    """Release freed memory to the OS and reset the RSS high-water mark (Linux); False where unsupported."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- the worker: one method in its own process ----------------------------------------------------------


class Stamps:
    """A logits processor that records when each new token's scores are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def prompt_ids(tok) -> torch.Tensor:
    from sinkquant.data import load_documents
    from sinkquant.evaluate.perplexity import evaluation_windows

    text = "\n\n".join(load_documents(WIKITEXT))
    return evaluation_windows(tok, text, PROMPT, PROMPT * 2)[:1]


def load_method(how: str, spec: dict):
    from sinkquant.loading import prepare_model

    path = spec["model"]
    if how in ("fp32", "bf16"):
        return prepare_model(path, "float32" if how == "fp32" else "bfloat16")
    if how.startswith("ckpt:"):
        return prepare_model(spec["checkpoints"][how[5:]], "bfloat16")
    from sinkquant.modeling import load_tokenizer

    tok = load_tokenizer(path)
    if how == "bnb-int8":
        return bnb_int8(path, torch.bfloat16), tok
    if how == "bnb-nf4":
        return bnb_nf4(path, torch.bfloat16), tok
    if how == "torchao":
        model, _ = prepare_model(path, "bfloat16")
        group = spec["peer_group"]
        if group is None:
            raise RuntimeError(f"no group of 128/64/32 divides every input width {spec['widths']}")
        model, done = torchao_int4(model, group, torch.bfloat16, copy_model=False)
        total = len(quantizable_linears(model))
        if done < total:
            raise RuntimeError(
                f"torchao's CPU int4 kernel fits only {done} of {total} linear layers (needs out % 16 == 0)"
            )
        return model, tok
    raise ValueError(f"unknown method {how}")


def kv_bytes_per_token(cache) -> float | None:
    if cache is None:
        return None
    if hasattr(cache, "memory_bytes"):  # SinkQuantizedCache: everything it holds
        return cache.memory_bytes()["total"] / max(1, cache.get_seq_length())
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    if not layers:
        return None
    total = sum(tensor_bytes(layer.keys) + tensor_bytes(layer.values) for layer in layers)
    return total / layers[0].keys.shape[-2]


def generate_once(model, ids, options: dict, tok, new: int = NEW) -> tuple[float, float, object]:
    from transformers import LogitsProcessorList

    stamps = Stamps()
    kwargs = {k: v for k, v in options.items() if k != "compile"}
    if options.get("compile"):
        kwargs["disable_compile"] = True  # the forward is compiled by hand (transformers skips CPUs)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=tok.eos_token_id if tok.eos_token_id is not None else 0,
            logits_processor=LogitsProcessorList([stamps]),
            return_dict_in_generate=True,
            **kwargs,
        )
    t = stamps.times
    return PROMPT / (t[0] - start), (len(t) - 1) / (t[-1] - t[0]), out.past_key_values


def _compiled_decode_step(forward):
    """`forward` compiled for one-token steps (static shapes); longer inputs (the prefill) run eager."""
    compiled = torch.compile(forward, dynamic=False)

    def step(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        return (
            compiled(*args, **kwargs) if ids is not None and ids.shape[-1] == 1 else forward(*args, **kwargs)
        )

    return step


def profile_decode(model, ids, steps: int = 4) -> dict:
    """torch.profiler over `steps` decode steps after a prefill, with the time split by what ran."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    open_ranges: dict[int, object] = {}

    def enter(name):
        def hook(module, *_):
            rf = record_function(name)
            rf.__enter__()
            open_ranges[id(module)] = rf

        return hook

    def leave(module, *_):
        open_ranges.pop(id(module)).__exit__(None, None, None)

    handles = []
    for name, module in model.named_modules():
        if name and (isinstance(module, torch.nn.Linear) or type(module).__name__.endswith("Linear")):
            label = "lm_head" if name.endswith("lm_head") else "linear"
            handles += [module.register_forward_pre_hook(enter(label)), module.register_forward_hook(leave)]
    attn_impl = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS.get(attn_impl)

    def attention(*args, **kwargs):
        with record_function("attention"):
            return original(*args, **kwargs)

    update = cache.update

    def cache_update(*args, **kwargs):
        with record_function("kv_cache"):
            return update(*args, **kwargs)

    if original is not None:
        ALL_ATTENTION_FUNCTIONS[attn_impl] = attention
    cache.update = cache_update
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("decode_step"):
                    out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
    finally:
        for h in handles:
            h.remove()
        if original is not None:
            ALL_ATTENTION_FUNCTIONS[attn_impl] = original
    events = prof.key_averages()
    totals = {e.key: e.cpu_time_total for e in events}
    step = totals.get("decode_step", 0.0) or 1.0
    shares = {k: totals.get(k, 0.0) / step for k in ("linear", "lm_head", "attention", "kv_cache")}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    ops = sorted(
        (e for e in events if e.key not in ("decode_step", "linear", "lm_head", "attention", "kv_cache")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    return {
        "steps": steps,
        "step_ms": step / 1000 / steps,
        "shares": shares,
        "top_ops": [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / steps, "calls": e.count // steps}
            for e in ops[:12]
        ],
    }


def worker(key: str, spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    label, how, options = METHODS[key]
    result = {"key": key, "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0]}
    t = time.perf_counter()
    model, tok = load_method(how, spec)
    model.eval()
    result["load_s"] = time.perf_counter() - t
    result["weight_bytes"] = state_bytes(model)
    ids = prompt_ids(tok)
    if options.get("compile"):
        with torch.no_grad():  # one eager call first: sinkquant layers build their kernel layouts
            model(ids[:, :8])  # lazily, which the compiler should find done, not trace
        model.forward = _compiled_decode_step(model.forward)
    result["peak_rss_load"] = _status("VmHWM")
    result["peak_reset"] = reset_peak()
    t = time.perf_counter()
    if options.get("compile"):  # compilation, then a 2nd run for any recompile
        for _ in range(2):
            generate_once(model, ids, options, tok)
    else:
        generate_once(model, ids, options, tok, new=8)
    result["warmup_s"] = time.perf_counter() - t
    prefill, decode, cache = [], [], None
    for _ in range(spec["repeats"]):
        p, d, cache = generate_once(model, ids, options, tok)
        prefill.append(p)
        decode.append(d)
    result.update(
        prefill_runs=prefill,
        decode_runs=decode,
        prefill_tps=statistics.median(prefill),
        decode_tps=statistics.median(decode),
        kv_bytes_per_token=kv_bytes_per_token(cache),
        cache=type(cache).__name__,
        peak_rss=_status("VmHWM")
        if not result["peak_reset"]
        else max(result["peak_rss_load"], _status("VmHWM")),
        peak_rss_generate=_status("VmHWM") if result["peak_reset"] else None,
        load_average_end=os.getloadavg()[0],
    )
    if spec.get("profile") and key in ("bf16", "sq-w4"):
        result["profile"] = profile_decode(model, ids)
    return result


# -- the parent: bandwidth, kernels, checkpoints, one subprocess per method --------------------------------


def memory_bandwidth(mb: int, reps: int = 7) -> dict:
    """Bytes per second of a float32 sum (reads only) and of a copy (read + write), medians of `reps`."""
    x = torch.ones(mb * 2**20 // 4)
    y = torch.empty_like(x)
    reads, copies = [], []
    for _ in range(reps + 1):
        t = time.perf_counter()
        x.sum()
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        y.copy_(x)
        copies.append(time.perf_counter() - t)
    n = x.numel() * 4
    return {
        "mb": mb,
        "read_Bps": n / statistics.median(reads[1:]),
        "copy_Bps": 2 * n / statistics.median(copies[1:]),
    }


def kernel_rows(shapes: list[tuple[int, int, int | None]], reps: int, bandwidth: float) -> list[dict]:
    """sinkquant's int4 layer (1% columns) and a bf16 F.linear at batch 1 on each (in, out, group)."""
    from sinkquant.quantize.linear import SinkQuantLinear

    torch.manual_seed(0)
    rows = []
    for in_f, out_f, group in shapes:
        weight = torch.randn(out_f, in_f) * 0.02
        outliers = torch.randperm(in_f)[: max(1, in_f // 100)]
        module = SinkQuantLinear.from_float(weight, None, 4, group, outliers, storage_dtype=torch.bfloat16)
        bf16 = weight.bfloat16()
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        # copies rotated through, so each call reads its weights from memory as a decode step does
        int4_copies = [copy.deepcopy(module) for _ in range(copies_needed(module.nbytes(), reps))]
        bf16_copies = [
            functools.partial(_bf16_linear, w=bf16.clone())
            for _ in range(copies_needed(bf16.numel() * 2, reps))
        ]
        with torch.no_grad():
            timed = _median_times({"int4": int4_copies, "bf16": bf16_copies}, x, reps)
            t_q, t_b = timed["int4"], timed["bf16"]
        rows.append(
            {
                "shape": f"{in_f}x{out_f}",
                "group": group,
                "kernel": module._kernel_ok(torch.bfloat16),
                "int4_us": t_q * 1e6,
                "bf16_us": t_b * 1e6,
                "int4_bytes": module.nbytes(),
                "int4_Bps": module.nbytes() / t_q,
                "bf16_Bps": bf16.numel() * 2 / t_b,
                "int4_of_bandwidth": module.nbytes() / t_q / bandwidth,
                "bf16_of_bandwidth": bf16.numel() * 2 / t_b / bandwidth,
            }
        )
    return rows


def make_checkpoints(
    model_path: str, names: list[str], group, calibration: str | None, quick: bool, reuse: dict | None = None
) -> tuple[dict, dict]:
    """sinkquant checkpoints for the methods that load one (quantize_model, the recipes, fitted group);
    `reuse`: name -> a folder made earlier from the same recipe (a GPTQ recipe takes minutes), used as is."""
    from sinkquant import load_recipe, quantize_model
    from sinkquant.loading import prepare_model

    paths, info = {}, {}
    for name, folder in (reuse or {}).items():
        if name in names:
            size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
            paths[name], info[name] = (
                str(folder),
                {"checkpoint_bytes": size, "seconds": None, "reused": str(folder)},
            )
    names = [n for n in names if n not in paths]
    report = calibration
    if report is None and names:
        from sinkquant import calibrate

        samples, seq_len = (8, 256) if quick else (32, 512)
        model, tok = prepare_model(model_path, "float32")
        report = calibrate(model, tok, None, samples, seq_len, 0, progress=False)
        del model
    for name in names:
        recipe_file, overrides = (
            CHECKPOINTS[name] if isinstance(CHECKPOINTS[name], tuple) else (CHECKPOINTS[name], {})
        )
        recipe = load_recipe(RECIPES / recipe_file)
        recipe = recipe.with_overrides(**overrides) if overrides else recipe
        if recipe.weights.bits == 4 and group != 128:
            recipe = recipe.with_overrides(**{"weights.group_size": group})
        out = RUNS / f"ckpt-{model_name(model_path)}-{name}"
        t = time.perf_counter()
        res = quantize_model(model_path, out, recipe, calibration=report, overwrite=True, progress=False)
        paths[name] = str(out)
        info[name] = {"checkpoint_bytes": res.checkpoint_bytes, "seconds": time.perf_counter() - t}
    return paths, info


class OtherLoad:
    """The share of the machine's CPU time that other processes used while a block ran (from
    /proc/stat, less this process's and its children's own CPU time): a busy machine makes timings
    unreliable, and the tables say so."""

    def __enter__(self) -> OtherLoad:
        self.share = None
        self.start = (self._busy(), self._own(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = self._busy(), self._own(), time.perf_counter()
        if busy is not None and self.start[0] is not None and wall > self.start[2]:
            others = (busy - self.start[0]) - (own - self.start[1])
            self.share = max(0.0, others / ((wall - self.start[2]) * (os.cpu_count() or 1)))

    @staticmethod
    def _busy() -> float | None:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait

    @staticmethod
    def _own() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_worker(key: str, spec: dict, timeout: int) -> dict:
    with OtherLoad() as load:
        result = _run_worker(key, spec, timeout)
    result["other_load"] = load.share
    return result


def _run_worker(key: str, spec: dict, timeout: int) -> dict:
    out = RUNS / f"speed-{key}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "eval.bench.bench_speed",  # this script again, from the same working directory (the repository root)
        spec["model"],
        "--worker",
        key,
        "--spec",
        json.dumps(spec),
        "--out",
        str(out),
    ]
    t = time.perf_counter()
    # a session of its own, so a timeout also ends the compile workers torch.compile starts
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"key": key, "error": f"timed out after {timeout} s", "wall_s": time.perf_counter() - t}
    if proc.returncode != 0 or not out.is_file():
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)", line)), None)
        return {"key": key, "error": (reason or (lines[-1] if lines else f"exit {proc.returncode}"))[:200]}
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t
    return result


def select(patterns: str | None) -> list[str]:
    if not patterns or patterns == "all":
        return list(METHODS)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [k for k in METHODS if k == "bf16" or any(fnmatch.fnmatchcase(k, p) for p in wanted)]


def table(result: dict) -> str:
    rows = result["rows"]
    base = next((r for r in rows if r["key"] == "bf16" and "decode_tps" in r), None)

    def cell(r: dict, field: str, spec: str, scale: float = 1.0) -> str:
        value = r.get(field)
        if value is None:
            return "–"
        ratio = f" ({value / base[field]:.2f}x)" if base and base.get(field) else ""
        return f"{format(value / scale, spec)}{ratio}"

    mib = 2**20
    lines = [
        "| method | decode tok/s (× bf16) | prefill tok/s (× bf16) | peak RSS MiB (× bf16) | peak RSS while "
        "generating MiB | checkpoint MiB (× bf16) | KV bytes/token (× bf16) | cache | CPU used by other "
        "processes | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        others = "–" if r.get("other_load") is None else f"{r['other_load']:.0%}"
        if "error" in r:
            lines.append(
                f"| {r['label']} | – | – | – | – | – | – | – | {others} | could not run: {r['error']} |"
            )
            continue
        lines.append(
            f"| {r['label']} | {cell(r, 'decode_tps', '.1f')} | {cell(r, 'prefill_tps', '.0f')} | "
            f"{cell(r, 'peak_rss', '.0f', mib)} | {cell(r, 'peak_rss_generate', '.0f', mib)} | "
            f"{cell(r, 'weight_bytes', '.1f', mib)} | {cell(r, 'kv_bytes_per_token', ',.0f')} | "
            f"{r.get('cache', '')} | {others} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def kernel_table(result: dict) -> str:
    bw = result["bandwidth"]
    lines = [
        f"Memory bandwidth: {bw['read_Bps'] / 1e9:.1f} GB/s read (float32 sum of {bw['mb']} MiB), "
        f"{bw['copy_Bps'] / 1e9:.1f} GB/s copy (read + write), {result['machine']['threads']} threads"
        + (
            f"; other processes used {bw['other_load']:.0%} of the CPUs meanwhile."
            if bw.get("other_load") is not None
            else "."
        ),
        "",
        "| layer (in x out) | group | int4 path | int4 µs | bf16 µs | int4 weight GB/s | ÷ bandwidth | bf16 ÷ bandwidth |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for k in result["kernels"]:
        lines.append(
            f"| {k['shape']} | {k['group']} | {'kernel' if k['kernel'] else 'dequantizing fallback'} | "
            f"{k['int4_us']:.1f} | {k['bf16_us']:.1f} | {k['int4_Bps'] / 1e9:.2f} | {k['int4_of_bandwidth']:.0%} | "
            f"{k['bf16_of_bandwidth']:.0%} |"
        )
    return "\n".join(lines)


def profile_text(profile: dict, title: str) -> str:
    s = profile["shares"]
    lines = [
        f"{title}: {profile['step_ms']:.1f} ms per decode step (mean of {profile['steps']}); linear layers "
        f"{s['linear']:.0%}, lm_head {s['lm_head']:.0%}, attention kernel {s['attention']:.0%}, KV-cache update "
        f"{s['kv_cache']:.0%}, everything else (norms, RoPE, residuals, sampling glue) {s['other']:.0%}.",
        "",
        "| op (top by self CPU time) | self ms / step | calls / step |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{o['op']}` | {o['self_ms']:.2f} | {o['calls']} |" for o in profile["top_ops"]]
    return "\n".join(lines)


def protocol(result: dict) -> str:
    p = result["protocol"]
    return (
        f"Batch 1, a {p['prompt']}-token WikiText-2 prompt, {p['new']} new tokens, greedy; median of "
        f"{p['repeats']} runs after one warm-up (8 new tokens; compiled rows: two full runs, the decode step compiled, the prefill eager); {p['threads']} threads; each method in a fresh process (peak RSS "
        "= its whole high-water mark, in brackets the high-water mark while generating). Checkpoint = the "
        "loaded model's state dict; KV bytes per token = all layers of the cache after a run; CPU used by other "
        "processes = the machine's busy CPU time less this benchmark's own, over the row's wall time and all "
        f"{result['machine']['cores']} cores (above a few % the timings are not reliable). sinkquant rows: "
        f"checkpoints from `quantize_model` (group {p['group']}) loaded in bf16."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--rows", default=None, help="comma-separated method keys or patterns (default all)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, smaller bandwidth and kernel runs")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calibration", default=None, help="a calibration report to reuse (JSON)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per method")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--json", type=Path, default=None, help="default runs/bench/speed_<model>.json")
    parser.add_argument("--list", action="store_true")
    parser.add_argument(
        "--checkpoint", action="append", default=[], metavar="NAME=PATH",
        help=f"reuse a checkpoint made earlier for NAME (one of {', '.join(CHECKPOINTS)})",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, json.loads(args.spec))))
        return 0
    if args.list:
        for key, (label, _, _) in METHODS.items():
            print(f"{key:16s} {label}")
        return 0
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    args.model = args.model or default_model()
    repeats = args.repeats or (3 if args.quick else 5)
    keys = select(args.rows)
    RUNS.mkdir(parents=True, exist_ok=True)
    result = {
        "model": model_name(args.model),
        "model_path": str(args.model),
        "machine": machine(),
        "protocol": {"prompt": PROMPT, "new": NEW, "repeats": repeats, "threads": args.threads},
        "rows": [],
    }

    from sinkquant.loading import prepare_model

    fp32, _ = prepare_model(args.model, "float32")
    linears = quantizable_linears(fp32)
    widths = sorted({m.in_features for m in linears.values()})
    shapes = sorted({(m.in_features, m.out_features) for m in linears.values()})
    del fp32, linears
    group, group_why = sinkquant_group(widths)
    peer_group = dividing_group(widths)
    gtext = f"g{group}" if group != "channel" else "per channel"
    result["protocol"].update(group=gtext, group_why=group_why, peer_group=peer_group)

    print("memory bandwidth and int4 layer timings ...", flush=True)
    with OtherLoad() as load:
        result["bandwidth"] = memory_bandwidth(256 if args.quick else 1024)
        reps = 50 if args.quick else 200
        big = [(4096, 11008)]
        fit = group if isinstance(group, int) else None
        result["kernels"] = kernel_rows(
            [(i, o, fit) for i, o in shapes] + [(i, o, 128) for i, o in big],
            reps,
            result["bandwidth"]["read_Bps"],
        )
    result["bandwidth"]["other_load"] = load.share
    print(kernel_table(result), flush=True)

    needed = sorted({METHODS[k][1][5:] for k in keys if METHODS[k][1].startswith("ckpt:")})
    checkpoints, ckpt_info = {}, {}
    if needed:
        print(f"sinkquant checkpoints: {', '.join(needed)} ...", flush=True)
        reuse = dict(item.split("=", 1) for item in args.checkpoint)
        checkpoints, ckpt_info = make_checkpoints(
            args.model, needed, group, args.calibration, args.quick, reuse
        )
    result["checkpoints"] = ckpt_info
    spec = {
        "model": str(args.model),
        "threads": args.threads,
        "repeats": repeats,
        "checkpoints": checkpoints,
        "peer_group": peer_group,
        "widths": widths,
        "profile": args.profile,
    }
    json_path = args.json or RUNS / f"speed_{model_name(args.model)}.json"
    for key in keys:
        label, how, options = METHODS[key]
        row = run_worker(key, spec, args.timeout)
        row["label"] = label.format(g=gtext, peer_g=f" g{peer_group}" if peer_group else "")
        notes = []
        if how.startswith("ckpt:") and how[5:] in ckpt_info:
            notes.append(f"{ckpt_info[how[5:]]['checkpoint_bytes'] / 2**20:.1f} MiB safetensors on disk")
            if ckpt_info[how[5:]].get("reused"):
                notes.append(f"checkpoint made earlier: {ckpt_info[how[5:]]['reused']}")
        if "warmup_s" in row and options.get("compile"):
            notes.append(f"warm-up incl. compilation {row['warmup_s']:.0f} s")
        row["note"] = "; ".join(notes)
        result["rows"].append(row)
        if "error" in row:
            print(f"{key:16s} could not run: {row['error']}", flush=True)
        else:
            print(
                f"{key:16s} decode {row['decode_tps']:7.1f} tok/s  prefill {row['prefill_tps']:8.1f} tok/s  "
                f"peak RSS {row['peak_rss'] / 2**20:6.0f} MiB  ({row['wall_s']:.0f} s)",
                flush=True,
            )
        result["total_s"] = time.perf_counter() - start
        json_path.write_text(json.dumps(result, indent=1))
    print("\n" + protocol(result) + "\n\n" + table(result))
    for r in result["rows"]:
        if "profile" in r:
            print("\n" + profile_text(r["profile"], f"Profile, {r['label']}"))
    print(f"\n{len(keys)} methods in {time.perf_counter() - start:.0f} s; JSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
