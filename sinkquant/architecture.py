"""Finding the parts of a model that sinkquant looks at, by structure, not by attribute name.

Architectures name their parts differently (`model.layers`, `transformer.h`, ...); everything here
finds them by what they are (the module list with `num_hidden_layers` entries, modules that act as
linear layers), so Llama, Qwen2, Gemma 3 and GPT-2 share one path. Nothing here loads anything.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SinkQuantError


def text_config(config):
    """The config of the text decoder: the model's own, or a multimodal model's `text_config`
    (Gemma 3 from 4B up, whose vision tower sinkquant leaves as it is)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList holding the text decoder's `num_hidden_layers`
    blocks. A multimodal model also holds its vision encoder's blocks, so a list inside the text decoder
    (`get_decoder()`) comes first."""
    config = text_config(model.config)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    for root in (decoder, model) if isinstance(decoder, nn.Module) else (model,):
        for _, module in root.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n and n:
                return module
    raise SinkQuantError(
        f"could not find the decoder layers of {type(model).__name__}: no list of "
        f"{n if n else 'num_hidden_layers (not in its config)'} blocks"
    )


def linears_outside_text_model(model: nn.Module) -> list[str]:
    """Linear layers of a multimodal model that are not part of its language model: the vision tower and
    its projector (Gemma 3 from 4B up). They see no text in calibration, so sinkquant leaves them as
    they are. Empty for a text-only model (its config is its own text config)."""
    if text_config(model.config) is model.config:
        return []
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(decoder, nn.Module):
        return []
    keep = {id(m) for m in decoder.modules()} | (
        {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    )
    return [name for name, m in model.named_modules() if is_linear(m) and id(m) not in keep]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by qualified name (lm_head included; the weights step decides what to skip)."""
    return {name: m for name, m in model.named_modules() if is_linear(m)}


def weights_outside_linears(model: nn.Module) -> dict[str, int]:
    """Weight matrices (2-D or more) that no linear layer or embedding holds, by qualified name, with their
    element counts: what a quantizer of linear layers leaves at source precision, e.g. the fused MoE
    experts of gpt-oss (`mlp.experts.gate_up_proj`, 3-D) or its router. Norms and biases are not counted
    (gpt-oss's expert biases are 2-D: one row per expert). Element counts only, so a model on the meta
    device (streamed from disk) answers too."""
    found: dict[str, int] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if is_linear(module) or isinstance(module, nn.Embedding):
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and not name.endswith("bias") and id(p) not in seen:
                seen.add(id(p))
                found[f"{module_name}.{name}" if module_name else name] = p.numel()
    return found


def hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (a dotted path) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
