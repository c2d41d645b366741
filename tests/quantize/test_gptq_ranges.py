"""GPTQ on the rtn algorithm's int4 ranges (`weights.gptq.ranges: rtn`)."""

from __future__ import annotations

import copy

import pytest
import torch

from sinkquant import calibrate
from sinkquant.calibrate.report import Calibration
from sinkquant.data import calibration_samples
from sinkquant.errors import InputError
from sinkquant.format.primitives import dequantize_grouped, quantize_grouped
from sinkquant.quantize.algorithms import quantize_weights
from sinkquant.quantize.gptq_sweep import gptq_quantize_weight
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.quantize.search_choice import SearchChoice
from sinkquant.quantize.weights import quantize_
from sinkquant.recipe import Recipe, parse_recipe


def test_on_fixed_ranges_gptq_keeps_them_and_lowers_the_output_error_of_rounding_to_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 128, generator=g) @ (torch.randn(128, 128, generator=g) / 128**0.5 + torch.eye(128))
    hessian = 2 * x.T.double() @ x.double() / x.shape[0]
    weight = 0.05 * torch.randn(64, 128, generator=g)
    codes, scale, minimum = quantize_grouped(weight, 4, 32, param_dtype=torch.bfloat16)
    nearest = dequantize_grouped(codes, scale, minimum, 32)
    res = gptq_quantize_weight(weight, hessian, 4, 32, ranges=(scale, minimum))
    assert torch.equal(res.scale, scale) and torch.equal(res.minimum, minimum)

    def output_error(w):
        e = (w - weight).double()
        return float(torch.einsum("ri,ij,rj->", e, hessian, e))

    assert output_error(res.weight) < 0.8 * output_error(nearest)


def test_the_gptq_recipe_stores_the_rtn_algorithms_ranges_with_its_judgment(stories):
    """Every linear keeps exactly the ranges the rtn algorithm gives it (the range search where the
    KL judgment keeps it, reported in the summary), while GPTQ picks other codes on them."""
    model, tokenizer = stories
    samples = calibration_samples(tokenizer, None, 8, 64, 0)
    report = calibrate(model, tokenizer, data=samples, progress=False)
    recipe = Recipe().with_overrides(
        **{"weights.group_size": 32, "weights.algorithm": "gptq", "weights.gptq.ranges": "rtn"}
    )
    gptq = copy.deepcopy(model)
    summary = quantize_weights(gptq, recipe.weights, Calibration(samples, report), progress=False)
    assert summary.range_search is not None
    rtn = copy.deepcopy(model)
    choice = SearchChoice(frozenset(summary.range_search["min_max_in"]))
    rtn_weights = recipe.weights.model_copy(update={"algorithm": "rtn"})
    quantize_(rtn, rtn_weights, report, progress=False, searched=choice.searched)
    pairs = [
        (n, a, dict(rtn.named_modules())[n])
        for n, a in gptq.named_modules()
        if isinstance(a, SinkQuantLinear)
    ]
    assert len(pairs) == 35
    changed = 0
    for name, a, b in pairs:
        assert torch.equal(a.group_scale(), b.group_scale()), name
        assert torch.equal(a.group_minimum(), b.group_minimum()), name
        changed += int(not torch.equal(a.dequantized_weight(), b.dequantized_weight()))
    assert changed == len(pairs)


@pytest.mark.parametrize("other", ["rotation: 32", "symmetric: true", "log_scales: true", "grid: lloyd"])
def test_rtn_ranges_refuse_grids_they_do_not_fit(other):
    with pytest.raises(InputError, match="gptq.ranges: rtn"):
        parse_recipe(f"weights: {{algorithm: gptq, {other}, gptq: {{ranges: rtn}}}}")
