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
from .modeling import check_fp16_range, check_model_source, load_pretrained, load_tokenizer, resolve_dtype


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
