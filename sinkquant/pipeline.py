"""The main job end to end: calibrate (or reuse a report), quantize, save, optionally evaluate.

The CLI's `quantize` command and Python pipelines call `quantize_model`; each step is also public on
its own (`calibrate`, `quantize_`, `save`, `evaluate`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibrate import CalibrationReport, calibrate
from .checkpoint import SinkQuantConfig, check_finite, prepare_out_dir, save
from .errors import InputError
from .modeling import prepare_model
from .quantize.weights import QuantizeSummary, quantize_
from .recipe import Recipe


@dataclass
class QuantizeResult:
    out_dir: Path
    summary: QuantizeSummary
    report: CalibrationReport | None
    params_bytes_fp16: int  # every parameter of the source model at 2 bytes each
    embedding_bytes_fp16: int
    checkpoint_bytes: int  # safetensors bytes written
    folder_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)


def _param_bytes(model) -> tuple[int, int]:
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
    recipe: Recipe,
    summary: QuantizeSummary,
    report: CalibrationReport | None,
    key_channels: dict | None = None,
) -> SinkQuantConfig:
    w = recipe.weights
    return SinkQuantConfig(
        layers=summary.layers,
        bits=w.bits if w else None,
        group_size=w.group if w else None,
        symmetric=w.symmetric if w else False,
        algorithm=w.algorithm if w else "rtn",
        modules_to_not_convert=summary.skipped,
        kv_cache=recipe.kv_cache.model_dump(mode="json") if recipe.kv_cache else None,
        calibration=report.summary_dict() if report else None,
        kv_key_channels=key_channels,
    )


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
) -> QuantizeResult:
    """Calibrate (or reuse `calibration`), quantize with `recipe`, save to `out_dir` atomically.

    With `eval_dataset`, perplexity before and after is measured (seq-len 1024, first `eval_tokens`)."""
    recipe = recipe or Recipe()
    out = prepare_out_dir(out_dir, overwrite)  # refuse early, before minutes of work
    times: dict[str, float] = {}
    start = time.perf_counter()
    if recipe.kv_cache is not None:
        from .quantize.generation import kv_config

        kv_config(recipe.kv_cache)  # the cache's own rules, so no checkpoint stores settings it refuses
    model, tokenizer = prepare_model(model_id, "float32", trust_remote_code)
    check_finite(model)  # name the broken source tensor, before NaN spreads into calibration and scales
    times["load"] = time.perf_counter() - start
    total_bytes, embedding_bytes = _param_bytes(model)

    report = calibration
    if isinstance(calibration, (str, os.PathLike)):
        report = CalibrationReport.load(calibration)
    needs_report = recipe.weights is not None and (
        recipe.weights.outliers is not None or recipe.weights.algorithm == "gptq"
    )
    needs_report = needs_report or (recipe.kv_cache is not None and recipe.kv_cache.sinks == "auto")
    if report is None and needs_report:
        t = time.perf_counter()
        c = recipe.calibration
        report = calibrate(model, tokenizer, c.dataset, c.samples, c.seq_len, c.seed, progress=progress)
        report.model = str(model_id)
        times["calibrate"] = time.perf_counter() - t
    if report is not None and report.num_layers != model.config.num_hidden_layers:
        raise InputError(
            f"the calibration report was made for a model with {report.num_layers} layers, not {model_id}"
        )

    perplexity: dict[str, float] = {}

    def measure(stage: str) -> None:
        if eval_dataset is None:
            return
        from .evaluate import evaluate

        t = time.perf_counter()
        perplexity[stage] = evaluate(
            model, tokenizer, eval_dataset, 1024, eval_tokens, progress=progress
        ).perplexity
        times[f"eval_{stage}"] = time.perf_counter() - t

    measure("before")

    t = time.perf_counter()
    if recipe.weights is not None and recipe.weights.algorithm == "gptq":
        from .quantize.gptq import gptq_quantize_

        summary = gptq_quantize_(model, tokenizer, recipe, report, progress=progress)
    elif recipe.weights is not None:
        summary = quantize_(model, recipe.weights, report, progress=progress)
    else:
        summary = QuantizeSummary()
    times["quantize"] = time.perf_counter() - t

    key_channels = None
    if recipe.kv_cache is not None and recipe.kv_cache.key_outlier_channels > 0:
        from .data import calibration_samples
        from .quantize.generation import calibrated_key_channels

        c = recipe.calibration
        ids = calibration_samples(tokenizer, c.dataset, min(c.samples, 16), c.seq_len, c.seed).input_ids
        sinks = report.sink_positions if report is not None else [0]
        chosen = calibrated_key_channels(model, ids, recipe.kv_cache.key_outlier_channels, sinks)
        key_channels = {str(layer): idx.tolist() for layer, idx in chosen.items()}
    model.config.quantization_config = quantization_config(recipe, summary, report, key_channels)
    t = time.perf_counter()
    save(model, out, tokenizer, recipe, report, overwrite=overwrite)
    times["save"] = time.perf_counter() - t

    measure("after")
    times["total"] = time.perf_counter() - start
    return QuantizeResult(
        out_dir=out,
        summary=summary,
        report=report,
        params_bytes_fp16=total_bytes,
        embedding_bytes_fp16=embedding_bytes,
        checkpoint_bytes=sum(p.stat().st_size for p in out.glob("*.safetensors")),
        folder_bytes=sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        seconds=times,
        perplexity=perplexity,
    )


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """What a checkpoint holds, from its config and safetensors headers (no weights loaded)."""
    import json

    from .checkpoint import MANIFEST, _stored_shapes

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a model folder (no config.json)")
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "sinkquant":
        raise InputError(
            f"{path} is not a sinkquant checkpoint (its config.json has no sinkquant quantization_config); "
            "give a folder written by `sinkquant quantize`"
        )
    shapes = _stored_shapes(path)
    layers = qc.get("layers", {})
    by_bits: dict[str, int] = {}
    for spec in layers.values():
        key = f"int{spec['bits']}" + (
            f" g{spec['group_size']}" if spec["bits"] == 4 and spec["group_size"] else ""
        )
        by_bits[key] = by_bits.get(key, 0) + 1
    return {
        "path": str(path),
        "model_type": config.get("model_type"),
        "format_version": qc.get("format_version"),
        "algorithm": qc.get("algorithm"),
        "quantized_modules": len(layers),
        "schemes": by_bits,
        "outlier_columns": sum(s["outliers"] for s in layers.values()),
        "input_columns": sum(s["in_features"] for s in layers.values()),
        "not_converted": qc.get("modules_to_not_convert", []),
        "kv_cache": qc.get("kv_cache"),
        "sinks": (qc.get("calibration") or {}).get("sinks", {}).get("positions"),
        "massive_dims": (qc.get("calibration") or {}).get("massive", {}).get("dims"),
        "tensors": len(shapes),
        "safetensors_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
        "folder_bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        "manifest": (path / MANIFEST).is_file(),
    }
