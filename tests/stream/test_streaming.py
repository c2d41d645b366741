"""End to end: a model streamed from disk gives the tensors and numbers the model in memory gives."""

import tempfile

import pytest
import torch
from safetensors.torch import load_file

from sinkquant.calibrate import calibrate
from sinkquant.calibrate.report import Calibration
from sinkquant.checkpoint import save
from sinkquant.data import calibration_samples
from sinkquant.evaluate import evaluate
from sinkquant.loading import open_model, prepare_model
from sinkquant.pipeline import evaluate_model, quantize_model
from sinkquant.quantize.algorithms import quantize_weights
from sinkquant.quantize.gptq import gptq_quantize_
from sinkquant.recipe import Recipe
from sinkquant.stream.host import Execution, StreamedModel
from tests.tiny_models import save_tiny, tiny_gemma3, tiny_qwen2

RTN = Recipe().with_overrides(
    **{"weights.group_size": 32, "calibration.samples": 3, "calibration.seq_len": 96}
)
GPTQ = RTN.with_overrides(**{"weights.algorithm": "gptq"})


def tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def same_tensors(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta
    )


@pytest.fixture(scope="module")
def sharded_stories(stories_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(str(stories_path)).save_pretrained(folder, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(str(stories_path)).save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


@pytest.mark.parametrize("recipe", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_a_sharded_model_quantizes_to_the_tensors_of_the_unsharded_one(
    recipe, stories_path, sharded_stories, tmp_path
):
    quantize_model(stories_path, tmp_path / "one", recipe, progress=False)
    quantize_model(sharded_stories, tmp_path / "many", recipe, progress=False)
    assert same_tensors(tmp_path / "one", tmp_path / "many")


@pytest.mark.parametrize("recipe", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_the_model_in_memory_gives_the_tensors_of_the_streamed_one(recipe, stories_path, tmp_path):
    streamed = quantize_model(stories_path, tmp_path / "streamed", recipe, progress=False)
    model, tokenizer = prepare_model(stories_path, "float32")
    c = recipe.calibration
    samples = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
    report = calibrate(model, tokenizer, data=samples, progress=False)
    assert report.linear.keys() == streamed.report.linear.keys()
    assert all(report.linear[k] == streamed.report.linear[k] for k in report.linear)
    quantize_weights(model, recipe.weights, Calibration(samples, report), progress=False)
    save(model, tmp_path / "memory", tokenizer)
    assert same_tensors(tmp_path / "streamed", tmp_path / "memory")


def test_hidden_states_spilled_to_disk_give_the_same_tensors_and_perplexity(
    stories_path, wikitext_path, tmp_path
):
    spill = Execution(memory_budget=0)
    a = quantize_model(stories_path, tmp_path / "memory", RTN, progress=False, eval_dataset=wikitext_path,
                       eval_tokens=1024)  # fmt: skip
    b = quantize_model(stories_path, tmp_path / "disk", RTN, progress=False, eval_dataset=wikitext_path,
                       eval_tokens=1024, execution=spill)  # fmt: skip
    assert same_tensors(tmp_path / "memory", tmp_path / "disk")
    assert a.perplexity == b.perplexity


def test_streamed_evaluation_equals_the_model_in_memory(stories_path, wikitext_path):
    streamed = evaluate_model(stories_path, wikitext_path, seq_len=128, max_tokens=1024, reference=stories_path,
                              progress=False)  # fmt: skip
    model, tokenizer = prepare_model(stories_path, "float32")
    whole = evaluate(model, tokenizer, wikitext_path, 128, 1024, reference=model, progress=False)
    assert streamed.perplexity == whole.perplexity and streamed.kl == whole.kl == 0.0


def test_a_failed_run_leaves_no_checkpoint_and_no_spill_file(stories_path, tmp_path, monkeypatch):
    from sinkquant.quantize.linear import SinkQuantLinear

    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    calls = {"n": 0}
    real = SinkQuantLinear.from_float.__func__

    def failing(cls, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second decoder layer
            raise KeyboardInterrupt
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(SinkQuantLinear, "from_float", classmethod(failing))
    with pytest.raises(KeyboardInterrupt):
        quantize_model(stories_path, tmp_path / "out" / "ckpt", GPTQ, progress=False,
                       execution=Execution(memory_budget=0))  # fmt: skip
    assert calls["n"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not list(spill_root.iterdir())


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_gemma3], ids=["qwen2", "gemma3"])
def test_other_architectures_stream_to_the_tensors_in_memory(make, stories_path, tmp_path):
    model = make()
    folder = save_tiny(model, tmp_path / "src", tokenizer_from=stories_path)
    host, tokenizer = open_model(folder, "float32")
    assert isinstance(host, StreamedModel)
    recipe = RTN
    quantize_model(folder, tmp_path / "streamed", recipe, progress=False)
    c = recipe.calibration
    samples = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
    streamed_report = calibrate(host, tokenizer, data=samples, progress=False)
    report = calibrate(model, tokenizer, data=samples, progress=False)
    assert streamed_report.massive == report.massive and streamed_report.sinks == report.sinks
    quantize_weights(model, recipe.weights, Calibration(samples, report), progress=False)
    save(model, tmp_path / "memory", tokenizer)
    assert same_tensors(tmp_path / "streamed", tmp_path / "memory")


def test_a_sharded_checkpoint_loads_every_way_and_scores_the_same(stories_path, wikitext_path, tmp_path):
    from transformers import AutoModelForCausalLM

    import sinkquant
    from sinkquant.pipeline import inspect_checkpoint, quantization_config

    model, tokenizer = prepare_model(stories_path, "float32")
    c = RTN.calibration
    samples = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
    report = calibrate(model, tokenizer, data=samples, progress=False)
    summary = quantize_weights(model, RTN.weights, Calibration(samples, report), progress=False)
    model.config.quantization_config = quantization_config(RTN, summary, report, None)
    out = save(model, tmp_path / "ckpt", tokenizer, shard_bytes=100_000)
    assert (
        len(list(out.glob("model-*-of-*.safetensors"))) > 2
        and (out / "model.safetensors.index.json").is_file()
    )
    assert inspect_checkpoint(out)["quantized_modules"] == 35
    ids = torch.randint(0, 500, (1, 40))
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        for loaded in (sinkquant.load(out), AutoModelForCausalLM.from_pretrained(str(out))):
            assert torch.equal(loaded(input_ids=ids).logits, expect)
    streamed = evaluate_model(out, wikitext_path, seq_len=128, max_tokens=1024, progress=False)
    whole = evaluate(model, tokenizer, wikitext_path, 128, 1024, progress=False)
    assert streamed.perplexity == whole.perplexity


@pytest.mark.parametrize("make", [tiny_qwen2, tiny_gemma3], ids=["qwen2", "gemma3"])
def test_gptq_streams_and_spills_to_the_tensors_in_memory(make, stories_path, tmp_path):
    """GPTQ's hidden states spilled to disk with a zero memory budget (which also takes the two-pass
    route), streamed from the folder, give the tensors of the model in memory on the same route, on
    Qwen2 (biases) and Gemma 3 (sliding-window layers with their own masks)."""
    model = make()
    folder = save_tiny(model, tmp_path / "src", tokenizer_from=stories_path)
    recipe = GPTQ
    run = quantize_model(
        folder, tmp_path / "streamed", recipe, progress=False, execution=Execution(memory_budget=0)
    )
    tokenizer = open_model(folder, "float32")[1]
    c = recipe.calibration
    samples = calibration_samples(tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
    gptq_quantize_(model, recipe.weights, Calibration(samples, run.report), progress=False, one_pass=False)
    save(model, tmp_path / "memory", tokenizer)
    assert same_tensors(tmp_path / "streamed", tmp_path / "memory")
