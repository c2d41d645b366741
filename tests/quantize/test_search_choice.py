"""The `rtn` algorithm's judgment of where the int4 range search runs (quantize/search_choice.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sinkquant import calibrate
from sinkquant.calibrate.report import Calibration
from sinkquant.data import calibration_samples
from sinkquant.quantize.algorithms import calibration_needs, quantize_weights
from sinkquant.quantize.search_choice import JUDGE_SAMPLES, SearchChoice, choose_search, kind_of
from sinkquant.quantize.weights import quantize_, targets
from sinkquant.recipe import Recipe, WeightsSection
from sinkquant.stream.host import as_host


@pytest.fixture(scope="module")
def setup(stories):
    """stories260k, 6 x 64 calibration tokens, their report and the default weights at g32 (its width is 64)."""
    model, tokenizer = stories
    samples = calibration_samples(tokenizer, None, 6, 64, 0)
    report = calibrate(model, tokenizer, data=samples, progress=False)
    weights = Recipe().weights.model_copy(update={"group_size": 32})
    return model, samples, report, weights


def _kl_of(model, reference, ids) -> float:
    """Mean KL(p_ref || p) per predicted token, by whole-model forwards (independent of the walk)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            ref = F.log_softmax(reference(row[None]).logits[0, :-1].float(), -1)
            mine = F.log_softmax(model(row[None]).logits[0, :-1].float(), -1)
            total += float((ref.exp() * (ref - mine)).sum(dtype=torch.float64))
            count += mine.shape[0]
    return total / count


def test_the_walk_scores_what_quantize_builds(setup):
    """The judgment's KL of "search everywhere" and "min/max everywhere" are those of the models
    `quantize_` builds with those settings, measured by plain forwards (to 1%: the walk computes with
    the dequantized weights in float32, `SinkQuantLinear` with its int4 kernel; the two settings'
    KLs lie 7% apart on this model); its pick is the lowest KL."""
    model, samples, report, weights = setup
    chosen, _ = targets(model, weights.ignore)
    choice = choose_search(as_host(model), chosen, weights, report, samples.input_ids)
    ids = samples.input_ids[:JUDGE_SAMPLES]
    for label, w in (("search", weights), ("min/max", weights.model_copy(update={"clip_search": False}))):
        quantized = copy.deepcopy(model)
        quantize_(quantized, w, report, progress=False)
        assert abs(choice.kl[label] - _kl_of(quantized, model, ids)) < 1e-2 * choice.kl[label]
    best = min(choice.kl, key=choice.kl.get)
    kinds = {kind_of(n) for n in chosen}
    expected = {"search": set(), "min/max": kinds}.get(
        best, set(best.removeprefix("min/max in ").split(", "))
    )
    assert set(choice.off) == expected


def test_rtn_quantizes_with_the_judgment_and_reports_it(setup):
    model, samples, report, weights = setup
    built = copy.deepcopy(model)
    summary = quantize_weights(built, weights, Calibration(samples, report), progress=False)
    judged = summary.range_search
    assert judged is not None and set(judged["kl"]) >= {"search", "min/max"}
    expected = copy.deepcopy(model)
    choice = SearchChoice(frozenset(judged["min_max_in"]))
    quantize_(expected, weights, report, progress=False, searched=choice.searched)
    for (name, a), (_, b) in zip(built.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_everywhere_is_the_search_in_every_linear(setup):
    model, samples, report, weights = setup
    everywhere = weights.model_copy(update={"clip_search_judge": "everywhere"})
    built, plain = copy.deepcopy(model), copy.deepcopy(model)
    summary = quantize_weights(built, everywhere, Calibration(samples, report), progress=False)
    assert summary.range_search is None
    quantize_(plain, weights, report, progress=False)
    for (name, a), (_, b) in zip(built.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_judgment_needs_samples_only_where_it_runs():
    assert calibration_needs(WeightsSection()) == (True, True)
    assert calibration_needs(WeightsSection(clip_search_judge="everywhere")) == (False, True)
    assert calibration_needs(WeightsSection(clip_search=False)) == (False, True)
    assert calibration_needs(WeightsSection(bits=8)) == (False, True)
