import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import save_tiny, tiny_llama
from transformers import AutoModelForCausalLM

import sinkquant  # noqa: F401  (registers the "sinkquant" quantizer with transformers)
from sinkquant.checkpoint import FORMAT_VERSION, MANIFEST, SinkQuantConfig, load, save
from sinkquant.cli import main
from sinkquant.errors import InputError, SinkQuantError
from sinkquant.pipeline import quantize_model
from sinkquant.recipe import Recipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, stories_path):
    return save_tiny(tiny_llama(vocab=512), tmp_path_factory.mktemp("tiny") / "model", stories_path)


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "out"
    recipe = Recipe().with_overrides(
        **{"weights.group_size": 32, "calibration.samples": 2, "calibration.seq_len": 64}
    )
    result = quantize_model(tiny_dir, out, recipe, progress=False)
    return result


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_checkpoint_layout_is_safetensors_only(quantized):
    out = quantized.out_dir
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "recipe.yaml",
        "calibration.json",
        MANIFEST,
        "tokenizer.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # no symmetric int4 layer: the oldest format that holds it, readable by a sinkquant that reads format 2
    assert (
        qc["quant_method"] == "sinkquant" and qc["format_version"] == 2 < FORMAT_VERSION and qc["bits"] == 4
    )
    assert json.loads((out / MANIFEST).read_text())["format_version"] == 2
    assert qc["layers"]["model.layers.0.mlp.down_proj"]["outliers"] >= 1


def test_files_follow_the_umask(tiny_dir, tmp_path):
    """Every file gets what the umask allows (as save_pretrained gives), so a serving process running as
    another user can read the checkpoint."""
    import os
    import stat

    recipe = Recipe().with_overrides(**{"weights.group_size": 32, "weights.outliers": None})
    before = os.umask(0o022)
    try:
        out = quantize_model(tiny_dir, tmp_path / "out", recipe, progress=False).out_dir
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_format_1_checkpoints_still_read():
    old = {
        "quant_method": "sinkquant",
        "format_version": 1,
        "kv_cache": {"bits": 4},
        "kv_key_channels": {"0": [[1]]},
    }
    assert SinkQuantConfig.from_dict(old).key_outlier_idx == {"0": [[1]]}


def test_config_round_trips():
    spec = {"in_features": 64, "out_features": 32, "bits": 4, "group_size": 32, "outliers": 1, "bias": False}
    cfg = SinkQuantConfig(layers={"a": spec}, bits=4, group_size=128, kv_cache={"bits": 4})
    assert SinkQuantConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_reload_both_ways_gives_the_same_logits(quantized, tiny_dir):
    from sinkquant.loading import load_model
    from sinkquant.quantize.weights import quantize_

    # the in-memory quantized model, rebuilt the same way (same report -> same checkpoint)
    model = load_model(tiny_dir)
    quantize_(
        model, Recipe().with_overrides(**{"weights.group_size": 32}).weights, quantized.report, progress=False,
        searched=_judged(quantized),
    )  # fmt: skip
    ids = torch.randint(0, 512, (2, 24))
    expected = _logits(model, ids)
    for reloaded in (load(quantized.out_dir), AutoModelForCausalLM.from_pretrained(quantized.out_dir)):
        assert float((_logits(reloaded, ids) - expected).abs().max()) <= 1e-4


def _judged(result):
    """Where the run's `rtn` put the int4 range search (its judgment, quantize/search_choice.py), so that
    `quantize_` in memory builds the same layers."""
    from sinkquant.quantize.search_choice import SearchChoice

    judged = result.summary.range_search
    return None if judged is None else SearchChoice(frozenset(judged["min_max_in"])).searched


def _quantized_and_reloaded(tiny_dir, out_dir, overrides: dict):
    """`quantize_model` with `overrides` at tiny sizes; the checkpoint must load through sinkquant and
    from_pretrained to the logits of the same recipe applied in memory."""
    from sinkquant.loading import load_model
    from sinkquant.quantize.weights import quantize_

    recipe = Recipe().with_overrides(
        **{"weights.group_size": 32, "calibration.samples": 2, "calibration.seq_len": 64, **overrides}
    )
    result = quantize_model(tiny_dir, out_dir, recipe, progress=False)
    model = load_model(tiny_dir)
    quantize_(model, recipe.weights, result.report, progress=False, searched=_judged(result))
    ids = torch.randint(0, 512, (2, 24))
    expected = _logits(model, ids)
    for reloaded in (load(result.out_dir), AutoModelForCausalLM.from_pretrained(result.out_dir)):
        assert float((_logits(reloaded, ids) - expected).abs().max()) <= 1e-4
    return result


def test_a_symmetric_checkpoint_stores_no_minima_and_reloads_both_ways(tiny_dir, tmp_path):
    """Symmetric int4 drops weight_min from the files (its minima are -8 * scale) and still loads
    through sinkquant and from_pretrained to the model that was quantized."""
    from safetensors import safe_open

    result = _quantized_and_reloaded(tiny_dir, tmp_path / "sym", {"weights.symmetric": True})
    with safe_open(str(result.out_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith(".weight_scale") for k in keys) and not any(k.endswith(".weight_min") for k in keys)
    qc = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert all(spec["symmetric"] for spec in qc["layers"].values())
    # format 3: a reader of format 2 would expect every weight_min, so it must refuse, not misread
    assert qc["format_version"] == 3 == json.loads((result.out_dir / MANIFEST).read_text())["format_version"]


def test_tampered_tensor_file_is_detected(quantized, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(quantized.out_dir, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the sha256"):
        load(copy)
    load(copy, verify=False)  # opt-out still loads (a flipped bit is not a shape error)


def test_missing_or_misshaped_tensors_are_clear_errors(quantized, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(quantized.out_dir, copy)
    state = load_file(str(copy / "model.safetensors"))
    state.pop("model.layers.0.mlp.down_proj.outlier_idx")
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="missing model.layers.0.mlp.down_proj.outlier_idx"):
        load(copy, verify=False)
    state["model.layers.0.mlp.down_proj.outlier_idx"] = torch.zeros(99, dtype=torch.int32)
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"has shape \(99,\)"):
        load(copy, verify=False)


def test_existing_output_is_refused_without_overwrite(quantized, tiny_dir):
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        save(load(quantized.out_dir), quantized.out_dir)


def test_failed_save_leaves_nothing_behind(tiny_dir, tmp_path, monkeypatch):
    from sinkquant.loading import load_model

    model = load_model(tiny_dir)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(SinkQuantError, match="the disk is full") as info:
        save(model, tmp_path / "out")
    assert isinstance(info.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


def test_cli_quantize_inspect_and_eval(tiny_dir, tmp_path, wikitext_path):
    out = tmp_path / "ckpt"
    runner = CliRunner()
    result = runner.invoke(
        main, ["quantize", str(tiny_dir), str(out), "--group-size", "32", "--samples", "2", "--seq-len", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "outlier input columns kept" in result.output and "checkpoint:" in result.output
    again = runner.invoke(main, ["quantize", str(tiny_dir), str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    info = runner.invoke(main, ["inspect", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["quantized_modules"] == 14
    ev = runner.invoke(
        main, ["eval", str(out), "--dataset", str(wikitext_path), "--seq-len", "64", "--max-tokens", "512"]
    )
    assert ev.exit_code == 0 and "perplexity" in ev.output


def test_cli_conflicting_overrides_are_refused(tiny_dir, tmp_path):
    result = CliRunner().invoke(
        main, ["quantize", str(tiny_dir), str(tmp_path / "o"), "--wbits", "8", "--group-size", "64"]
    )
    assert result.exit_code == 2 and "per output channel" in result.output


def test_a_log_scale_checkpoint_stores_one_byte_per_scale_and_reloads_both_ways(
    tiny_dir, tmp_path, monkeypatch
):
    """`weights.log_scales` writes each int4 scale as a uint8 code under one int32 exponent per layer
    (format 4, which a reader of format 3 refuses) and loads through sinkquant and from_pretrained to the
    model that was quantized."""
    from safetensors import safe_open

    result = _quantized_and_reloaded(
        tiny_dir, tmp_path / "log", {"weights.symmetric": True, "weights.log_scales": True}
    )
    with safe_open(str(result.out_dir / "model.safetensors"), "pt") as f:
        dtypes = {k.rpartition(".")[2]: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["weight_scale_code"] == "U8" and dtypes["weight_scale_top"] == "I32"
    assert "weight_scale" not in dtypes and "weight_min" not in dtypes
    qc = json.loads((result.out_dir / "config.json").read_text())["quantization_config"]
    assert all(spec["log_scales"] for spec in qc["layers"].values())
    assert qc["format_version"] == 4 == json.loads((result.out_dir / MANIFEST).read_text())["format_version"]

    # a reader of format 3 (no log scales) refuses the checkpoint instead of misreading it
    import sinkquant.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 3)
    with pytest.raises(Exception, match="format 4, newer than this sinkquant reads"):
        load(result.out_dir)
