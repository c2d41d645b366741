"""Equivalent channel scaling before an export: what replaces sinkquant's full-precision outlier columns
in formats that cannot hold them.

A linear layer's input channel j can be divided by s_j where it is produced and the layer's weight
column j multiplied by s_j: the model computes the same function, but the quantizer sees other numbers.
The places where the division is exact (`sites`):

* a norm's weight before q/k/v (`input_layernorm`) and before gate/up (`post_attention_layernorm`, or
  Gemma's `pre_feedforward_layernorm`; Gemma's norms multiply by 1 + weight);
* up_proj's output rows before down_proj (down_proj's input is act(gate) * up, linear in up).

Two choices of s, each on the channel statistics calibration measures on the checkpoint itself
(`LinearStats`: max and mean |x| per input channel):

* `int8_activations` (W8A8, SmoothQuant): per-token int8 activations lose every channel but the largest
  on a token with a massive activation (the sink token), so the activation range moves into the
  weights: s_j = max|x_j|^a / max|W_j|^(1-a) with SmoothQuant's a = 0.5;
* weight-only 4-bit (AWQ's idea): the columns that meet large activations are rounded more finely when
  scaled up: s_j = mean|x_j|^a, a searched on a grid per site for the least activation-weighted
  rounding error sum_j mean|x_j|^2 sum_i (W_ij - Q(W s)_ij / s_j)^2 of the site's layers together (they
  share s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: SmoothQuant's migration strength (its paper's default for the models it studies)
SMOOTHQUANT_ALPHA = 0.5
#: the grid searched for the weight-only strength (0: no scaling)
WEIGHT_ONLY_ALPHAS = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class Site:
    """Where input channels of `targets` are produced: a norm's weight or a linear layer's rows."""

    producer: str  # a parameter name (norm weight) or a module name (rows of a linear layer)
    kind: str  # "norm", "norm_plus_one" (Gemma: x * (1 + w)) or "rows"
    targets: tuple[str, ...]  # linear modules reading those channels, fused by vLLM where they share it


def sites(layer_prefixes: list[str], modules: dict[str, object], quantized: set[str]) -> list[Site]:
    """The scaling sites of each decoder layer, found by name (Llama, Qwen2, Mistral, Gemma 3 layouts).
    `modules`: name -> module of the model; a site is used only when all its targets are quantized."""
    found = []
    for prefix in layer_prefixes:
        attn = tuple(f"{prefix}self_attn.{p}_proj" for p in "qkv")
        mlp_in = (f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj")
        norm_mlp = (
            f"{prefix}pre_feedforward_layernorm"
            if f"{prefix}pre_feedforward_layernorm" in modules
            else f"{prefix}post_attention_layernorm"
        )
        for norm, targets in ((f"{prefix}input_layernorm", attn), (norm_mlp, mlp_in)):
            if norm in modules and set(targets) <= quantized:
                kind = "norm_plus_one" if "Gemma" in type(modules[norm]).__name__ else "norm"
                found.append(Site(f"{norm}.weight", kind, targets))
        if {f"{prefix}mlp.up_proj", f"{prefix}mlp.down_proj"} <= quantized:
            found.append(Site(f"{prefix}mlp.up_proj", "rows", (f"{prefix}mlp.down_proj",)))
    return found


def smoothquant_scales(
    max_x: torch.Tensor, weights: list[torch.Tensor], alpha: float = SMOOTHQUANT_ALPHA
) -> torch.Tensor:
    max_w = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = max_x.clamp(min=1e-5) ** alpha / max_w.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(1e-4, 1e4)


def weight_only_scales(
    mean_x: torch.Tensor, weights: list[torch.Tensor], roundtrip: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """(s, a): the searched scales and strength. `roundtrip` quantizes and dequantizes a weight."""
    importance = mean_x.float() ** 2
    base = mean_x.float().clamp(min=1e-6)
    best = (None, float("inf"), 0.0)
    for alpha in WEIGHT_ONLY_ALPHAS:
        s = base**alpha
        s = s / (s.max() * s.min()).sqrt()  # centred, so scaling does not drift the weights' magnitude
        error = 0.0
        for w in weights:
            back = roundtrip(w * s) / s
            error += float((((back - w) ** 2).sum(0) * importance).sum())
        if error < best[1]:
            best = (s, error, alpha)
    return best[0], best[2]


def divide_producer(site: Site, tensor: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The producer's tensor with channel j divided by s_j (a norm weight [n], or rows [n, in] / bias [n])."""
    t = tensor.float()
    if site.kind == "norm_plus_one":
        return ((1 + t) / s - 1).to(tensor.dtype)
    if t.dim() == 2:
        return (t / s[:, None]).to(tensor.dtype)
    return (t / s).to(tensor.dtype)
