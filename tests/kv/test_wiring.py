"""The KV cache wired through recipes, checkpoints, generate and the eval CLI."""

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import save_tiny, tiny_llama

from sinkquant.checkpoint import load
from sinkquant.cli import main
from sinkquant.kv import SinkQuantizedCache
from sinkquant.pipeline import quantize_model
from sinkquant.recipe import Recipe


@pytest.fixture(scope="module")
def kv_checkpoint(tmp_path_factory, stories_path):
    model_dir = save_tiny(tiny_llama(vocab=512), tmp_path_factory.mktemp("m") / "model", stories_path)
    recipe = Recipe().with_overrides(
        **{
            "weights.group_size": 32,
            "calibration.samples": 2,
            "calibration.seq_len": 64,
            "kv_cache.bits": 8,
            "kv_cache.sinks": [0],
            "kv_cache.residual": 16,
            "kv_cache.group_size": 16,
            "kv_cache.key_outlier_channels": 1,
        }
    )
    return quantize_model(model_dir, tmp_path_factory.mktemp("q") / "out", recipe, progress=False)


def test_kv_settings_and_key_channels_are_stored(kv_checkpoint):
    qc = json.loads((kv_checkpoint.out_dir / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache"]["bits"] == 8 and qc["kv_cache"]["sinks"] == [0]
    assert set(qc["key_outlier_idx"]) == {"0", "1"}  # one channel per KV head, per layer
    assert len(qc["key_outlier_idx"]["0"]) == 2 and len(qc["key_outlier_idx"]["0"][0]) == 1


def test_loaded_checkpoint_generates_with_the_sink_cache_by_default(kv_checkpoint):
    model = load(kv_checkpoint.out_dir)
    seen = []
    original = SinkQuantizedCache.update

    def spy(self, *args, **kwargs):
        seen.append(type(self).__name__)
        return original(self, *args, **kwargs)

    SinkQuantizedCache.update = spy
    try:
        ids = torch.randint(3, 500, (1, 40))
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        SinkQuantizedCache.update = original
    assert out.shape == (1, 48) and seen
    fp = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=None, use_cache=False)
    assert fp.shape == out.shape


def test_eval_cli_with_kv_flags_and_stream(stories_path, wikitext_path, tmp_path):
    runner = CliRunner()
    args = [
        "eval",
        str(stories_path),
        "--dataset",
        str(wikitext_path),
        "--seq-len",
        "128",
        "--max-tokens",
        "1024",
    ]
    plain = runner.invoke(main, args + ["--json", str(tmp_path / "a.json")])
    kv8 = runner.invoke(
        main,
        args
        + [
            "--kv-bits",
            "8",
            "--kv-sinks",
            "1",
            "--residual",
            "16",
            "--kv-group-size",
            "16",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert plain.exit_code == 0 and kv8.exit_code == 0, kv8.output
    a = json.loads((tmp_path / "a.json").read_text())["perplexity"]
    b = json.loads((tmp_path / "b.json").read_text())["perplexity"]
    assert abs(b / a - 1) < 0.01  # int8 KV with a sink is close to the full-precision cache
    stream = runner.invoke(
        main,
        args + ["--kv-bits", "4", "--kv-sinks", "1", "--residual", "16", "--kv-group-size", "16", "--stream"],
    )
    assert stream.exit_code == 2 and "--max-kv-tokens" in stream.output
    bad = runner.invoke(main, args + ["--kv-bits", "4", "--kv-sinks", "first"])
    assert bad.exit_code == 2 and "--kv-sinks" in bad.output


def test_key_channels_are_measured_on_the_first_samples_of_the_run(monkeypatch):
    import sinkquant.kv.wiring as wiring
    from sinkquant.kv import KVCacheConfig, calibrate_kv

    seen = []
    monkeypatch.setattr(
        wiring, "measure_key_outlier_idx", lambda m, ids, n, sinks: seen.append((ids, n, sinks)) or {}
    )
    ids = torch.arange(20 * 8).view(20, 8)
    config = KVCacheConfig(sinks=[0, 1], key_outlier_channels=2)
    calibrate_kv(tiny_llama(), config, ids, None)
    ((used, n, sinks),) = seen
    assert torch.equal(used, ids[: wiring.KEY_CHANNEL_SAMPLES]) and n == 2 and sinks == [0, 1]
