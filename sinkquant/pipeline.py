"""The jobs the CLI runs, end to end, as Python functions: quantize, calibrate, evaluate, inspect, export.

`quantize_model` reads top to bottom as the data path: load, calibrate (samples drawn once for the
run, or a saved report reused), quantize the weights with the recipe's algorithm, measure what the
KV cache needs, save, and optionally evaluate before and after. Each step is also public on its own
(`calibrate`, `quantize_weights`, `save`, `evaluate`). What a quantize run refuses before any work is
in `preflight.py`; `inspect_checkpoint` lives in `inspection.py`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from .architecture import weights_outside_linears
from .calibrate import CalibrationReport, CalibrationSettings, calibrate
from .calibrate.report import Calibration
from .checkpoint import SinkQuantConfig, check_finite, checkpoint_writer, out_dir_lock, prepare_out_dir
from .data import calibration_samples, load_documents
from .errors import InputError
from .evaluate import EvalResult, evaluate, evaluation_windows
from .export import ExportReport, ExportSettings, export, exported_model
from .inspection import inspect_checkpoint  # noqa: F401  (the job behind `sinkquant inspect`)
from .kv.cache import check_has_full_attention
from .kv.config import KVCacheConfig
from .kv.wiring import KVCalibration, cache_factory, calibrate_kv, needs_report
from .loading import is_sinkquant_checkpoint, open_model, prepare_model
from .modeling import load_tokenizer
from .preflight import refuse_empty_selection, refuse_overlap, refuse_quantized_source
from .quantize.algorithms import calibration_needs, quantize_weights
from .quantize.weights import QuantizeSummary
from .recipe import CalibrationSection, Recipe, load_recipe
from .stream.host import Execution, ModelHost, as_host

#: window length of `--eval` in `quantize` (the evaluation protocol's)
EVAL_SEQ_LEN = 1024


@dataclass
class QuantizeResult:
    out_dir: Path
    summary: QuantizeSummary
    report: CalibrationReport | None
    params_bytes_fp16: int  # every parameter of the source model at 2 bytes each
    embedding_bytes_fp16: int
    # weight matrices that are not linear layers (e.g. fused MoE experts): left at source precision
    outside_linears: dict[str, int]
    checkpoint_bytes: int  # safetensors bytes written
    folder_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)


def _param_bytes(model: nn.Module) -> tuple[int, int]:
    seen, total, embeddings = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * 2
        if isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.Embedding):
            embeddings += p.numel() * 2
    return total, embeddings


def quantization_config(
    recipe: Recipe, summary: QuantizeSummary, report: CalibrationReport | None, kv: KVCalibration | None
) -> SinkQuantConfig:
    w = recipe.weights
    return SinkQuantConfig(
        layers=summary.layers,
        bits=w.bits if w else None,
        group_size=w.group if w else None,
        symmetric=w.symmetric if w else False,
        algorithm=w.algorithm if w else "rtn",
        modules_to_not_convert=summary.skipped,
        kv_cache=recipe.kv_cache,
        calibration=report.summary_dict() if report else None,
        key_outlier_idx=kv.key_outlier_idx_json() if kv else None,
    )


def calibrate_for(
    model: nn.Module | ModelHost,
    tokenizer,
    recipe: Recipe,
    report: CalibrationReport | str | os.PathLike | None = None,
    progress: bool = True,
) -> Calibration:
    """The run's calibration: samples drawn once from `recipe.calibration` when any step reads them,
    and the report (`report` reused when given: a report or its JSON file) when any step needs one."""
    if isinstance(report, (str, os.PathLike)):
        report = CalibrationReport.load(report)
    host = as_host(model)
    w, kv = recipe.weights, recipe.kv_cache
    weights_samples, weights_report = calibration_needs(w)
    wants_report = weights_report or needs_report(kv)
    wants_samples = weights_samples or (kv is not None and kv.key_outlier_channels > 0)
    c = recipe.calibration
    samples = None
    if wants_samples or (wants_report and report is None):
        samples = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
    if report is None and wants_report:
        report = calibrate(host, tokenizer, settings=None, progress=progress, data=samples)
    layers = len(host.layers)
    if report is not None and report.num_layers != layers:
        raise InputError(
            f"the calibration report was made for a model with {report.num_layers} layers, not this one "
            f"({layers}); calibrate this model instead"
        )
    return Calibration(samples, report)


def quantize_model(
    model_id: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: Recipe | None = None,
    calibration: str | os.PathLike | CalibrationReport | None = None,
    overwrite: bool = False,
    eval_dataset: str | os.PathLike | None = None,
    eval_tokens: int | None = 16384,
    trust_remote_code: bool = False,
    progress: bool = True,
    execution: Execution | None = None,
) -> QuantizeResult:
    """Calibrate (or reuse `calibration`), quantize with `recipe`, save to `out_dir` atomically.

    A local model folder is streamed from disk one decoder layer at a time (see `stream/host.py`);
    `execution` picks the device and the memory the hidden states may take. With `eval_dataset`,
    perplexity before and after is measured (seq-len 1024, first `eval_tokens`)."""
    recipe = recipe or Recipe()
    refuse_quantized_source(model_id, trust_remote_code)
    out = prepare_out_dir(out_dir, overwrite)  # refuse early, before minutes of work
    refuse_overlap(model_id, out)
    with out_dir_lock(out):
        return _quantize_into(model_id, out, recipe, calibration, overwrite, eval_dataset, eval_tokens,
                              trust_remote_code, progress, execution or Execution())  # fmt: skip


def _quantize_into(
    model_id, out: Path, recipe: Recipe, calibration, overwrite: bool, eval_dataset, eval_tokens,
    trust_remote_code: bool, progress: bool, execution: Execution,
) -> QuantizeResult:  # fmt: skip
    times: dict[str, float] = {}
    clock = time.perf_counter
    start = clock()
    kv = recipe.kv_cache
    # the KV cache's key channels are measured by prefills through the whole quantized model
    whole = kv is not None and kv.key_outlier_channels > 0
    host, tokenizer = open_model(
        model_id, "float32", trust_remote_code, stream=not whole, **execution.kwargs()
    )
    model = host.model
    if not host.streamed:
        check_finite(model)  # name the broken source tensor, before NaN spreads into calibration and scales
    times["load"] = clock() - start
    total_bytes, embedding_bytes = _param_bytes(model)
    outside = weights_outside_linears(model)
    if recipe.weights is not None and recipe.weights.bits is not None:
        refuse_empty_selection(model, recipe.weights)
    if kv is not None:
        check_has_full_attention(get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))[0])

    t = clock()
    run = calibrate_for(host, tokenizer, recipe, calibration, progress)
    if run.report is not None and calibration is None:
        run.report.model = str(model_id)
        times["calibrate"] = clock() - t

    perplexity: dict[str, float] = {}

    def measure(stage: str, scored: ModelHost) -> None:
        if eval_dataset is not None:
            t = clock()
            result = evaluate(scored, tokenizer, eval_dataset, EVAL_SEQ_LEN, eval_tokens, progress=progress)
            perplexity[stage] = result.perplexity
            times[f"eval_{stage}"] = clock() - t

    measure("before", host)
    t = clock()
    summary = QuantizeSummary()
    with checkpoint_writer(out, overwrite, execution.shard_bytes(host)) as writer:
        if recipe.weights is not None:
            summary = quantize_weights(host, recipe.weights, run, progress=progress, writer=writer)
        else:
            writer.write_all(host)
        times["quantize"] = clock() - t
        measured_kv = calibrate_kv(model, kv, run.input_ids, run.report) if kv else None
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config(recipe, summary, run.report, measured_kv)
        t = clock()
        writer.finish(config, tokenizer, recipe, run.report, _generation_config(model_id, model))
        times["save"] = clock() - t
    if eval_dataset is not None:
        scored = host if not host.streamed else open_model(out, "float32", **execution.kwargs())[0]
        measure("after", scored)
    times["total"] = clock() - start
    return QuantizeResult(
        out_dir=out,
        summary=summary,
        report=run.report,
        params_bytes_fp16=total_bytes,
        embedding_bytes_fp16=embedding_bytes,
        outside_linears=outside,
        checkpoint_bytes=sum(p.stat().st_size for p in out.glob("*.safetensors")),
        folder_bytes=sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        seconds=times,
        perplexity=perplexity,
    )


def _generation_config(model_id, model: nn.Module):
    """The source's generation config (a streamed skeleton has only the defaults from its config)."""
    from transformers import GenerationConfig

    folder = Path(model_id).expanduser()
    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder))
    return getattr(model, "generation_config", None)


def _open_checked(model_id, dtype: str, trust_remote_code: bool, verify: bool, probe: Callable,
                  execution: Execution, stream: bool = True):  # fmt: skip
    """The model (streamed when it can be) and tokenizer; float16 is refused first where the model's
    activations leave its range, measured on `probe(tokenizer)` (real tokens of the run's own text)."""
    if dtype == "float16":
        ids = probe(load_tokenizer(model_id, trust_remote_code))
        model, tokenizer = prepare_model(model_id, dtype, trust_remote_code, probe_ids=ids, verify=verify)
        return as_host(model), tokenizer
    return open_model(model_id, dtype, trust_remote_code, stream=stream, verify=verify, **execution.kwargs())


def calibrate_model(
    model_id: str | os.PathLike,
    calibration: CalibrationSection | None = None,
    settings: CalibrationSettings | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    verify: bool = True,
    progress: bool = True,
    execution: Execution | None = None,
) -> CalibrationReport:
    """`sinkquant calibrate`: measure sinks, massive activations and outlier channels of a model."""
    c = calibration or CalibrationSection()

    def probe(tok):
        return calibration_samples(tok, c.dataset, 1, min(c.seq_len, 128), c.seed).input_ids

    host, tokenizer = _open_checked(
        model_id, dtype, trust_remote_code, verify, probe, execution or Execution()
    )
    data = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
    report = calibrate(host, tokenizer, settings=settings, progress=progress, data=data)
    report.model = str(model_id)
    return report


@dataclass
class KVRequest:
    """The KV cache an evaluation asks for: a recipe file, `kv_cache.*` overrides (flags), a saved
    calibration report. Nothing asked: the cache the checkpoint stored, if any."""

    recipe_path: str | os.PathLike | None = None
    overrides: dict = field(default_factory=dict)
    calibration: str | os.PathLike | None = None

    def resolve(self) -> Recipe | None:
        """The recipe the evaluation's cache comes from, the flags applied (its kv_cache None: no
        cache); None when nothing was asked (then the checkpoint's own cache, if any). A flag without
        a recipe kv_cache section starts from the default int4 cache."""
        recipe = load_recipe(self.recipe_path) if self.recipe_path else None
        given = {f"kv_cache.{k}": v for k, v in self.overrides.items() if v is not None}
        if not given:
            return recipe
        base = recipe or Recipe()
        if base.kv_cache is None:
            base = base.with_overrides(**{"kv_cache.bits": 4})
        return base.with_overrides(**given)

    def config(self) -> KVCacheConfig | None:
        """The cache asked for (None: none asked, or a recipe without one)."""
        recipe = self.resolve()
        return None if recipe is None else recipe.kv_cache


def evaluate_model(
    model_id: str | os.PathLike,
    dataset: str | os.PathLike,
    seq_len: int = EVAL_SEQ_LEN,
    max_tokens: int | None = None,
    reference: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    kv: KVRequest | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    verify: bool = True,
    progress: bool = True,
    execution: Execution | None = None,
) -> EvalResult:
    """`sinkquant eval`: perplexity (and KL against `reference`) under the fixed protocol, with the
    KV cache `kv` asks for (what the cache needs measured is measured on the recipe's calibration).
    Without a KV cache or chunks, local folders are streamed layer by layer (see `stream/host.py`)."""

    def probe(tok):
        return evaluation_windows(tok, "\n\n".join(load_documents(dataset)), min(seq_len, 128), None)[:1]

    execution = execution or Execution()
    kv = kv or KVRequest()
    asked = kv.resolve()
    whole = (
        chunk_size is not None
        or (asked is not None and asked.kv_cache is not None)
        or (asked is None and _stores_kv_cache(model_id))
    )
    host, tokenizer = _open_checked(model_id, dtype, trust_remote_code, verify, probe, execution, not whole)
    model = host.model
    factory = getattr(model, "sinkquant_cache_factory", None) if asked is None else None
    described = "as stored in the checkpoint" if factory is not None else None
    if asked is not None and asked.kv_cache is not None:
        config = asked.kv_cache
        run = calibrate_for(
            model, tokenizer, asked.model_copy(update={"weights": None}), kv.calibration, progress
        )
        factory = cache_factory(config, calibrate_kv(model, config, run.input_ids, run.report))
        described = config.describe()
    if factory is not None and chunk_size is None:
        chunk_size = 64  # a cache only matters when tokens arrive in chunks
    ref = None
    if reference:
        ref = open_model(reference, "auto", trust_remote_code, stream=not whole, verify=verify,
                         **execution.kwargs())[0]  # fmt: skip
    if ref is not None:
        ours, theirs = (_vocab(m.model) for m in (host, ref))
        if ours != theirs:
            raise InputError(
                f"the reference {reference} predicts {theirs} tokens and {model_id} {ours}: KL and top-1 "
                "agreement need one vocabulary; give the model this one was quantized from"
            )
    result = evaluate(host, tokenizer, dataset, seq_len, max_tokens, ref, chunk_size, factory, progress)
    result.extra = {"model": str(model_id), "reference": reference, "dtype": dtype, "kv_cache": described}
    return result


def _stores_kv_cache(model_id) -> bool:
    """Whether a sinkquant checkpoint carries a KV cache of its own (its evaluation then uses it)."""
    if not is_sinkquant_checkpoint(model_id):
        return False
    qc = json.loads((Path(model_id) / "config.json").read_text())["quantization_config"]
    return qc.get("kv_cache") is not None


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


@dataclass
class ExportResult:
    report: ExportReport
    #: with an evaluation text: {"checkpoint": ppl, "export": ppl}
    perplexity: dict[str, float] = field(default_factory=dict)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: ExportSettings | None = None,
    eval_dataset: str | os.PathLike | None = None,
    eval_tokens: int = 16384,
    progress: bool = True,
) -> ExportResult:
    """`sinkquant export`: write the checkpoint in another format; with `eval_dataset`, score the
    checkpoint and the export's effective weights (read back from its files) under the protocol, so
    the cost of folding the outlier columns is measured, not guessed."""
    from .checkpoint import load

    report = export(checkpoint, out_dir, settings, progress=progress)
    result = ExportResult(report)
    if eval_dataset is not None:
        tokenizer = load_tokenizer(str(checkpoint))
        model = load(checkpoint)
        before = evaluate(model, tokenizer, eval_dataset, EVAL_SEQ_LEN, eval_tokens, progress=progress)
        after = evaluate(
            exported_model(model, out_dir),
            tokenizer,
            eval_dataset,
            EVAL_SEQ_LEN,
            eval_tokens,
            progress=progress,
        )
        result.perplexity = {"checkpoint": before.perplexity, "export": after.perplexity}
    return result
