"""The weight-algorithm registry: every name a recipe accepts has one entry, all with one signature."""

import inspect
import typing

import pytest
import torch
from tiny_models import tiny_llama

from sinkquant.calibrate import Calibration
from sinkquant.errors import InputError
from sinkquant.quantize.algorithms import ALGORITHMS, quantize_weights
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.recipe import Recipe, WeightsSection


def test_registry_covers_exactly_the_recipe_choices():
    choices = set(typing.get_args(WeightsSection.model_fields["algorithm"].annotation))
    assert set(ALGORITHMS) == choices


def test_every_algorithm_shares_one_signature():
    expected = ["model", "weights", "calibration", "storage_dtype", "progress"]
    for name, algorithm in ALGORITHMS.items():
        params = inspect.signature(algorithm.run).parameters
        assert list(params)[:5] == expected, name
        assert params["storage_dtype"].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_each_entry_declares_the_calibration_it_reads():
    """The pipeline asks the registry what a section reads instead of testing algorithm names."""
    from sinkquant.quantize.algorithms import calibration_needs

    default = Recipe().weights
    # RTN: the report's outlier columns, and samples to judge where its int4 range search runs
    assert calibration_needs(default) == (True, True)
    assert calibration_needs(default.model_copy(update={"clip_search_judge": "everywhere"})) == (False, True)
    assert calibration_needs(default.model_copy(update={"outliers": None, "clip_search": False})) == (
        False,
        False,
    )
    assert calibration_needs(default.model_copy(update={"algorithm": "gptq"})) == (True, True)
    assert calibration_needs(default.model_copy(update={"bits": None})) == (False, False)
    assert calibration_needs(None) == (False, False)


def test_dispatch_by_name_and_storage_dtype_is_honoured():
    weights = Recipe().with_overrides(**{"weights.group_size": 32, "weights.outliers": None}).weights
    model = tiny_llama()
    summary = quantize_weights(model, weights, Calibration(), storage_dtype=torch.bfloat16, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert summary.modules == 14 and isinstance(layer, SinkQuantLinear)
    assert layer.outlier_weight.dtype == torch.bfloat16


def test_an_unregistered_name_is_an_input_error(monkeypatch):
    weights = Recipe().with_overrides(**{"weights.outliers": None}).weights
    monkeypatch.delitem(ALGORITHMS, "rtn")
    with pytest.raises(InputError, match="unknown weights.algorithm 'rtn'"):
        quantize_weights(tiny_llama(), weights, Calibration(), progress=False)


def test_gptq_without_samples_is_an_input_error():
    weights = Recipe().with_overrides(**{"weights.algorithm": "gptq", "weights.outliers": None}).weights
    with pytest.raises(InputError, match="calibration samples"):
        quantize_weights(tiny_llama(), weights, Calibration(), progress=False)
