import json

from click.testing import CliRunner

from sinkquant import __version__
from sinkquant.cli import main


def test_help_and_version():
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_calibrate_writes_report_and_plots(stories_path, tmp_path):
    out = tmp_path / "calib.json"
    result = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(stories_path),
            "--samples",
            "2",
            "--seq-len",
            "128",
            "--out",
            str(out),
            "--plots",
            str(tmp_path / "p"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["sinks"]["positions"] == [] and data["massive"]["dims"] == []
    assert (tmp_path / "p" / "attention_position0.png").exists()


def test_eval_prints_perplexity_and_writes_json(stories_path, wikitext_path, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(stories_path),
            "--dataset",
            str(wikitext_path),
            "--seq-len",
            "128",
            "--max-tokens",
            "1024",
            "--reference",
            str(stories_path),
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["perplexity"] > 1 and data["kl"] < 1e-6 and data["top1_agreement"] == 1.0
    assert data["seq_len"] == 128 and data["tokens"] == data["windows"] * 127


def test_bad_input_is_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "missing-model")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output


def test_offline_hub_dataset_is_a_clear_error(stories_path):
    result = CliRunner().invoke(main, ["eval", str(stories_path), "--dataset", "wikitext2"])
    assert result.exit_code == 2 and "offline" in result.output


def test_no_outliers_flag_keeps_no_columns(stories_path, tmp_path):
    """--no-outliers turns the default 1% of dense columns off; the summary and recipe say so."""
    out = tmp_path / "q"
    args = ["quantize", str(stories_path), str(out), "--samples", "2", "--seq-len", "64"]
    result = CliRunner().invoke(main, [*args, "--group-size", "32", "--no-outliers"])
    assert result.exit_code == 0, result.output
    assert "outlier input columns kept at full precision: 0 of" in result.output
    # the range search's judgment, and per kind the share of groups it moved (none where min/max is kept)
    judged = next(x for x in result.output.splitlines() if x.startswith("int4 range search in"))
    moved = next(x for x in result.output.splitlines() if x.startswith("int4 groups whose range"))
    shares = dict(part.rsplit(" ", 1) for part in moved.split(": ", 1)[1].split(", "))
    assert set(shares) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    kept = judged.split(" but ", 1)[1].split(" (min/max there)")[0].split(", ") if " but " in judged else []
    assert all(shares[kind] == "0.0%" for kind in kept)
    assert any(share != "0.0%" for kind, share in shares.items() if kind not in kept) or len(kept) == 7
    from sinkquant.recipe import load_recipe

    saved = next(out.glob("*.yaml"))
    assert load_recipe(saved).weights.outliers is None


def test_quantize_says_what_stays_outside_linear_layers(stories_path, tmp_path):
    """A MoE model whose experts are fused 3-D tensors (gpt-oss) gets a line saying how much of it stays
    at source precision; a dense Llama does not."""
    from tiny_models import save_tiny, tiny_gpt_oss

    src = save_tiny(tiny_gpt_oss(), tmp_path / "oss", tokenizer_from=stories_path)
    args = ["--samples", "2", "--seq-len", "64", "--group-size", "32"]
    result = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "q"), *args])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("left at source precision"))
    assert "6 tensors outside linear layers" in line and "mlp.experts." in line  # 2 x (2 experts, router)
    result = CliRunner().invoke(main, ["quantize", str(stories_path), str(tmp_path / "q2"), *args])
    assert result.exit_code == 0, result.output
    assert "left at source precision" not in result.output


def test_quantize_multimodal_gemma3_quantizes_the_text_decoder_only(stories_path, tmp_path):
    """Gemma3ForConditionalGeneration (4B and up): the text decoder is quantized, the vision tower stays as
    stored, and the checkpoint loads as the multimodal model and still takes an image."""
    import torch
    from tiny_models import save_tiny, tiny_gemma3_multimodal
    from transformers import AutoModelForCausalLM

    from sinkquant.quantize.linear import SinkQuantLinear

    src = save_tiny(tiny_gemma3_multimodal(), tmp_path / "g3", tokenizer_from=stories_path)
    out = tmp_path / "q"
    args = ["--samples", "2", "--seq-len", "64", "--group-size", "32", "--algorithm", "gptq"]
    result = CliRunner().invoke(main, ["quantize", str(src), str(out), *args])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("quantized "))
    assert "quantized 28 linear modules" in line  # 4 layers x 7 (q, k, v, o, gate, up, down)
    assert "skipped: model.vision_tower.encoder.layers.* (24)" in line  # 4 blocks x 6, counted not listed
    source = AutoModelForCausalLM.from_pretrained(src)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "Gemma3ForConditionalGeneration"
    assert isinstance(loaded.model.language_model.layers[0].mlp.down_proj, SinkQuantLinear)
    stored = loaded.model.vision_tower.state_dict()
    for name, tensor in source.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, stored[name]), name
    ids = torch.tensor([[2, 509] + [511] * 4 + [510, 5, 6, 7]])  # boi, 4 image tokens, eoi, text
    logits = loaded(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert logits.shape == (1, 10, 512) and torch.isfinite(logits).all()


def test_module_names_text_counts_block_stacks_and_lists_the_rest():
    from sinkquant.cli.app import module_names_text

    names = [f"model.vision_tower.encoder.layers.{i}.mlp.fc{j}" for i in range(3) for j in (1, 2)]
    assert module_names_text([*names, "model.vision_tower.head.mlp.fc1", "lm_head"]) == (
        "model.vision_tower.encoder.layers.* (6), model.vision_tower.head.mlp.fc1, lm_head"
    )
    assert module_names_text(["lm_head"]) == "lm_head"
    assert module_names_text([]) == "none"
