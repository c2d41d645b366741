"""What a quantize job refuses before any work: a source that is already quantized (by sinkquant or
another tool), an output folder that is or holds the source, a recipe that selects no linear layer."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from torch import nn

from .errors import InputError
from .quantize.weights import targets
from .recipe import WeightsSection


def refuse_quantized_source(model_id: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """A sinkquant checkpoint is not a source: its linear layers are already quantized, so nothing
    would be quantized again and the folder written would not load. Re-quantizing from its dequantized
    weights is refused too, not offered behind a flag: it rounds twice and picks outlier columns from
    weights that already lost them, so the result is always worse than quantizing the original."""
    qc = _source_quantization_config(model_id, trust_remote_code)
    if isinstance(qc, dict) and qc.get("quant_method") == "sinkquant":
        scheme = f"int{qc.get('bits')}" + (f" g{qc['group_size']}" if qc.get("group_size") else "")
        raise InputError(
            f"{model_id} is already a sinkquant checkpoint ({scheme}, {len(qc.get('layers', {}))} quantized "
            "layers); quantize the original model it was made from instead"
        )
    method = foreign_quant_method(qc)
    if method is not None:
        raise InputError(
            f"{model_id} is already quantized ({method}); sinkquant starts from unquantized weights: use a "
            "bf16/fp16/fp32 copy of the model (for an MXFP4 model such as gpt-oss, one with its experts "
            "dequantized)"
        )


def _source_quantization_config(model_id: str | os.PathLike, trust_remote_code: bool) -> object:
    """The source's `quantization_config` as its config.json has it: read from a local folder, or through
    `AutoConfig` for a hub id (the config alone, before any weights); None where there is none or the
    config cannot be read here (the model's loading then says why)."""
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        try:
            return json.loads((folder / "config.json").read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_id), trust_remote_code=trust_remote_code)
    except Exception:  # offline, unknown id, remote code refused: the model's loading reports it
        return None
    return getattr(config, "quantization_config", None)


def foreign_quant_method(qc: object) -> str | None:
    """How another tool quantized a model, from its `quantization_config` (None: it holds weights
    sinkquant can start from). GPTQ, AWQ, MXFP4, FP8 and bitsandbytes store quantized values (packed
    integers, FP8), not weights; a compressed-tensors config without quantization groups (sparsity or
    a KV-cache scheme only) still holds float weights, and sinkquant's own checkpoints are refused
    with their own message."""
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    method = getattr(method, "value", method)  # a config object's to_dict() holds an enum member
    if method == "sinkquant":
        return None
    if method == "compressed-tensors" and not qc.get("config_groups"):
        return None
    if method is None:
        if qc.get("load_in_4bit") or qc.get("load_in_8bit"):
            return "quantization_config: bitsandbytes"
        return "its quantization_config names no quant_method"
    return f"quantization_config.quant_method: {method}"


def refuse_overlap(model_id: str | os.PathLike, out: Path) -> None:
    """The output may not be the source folder, nor a folder holding it: writing it would replace the
    model being read."""
    source = Path(model_id).expanduser()
    if not source.exists():
        return
    source, target = source.resolve(), out.resolve()
    if target == source or source.is_relative_to(target):
        raise InputError(
            f"the output folder {out} {'is' if target == source else 'holds'} the model folder {model_id}; "
            "writing it would replace the model being read: choose another output folder"
        )


def refuse_empty_selection(model: nn.Module, weights: WeightsSection) -> None:
    """A weights section that selects no linear layer would write a checkpoint that quantizes nothing."""
    with warnings.catch_warnings():  # the algorithm warns about unused patterns itself, once
        warnings.simplefilter("ignore")
        chosen, skipped = targets(model, weights.ignore)
    if not chosen:
        listed = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "") or "none"
        raise InputError(
            f"the recipe quantizes no linear layer: weights.ignore ({', '.join(weights.ignore)}) covers all "
            f"{len(skipped)} of them ({listed}); narrow weights.ignore, or drop the weights section to "
            "quantize only the KV cache"
        )
