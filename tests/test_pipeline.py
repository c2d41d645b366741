"""The jobs as functions: one calibration draw per run, reused by every step; the KV cache an eval
asks for, by precedence (flags over a recipe over what the checkpoint stored)."""

import pytest
import torch
from tiny_models import CharTokenizer, save_tiny, tiny_llama

import sinkquant.pipeline as pipeline
from sinkquant.kv import KVCacheConfig
from sinkquant.pipeline import KVRequest, calibrate_for, quantize_model
from sinkquant.recipe import Recipe

RECIPES = __import__("pathlib").Path(__file__).resolve().parent.parent / "recipes"


def _recipe(**extra):
    base = {"weights.group_size": 32, "calibration.samples": 3, "calibration.seq_len": 32}
    return Recipe().with_overrides(**{**base, **extra})


def test_samples_are_drawn_once_and_shared(monkeypatch):
    draws = []
    real = pipeline.calibration_samples
    monkeypatch.setattr(
        pipeline, "calibration_samples", lambda *a, **k: draws.append(a[2:4]) or real(*a, **k)
    )
    run = calibrate_for(
        tiny_llama(), CharTokenizer(), _recipe(**{"weights.algorithm": "gptq"}), progress=False
    )
    assert draws == [(3, 32)]  # one draw feeds both the report and GPTQ
    assert run.report is not None and run.report.samples == 3
    assert torch.equal(run.input_ids, real(CharTokenizer(), None, 3, 32).input_ids)


def test_nothing_is_drawn_when_no_step_needs_it(monkeypatch):
    monkeypatch.setattr(pipeline, "calibration_samples", lambda *a, **k: pytest.fail("drew samples"))
    # no outlier columns, and the range search in every linear: neither a report nor samples
    recipe = _recipe(**{"weights.outliers": None, "weights.clip_search_judge": "everywhere"})
    run = calibrate_for(tiny_llama(), CharTokenizer(), recipe, progress=False)
    assert run.samples is None and run.report is None


def test_a_given_report_is_reused_and_checked(monkeypatch):
    model = tiny_llama()
    report = calibrate_for(model, CharTokenizer(), _recipe(), progress=False).report
    monkeypatch.setattr(pipeline, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    assert calibrate_for(model, CharTokenizer(), _recipe(), report, progress=False).report is report
    with pytest.raises(Exception, match="layers"):
        calibrate_for(tiny_llama(layers=3), CharTokenizer(), _recipe(), report, progress=False)


def test_kv_request_precedence(tmp_path):
    assert KVRequest().config() is None  # nothing asked: the checkpoint's own cache, if any
    assert KVRequest(RECIPES / "w4-g128.yaml").config() is None  # a recipe without a KV cache
    from_recipe = KVRequest(RECIPES / "kv2-sinks.yaml").config()
    assert isinstance(from_recipe, KVCacheConfig) and from_recipe.bits == 2
    flagged = KVRequest(RECIPES / "kv2-sinks.yaml", {"bits": 8, "residual": None}).config()
    assert flagged.bits == 8 and flagged.residual == from_recipe.residual
    assert KVRequest(overrides={"sinks": "none"}).config().bits == 4  # flags alone: the default int4 cache


def test_quantize_keeps_the_source_dtype_for_full_precision_columns(tmp_path, stories_path):
    model = tiny_llama(vocab=512).to(torch.bfloat16)
    source = save_tiny(model, tmp_path / "model", stories_path)
    result = quantize_model(source, tmp_path / "out", _recipe(**{"calibration.seq_len": 64}), progress=False)
    spec = next(iter(result.summary.layers.values()))
    assert spec["dtype"] == "bfloat16" and spec["outliers"] > 0


def test_foreign_quant_methods_are_named_and_float_configs_pass():
    """What counts as quantized by another tool: a named quant_method, legacy bitsandbytes flags, a
    compressed-tensors config with quantization groups; a sparsity-only compressed-tensors config and
    no config at all hold float weights."""
    from transformers import BitsAndBytesConfig

    from sinkquant.preflight import foreign_quant_method

    assert foreign_quant_method(None) is None
    assert foreign_quant_method({"quant_method": "sinkquant"}) is None
    assert (
        foreign_quant_method({"quant_method": "gptq", "bits": 4}) == "quantization_config.quant_method: gptq"
    )
    assert foreign_quant_method({"load_in_4bit": True}) == "quantization_config: bitsandbytes"
    assert "names no quant_method" in foreign_quant_method({"bits": 4})
    sparse = {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-24-bitmask"}}
    assert foreign_quant_method(sparse) is None
    groups = {**sparse, "config_groups": {"group_0": {"targets": ["Linear"]}}}
    assert foreign_quant_method(groups) == "quantization_config.quant_method: compressed-tensors"
    assert "bitsandbytes" in foreign_quant_method(BitsAndBytesConfig(load_in_4bit=True))


def test_a_hub_id_with_a_quantized_config_is_refused_before_its_weights(monkeypatch, tmp_path):
    """A hub id is checked through its config alone (AutoConfig), before any weight is fetched."""
    import transformers

    from sinkquant.errors import InputError
    from sinkquant.preflight import refuse_quantized_source

    class Config:
        quantization_config = {"quant_method": "mxfp4"}

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: Config())
    with pytest.raises(InputError, match="already quantized .quantization_config.quant_method: mxfp4"):
        refuse_quantized_source("openai/some-mxfp4-model")
