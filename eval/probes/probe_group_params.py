"""What would cheaper int4 group parameters cost? A probe before building a storage format for them.

    python -m eval.probes.probe_group_params TOKENS RECIPE MODE[:JSON_OVERRIDES] ...

Today an int4 group of 128 stores a bf16 scale and a bf16 minimum: 32 bits, 0.25 bits per weight, as
much as 1% of full-precision input columns cost. Cheaper parameters would pay for more columns at the
same bits (AutoRound, at 4.17 bits per weight, stores fp16 scales and 4-bit zero points). This probe
runs `quantize_model` as a user does with the quantizer's parameters snapped, in memory, onto the grids
a compact format would store, then scores the checkpoint (perplexity, KL and top-1 against the float
model). It writes no format: the bits a format would take are computed in the results page, not here.

MODE letters (combine them, e.g. `BF`; `X` = unchanged):
  A  integer 4-bit zero points: minimum = -z * scale, z in 0..15 (the GPTQ / compressed-tensors form)
  F  8-bit zero points in sixteenths of a step: minimum = -(k / 16) * scale, k in 0..255
  B  8-bit scales on a log grid of 1/32 octave: scale = 2^(round(32 log2 scale) / 32)
  R  outlier columns int8, one scale per output row (applied to the loaded checkpoint)
  C  outlier columns int8, one scale per column (applied to the loaded checkpoint)
The codes are recomputed against the snapped parameters, so round-to-nearest and GPTQ (whose per-group
ranges go through the same `quantize_grouped`) both optimise on the snapped grid.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import sinkquant.format.primitives as primitives
import sinkquant.format.schemes as schemes
from eval.lib.common import RUNS, WIKITEXT, default_model
from sinkquant.checkpoint import load
from sinkquant.evaluate import evaluate
from sinkquant.loading import open_model
from sinkquant.modeling import load_tokenizer
from sinkquant.pipeline import quantize_model
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.recipe import load_recipe

_plain_quantize_grouped = primitives.quantize_grouped
MODE: set[str] = set()


def snap(scale: torch.Tensor, minimum: torch.Tensor | None, dtype: torch.dtype):
    """(scale, minimum) on the grids MODE names, in `dtype`."""
    s = scale.float()
    if "B" in MODE:
        s = torch.exp2(torch.round(torch.log2(s.clamp(min=1e-12)) * 32) / 32)
    s = s.to(dtype)
    if "F" in MODE and minimum is not None:
        z = (torch.round(-minimum.float() / s.float() * 16) / 16).clamp(0, 255 / 16)
        minimum = (-z * s.float()).to(dtype)
    if "A" in MODE and minimum is not None:
        z = torch.round(-minimum.float() / s.float()).clamp(0, 15)
        minimum = (-z * s.float()).to(dtype)
    return s, minimum


def snapped_quantize_grouped(
    x, bits, group_size, symmetric=False, param_dtype=torch.float32, log_scales=False
):
    """`quantize_grouped` with its int4 parameters snapped and the codes recomputed against them."""
    codes, scale, minimum = _plain_quantize_grouped(x, bits, group_size, symmetric, param_dtype, log_scales)
    if bits != 4 or not MODE & {"A", "B", "F"}:
        return codes, scale, minimum
    scale, minimum = snap(scale, minimum, param_dtype)
    if symmetric:
        minimum = (-8 * scale.float()).to(param_dtype)
    g = primitives._grouped_view(x.float(), group_size)
    c = torch.round((g - minimum.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15)
    codes = c.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]].to(torch.uint8)
    return codes, scale, minimum


def int8_outlier_columns(model: torch.nn.Module, per: str) -> None:
    """Round every layer's outlier columns to int8, one absmax scale per output row or per column."""
    dim = 1 if per == "row" else 0
    for module in model.modules():
        if isinstance(module, SinkQuantLinear) and module.n_outliers:
            w = module.outlier_weight.float()
            scale = w.abs().amax(dim, keepdim=True).clamp(min=1e-12) / 127
            module.outlier_weight.copy_((torch.round(w / scale) * scale).to(module.outlier_weight.dtype))
            module.reset_layouts()


def main() -> None:
    tokens, recipe_file, modes = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    primitives.quantize_grouped = snapped_quantize_grouped  # what quantize_grouped_clipped calls
    schemes.int4.quantize_grouped = snapped_quantize_grouped  # what the int4 scheme (RTN and GPTQ) calls
    model = default_model()
    tokenizer = load_tokenizer(model)
    reference = open_model(model, "float32")[0]
    for spec in modes:
        letters, _, overrides = spec.partition(":")
        MODE.clear()
        MODE.update(letters)
        recipe = load_recipe(recipe_file)
        if overrides:
            recipe = recipe.with_overrides(**json.loads(overrides))
        start = time.perf_counter()
        quantize_model(model, RUNS / "probe-group-params", recipe, overwrite=True, progress=False)
        seconds = time.perf_counter() - start
        quantized = load(RUNS / "probe-group-params")
        for letter, per in (("R", "row"), ("C", "column")):
            if letter in MODE:
                int8_outlier_columns(quantized, per)
        r = evaluate(quantized, tokenizer, WIKITEXT, 1024, tokens, reference=reference, progress=False)
        print(
            f"{spec}: ppl {r.perplexity:.4f} KL {r.kl:.4f} top1 {r.top1_agreement:.4f} quantize {seconds:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
