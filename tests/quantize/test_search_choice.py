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
from sinkquant.quantize.weights import column_importance, quantize_, rtn_linear, targets
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


def _rows_on_their_min_max_grid(rows: int, width: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """Weights [rows, width] whose groups span [-a, a] (a = 15/128: the scale 2a/15 = 1/64 and the minimum
    are exact in bf16) with every other value 0.4 of a step off a level of that grid, half above and half
    below: min/max rounds each by 0.4 of a step (a large squared error), and the errors of a group sum
    to zero."""
    a = 15 / 128
    step = 2 * a / 15
    offsets = torch.tensor([0.4, -0.4]).repeat_interleave((group - 2) // 2)
    out = torch.empty(rows, width)
    for r in range(rows):
        for s in range(0, width, group):
            levels = torch.randint(1, 15, (group - 2,), generator=gen).float()
            values = torch.cat([torch.tensor([a, -a]), -a + (levels + offsets) * step])
            out[r, s : s + group] = values[torch.randperm(group, generator=gen)]
    return out


@pytest.fixture(scope="module")
def correlated(stories):
    """A one-layer Llama whose MLP reads the same vector (up to its sign) at every token: the embeddings
    are multiples of the all-ones vector and attention adds almost nothing, so gate/up's inputs are
    perfectly correlated and a row's output error is the sum of its weight errors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = stories
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        size = torch.rand(512, 1, generator=gen) + 0.5
        sign = torch.randint(0, 2, (512, 1), generator=gen) * 2 - 1
        model.model.embed_tokens.weight.copy_(size * sign * torch.ones(1, 64))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.mul_(0.01)
        layer.mlp.gate_proj.weight.copy_(_rows_on_their_min_max_grid(128, 64, 32, gen))
        layer.mlp.up_proj.weight.copy_(_rows_on_their_min_max_grid(128, 64, 32, gen))
        layer.mlp.down_proj.weight.normal_(0, 0.1, generator=gen)
        model.lm_head.weight.normal_(0, 1.0, generator=gen)
    samples = calibration_samples(tokenizer, None, 6, 64, 0)
    report = calibrate(model, tokenizer, data=samples, progress=False)
    weights = Recipe().weights.model_copy(update={"group_size": 32, "outliers": None})
    return model, samples, report, weights


def test_correlated_inputs_keep_min_max_where_the_diagonal_weighting_would_move_it(correlated):
    """Issue 48, item 2. With gate/up's inputs correlated, the search's diagonal weighting (E[x²] per
    column) prefers a shrunk range (half min/max's weighted squared error), but at the layer's output
    (e H eᵀ with the full second moment of its calibration inputs) min/max is exact and the shrunk range
    is not. The default keeps min/max in gate/up there; the search everywhere (the default before the
    judgment) moved every one of their groups."""
    model, samples, report, weights = correlated
    gate = model.model.layers[0].mlp.gate_proj
    inputs = []
    hook = gate.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for row in samples.input_ids:
            model(row[None])
    hook.remove()
    x = torch.cat(inputs).double()
    second_moment = x.T @ x / x.shape[0]
    diagonal = column_importance("model.layers.0.mlp.gate_proj", report).double()
    errors = {}
    for label, w in (("search", weights), ("min/max", weights.model_copy(update={"clip_search": False}))):
        rounded, _ = rtn_linear("model.layers.0.mlp.gate_proj", gate, w, report, None)
        e = rounded.dequantized_weight().double() - gate.weight.detach().double()
        errors[label] = (
            float((e.pow(2) * diagonal).sum()),
            float(torch.einsum("ri,ij,rj->", e, second_moment, e)),
        )
    assert errors["search"][0] < 0.6 * errors["min/max"][0]  # the diagonal prefers the search
    assert errors["min/max"][1] < 1e-3 * errors["search"][1]  # the layer's output prefers min/max

    judged = quantize_weights(copy.deepcopy(model), weights, Calibration(samples, report), progress=False)
    assert {"gate_proj", "up_proj"} <= set(judged.range_search["min_max_in"])
    assert judged.range_moved["gate_proj"] == [0, 256] and judged.range_moved["up_proj"] == [0, 256]
    everywhere = weights.model_copy(update={"clip_search_judge": "everywhere"})
    old = quantize_weights(copy.deepcopy(model), everywhere, Calibration(samples, report), progress=False)
    assert old.range_moved["gate_proj"] == [256, 256] and old.range_moved["up_proj"] == [256, 256]
