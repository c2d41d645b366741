"""An export's effective weights back on a loaded checkpoint (`exported_model`), so sinkquant's evaluator
can say what the fold costs (`sinkquant export --eval`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import compressed_tensors as ct
from .formats import EXPORT_FORMATS, keys_by_module


class ExportedLinear(nn.Module):
    """A dense layer holding an export's effective weight; with `int8_activations`, its input is
    rounded per token to int8 first (dynamic, symmetric), as vLLM's W8A8 kernel does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, int8_activations: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.int8_activations = int8_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_activations:
            scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127
            x = (torch.round(x.float() / scale).clamp(-128, 127) * scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def exported_model(model: nn.Module, export_dir: str | Path) -> nn.Module:
    """Replace `model`'s quantized layers (a loaded sinkquant checkpoint) by the effective weights of
    the export in `export_dir`, read back from its files; returns `model`."""
    from ..architecture import replace_module
    from ..quantize.linear import SinkQuantLinear
    from ..stream.source import SafetensorsSource

    export_dir = Path(export_dir)
    qc = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    w = group["weights"]
    args = ct.WeightArgs(w["num_bits"], w["group_size"], w["symmetric"])
    activations = "int8" if group.get("input_activations") else "none"
    fmt = EXPORT_FORMATS["compressed-tensors"]  # the one format whose config this reads
    ignore = set(qc.get("ignore") or [])
    source = SafetensorsSource(export_dir)
    quantized = {n for n, m in model.named_modules() if isinstance(m, SinkQuantLinear)}
    keys_of, outside = keys_by_module(source.names(), quantized)
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():  # the tensors outside the linear layers as exported (smoothing changes norms)
        for key in outside:
            if key in own:
                own[key].copy_(source.read([key])[key])
    for name, module in list(model.named_modules()):
        if not isinstance(module, SinkQuantLinear):
            continue
        tensors = {k[len(name) + 1 :]: v for k, v in source.read(keys_of[name]).items()}
        bias = tensors.pop("bias", None)
        weight = tensors["weight"].float() if name in ignore else fmt.read(tensors, args, activations)
        replace_module(
            model,
            name,
            ExportedLinear(
                weight, None if bias is None else bias.float(), activations == "int8" and name not in ignore
            ),
        )
    return model
