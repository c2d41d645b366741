"""Loading whatever a user points at: a sinkquant checkpoint or a plain model, by what its folder holds.

This sits above `modeling` (plain models) and `checkpoint` (sinkquant's own format), so neither needs
the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load as load_checkpoint
from .errors import InputError
from .modeling import (
    check_fp16_range,
    check_model_source,
    check_weight_files,
    load_pretrained,
    load_tokenizer,
    resolve_dtype,
    stored_dtype,
)
from .stream.host import ModelHost


def is_sinkquant_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return qc.get("quant_method") == "sinkquant"


def load_model(
    model_id: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    verify: bool = True,
) -> nn.Module:
    """Load a causal LM (plain or a sinkquant checkpoint) for inference, in eval mode.

    A sinkquant checkpoint is verified against its sha256 manifest unless `verify` is False."""
    local = check_model_source(model_id, trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    if local is not None and is_sinkquant_checkpoint(local):
        return load_checkpoint(local, dtype=torch_dtype, verify=verify)
    return load_pretrained(model_id, local, torch_dtype, trust_remote_code, attn_implementation)


def prepare_model(
    model_id,
    dtype="auto",
    trust_remote_code=False,
    attn_implementation=None,
    probe_ids=None,
    verify: bool = True,
):
    """Load model and tokenizer; for float16, check the activation range first on `probe_ids`."""
    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(model_id, trust_remote_code)
    model = load_model(model_id, torch_dtype, trust_remote_code, attn_implementation, verify)
    if torch_dtype == torch.float16 and next(model.parameters()).dtype != torch.float16:
        if probe_ids is not None:
            check_fp16_range(model, probe_ids)
        model = model.to(torch.float16)
    return model, tokenizer


def open_model(
    model_id: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    *,
    device: str | torch.device | None = None,
    memory_budget: int | None = None,
    stream: bool = True,
    verify: bool = True,
    attn_implementation: str | None = None,
) -> tuple[ModelHost, object]:
    """The model and its tokenizer, for a job that walks the decoder layers in order.

    A local folder of safetensors files (a plain model or a sinkquant checkpoint) is streamed from
    disk one layer at a time (`StreamedModel`) unless `stream` is False; a hub id, `.bin` weights,
    code shipped in the folder, float16 (whose range check runs the whole model) or a folder whose
    tensors transformers renames on load are loaded whole (`ResidentModel`). Both give the same
    numbers."""
    from .stream.host import NotStreamable, ResidentModel, StreamedModel

    local = check_model_source(model_id, trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(model_id, trust_remote_code)
    streamable = (
        stream
        and local is not None
        and torch_dtype != torch.float16
        and not trust_remote_code
        and any(local.glob("*.safetensors"))
    )
    if streamable:
        checkpoint = is_sinkquant_checkpoint(local)
        try:
            config, prepare = _streaming_config(local, checkpoint, verify)
            host = StreamedModel(
                local, config, torch_dtype, device, prepare, attn_implementation, memory_budget
            )
        except NotStreamable:
            pass
        else:
            if not checkpoint:
                check_weight_files(local)
            return host, tokenizer
    model, tokenizer = prepare_model(
        model_id, torch_dtype, trust_remote_code, attn_implementation, verify=verify
    )
    stored = stored_dtype(model_id) if not is_sinkquant_checkpoint(model_id) else None
    return ResidentModel(model, device, memory_budget, storage_dtype=stored), tokenizer


def _streaming_config(folder: Path, checkpoint: bool, verify: bool):
    """The config of a folder to stream, and for a sinkquant checkpoint (verified as `load` verifies
    it) what puts its empty quantized layers into the skeleton."""
    from transformers import AutoConfig

    from .checkpoint import SinkQuantConfig, check_tensors, replace_with_empty_modules, verify_manifest

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}/config.json cannot be read: {str(exc).splitlines()[0]}") from exc
    if not checkpoint:
        return config, None
    if verify:
        verify_manifest(folder)
    qc = config.quantization_config
    qc = qc if isinstance(qc, SinkQuantConfig) else SinkQuantConfig.from_dict(qc)
    config.quantization_config = qc
    check_tensors(folder, config, qc)
    return config, lambda skeleton: replace_with_empty_modules(skeleton, qc.layers, device="meta")
