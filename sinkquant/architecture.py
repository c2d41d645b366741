"""Finding the parts of a model that sinkquant looks at, by structure, not by attribute name.

Architectures name their parts differently (`model.layers`, `transformer.h`, ...); everything here
finds them by what they are (the module list with `num_hidden_layers` entries, modules that act as
linear layers), so Llama, Qwen2, Gemma 3 and GPT-2 share one path. Nothing here loads anything.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SinkQuantError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList holding `num_hidden_layers` blocks."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return module
    raise SinkQuantError(f"could not find the {n} decoder layers of {type(model).__name__}")


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
