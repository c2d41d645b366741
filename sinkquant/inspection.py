"""`sinkquant inspect`: what a checkpoint holds, from its config and safetensors headers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import MANIFEST, stored_shapes
from .errors import InputError
from .format import LayerSpec


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """What a checkpoint holds, from its config and safetensors headers (no weights loaded)."""
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
    shapes = stored_shapes(path)
    layers = qc.get("layers", {})
    by_bits: dict[str, int] = {}
    for spec in layers.values():
        key = LayerSpec.from_dict(spec).scheme_text()
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
