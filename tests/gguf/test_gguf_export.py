"""GGUF export: llama.cpp's own reader and dequantizers (the `gguf` package) read back exactly the weights
the packers report, the metadata matches config.json and the tokenizer, and bad input fails cleanly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import save_tiny, tiny_gpt2, tiny_llama, tiny_qwen2

from sinkquant.cli import main
from sinkquant.errors import InputError

gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quant_shape_from_byte_shape  # noqa: E402

from sinkquant.gguf import export_gguf  # noqa: E402
from sinkquant.gguf.tokenizer import QWEN2_PATTERN  # noqa: E402
from sinkquant.gguf.types import GGUF_TYPES  # noqa: E402
from sinkquant.gguf.writer import open_model, packed_tensors, plan_tensors  # noqa: E402

TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. "
    'One day she saw 12 birds and 345 ants near the big tree. "Don\'t worry," said her mom, "we\'ll '
    "find them!\" They'd walked 7 miles.\nThe end.\n\n  Café naïve résumé — 東京 2024!\t"
)
SAMPLES = [
    "Hello world",
    "Lily's 3 cats don't run 1234 times.",
    "a\n\n b  c\t\td",
    "Café 東京 é!",
    "<|im_end|>x",
]


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    return {
        "smollm": lambda: pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        ),
        "qwen2": lambda: pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),  # fmt: skip
    }[pre]()


def _save_bpe_tokenizer(folder, pre: str, vocab: int = 400):
    """A byte-level BPE tokenizer trained here on TEXT, split as SmolLM2's or Qwen2's is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_models")
    llama = _save_bpe_tokenizer(save_tiny(tiny_llama(vocab=512), root / "llama"), "smollm")
    qwen2 = _save_bpe_tokenizer(save_tiny(tiny_qwen2(), root / "qwen2"), "qwen2")
    return {"llama": llama, "qwen2": qwen2}


def _reader(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _field(reader, key):
    return reader.fields[key].contents()


def _step(source: np.ndarray, type_name: str) -> np.ndarray:
    """The quantization step of each element's block (its rounding may move it by up to one)."""
    if type_name in ("F32", "F16", "BF16"):
        return np.abs(source) * {"F32": 0, "F16": 2.0**-11, "BF16": 2.0**-8}[type_name] + 1e-7
    blocks = np.abs(source.reshape(-1, 32)).max(axis=1, keepdims=True)
    step = blocks / {"Q8_0": 127, "Q4_0": 8}[type_name]
    # the scale is stored as fp16: its rounding adds up to 2^-11 of the step per code
    return np.broadcast_to(step * (1 + 16 * 2.0**-11), blocks.shape[:1] + (32,)).reshape(source.shape)


def _unpermute_reference(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order written out row by row: in each head, row 2i is HF row i, row 2i + 1 is
    HF row i + d/2. HF rotates the pair (i, i + d/2) by angle i; llama.cpp's llama graph rotates the
    adjacent pair (2i, 2i + 1) by angle i, so this order gives the same rotation, and q.k is unchanged
    as q and k rows move alike."""
    d = weight.shape[0] // heads
    out = np.empty_like(weight)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = weight[h * d + i]
            out[h * d + 2 * i + 1] = weight[h * d + d // 2 + i]
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "F16"])
def test_file_decodes_to_the_intended_weights(models, tmp_path, arch, type_name):
    from safetensors.numpy import load_file

    folder = models[arch]
    result = export_gguf(folder, tmp_path / "m.gguf", type_name, progress=False)
    reader, tensors = _reader(result.path)
    model = open_model(folder)
    plan = plan_tensors(model, GGUF_TYPES[type_name])
    assert [(t.name, t.type.name) for t in plan] == result.plan and len(tensors) == len(plan)
    hf = {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}
    config = json.loads((folder / "config.json").read_text())
    for planned, source, packed in packed_tensors(model, plan):
        stored = tensors[planned.name]
        assert stored.tensor_type == planned.type.ggml
        assert tuple(int(n) for n in reversed(stored.shape)) == planned.shape
        decoded = dequantize(stored.data, stored.tensor_type).reshape(planned.shape)
        assert np.array_equal(decoded, packed.intended), planned.name
        assert np.all(np.abs(packed.intended - source) <= _step(source, planned.type.name)), planned.name
        expected = hf[planned.hf_name]
        if arch == "llama" and planned.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads" if "attn_q" in planned.name else "num_key_value_heads"]
            expected = _unpermute_reference(expected, heads)
        assert np.array_equal(source, expected), planned.name
    kinds = dict(result.plan)
    assert all(kinds[n] == "F32" for n in kinds if n.endswith(("norm.weight", ".bias")))
    assert kinds["blk.0.ffn_up.weight"] == type_name
    assert kinds["token_embd.weight"] == ("F16" if type_name == "Q4_0" else type_name)
    # tied llama: llama.cpp reuses token_embd; qwen2's head is its own tensor
    assert ("output.weight" in kinds) == (arch == "qwen2")
    if arch == "qwen2":
        assert kinds["blk.0.attn_q.bias"] == "F32"
    assert result.file_bytes == result.path.stat().st_size
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    bits = 8 * sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices)
    assert result.bits_per_weight == pytest.approx(bits)


def test_packers_match_llamacpp_layout_and_error():
    """Against gguf's own reference quantizers: the same layout (a block of one value decodes alike) and no
    larger error on random rows."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 128)).astype(np.float32) * np.logspace(-3, 2, 16, dtype=np.float32)[:, None]
    x[0, :32] = 0
    for entry in GGUF_TYPES.values():  # the array add_tensor(..., raw_dtype=...) takes: bytes or floats
        data = entry.pack(x).data
        shape = data.shape if data.dtype != np.uint8 else quant_shape_from_byte_shape(data.shape, entry.ggml)
        assert tuple(shape) == x.shape and data.nbytes == entry.nbytes(x.shape), entry.name
    for name in ("Q8_0", "Q4_0"):
        entry = GGUF_TYPES[name]
        ours = entry.pack(x)
        assert np.array_equal(dequantize(ours.data, entry.ggml), ours.intended)
        reference = dequantize(gguf.quants.quantize(x, entry.ggml), entry.ggml)
        assert ((ours.intended - x) ** 2).sum() <= ((reference - x) ** 2).sum() * (1 + 1e-6)
        assert np.array_equal(ours.intended[0, :32], np.zeros(32, np.float32))


def test_stories_fallback_and_metadata(stories_path, tmp_path):
    result = export_gguf(stories_path, tmp_path / "s.gguf", "Q8_0", progress=False)
    kinds = dict(result.plan)
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # rows of 172 do not split into blocks of 32
    assert kinds["blk.0.ffn_up.weight"] == "Q8_0"
    reader, _ = _reader(result.path)
    config = json.loads((stories_path / "config.json").read_text())
    assert _field(reader, "llama.rope.dimension_count") == config["head_dim"]
    assert _field(reader, "llama.rope.freq_base") == config["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_architecture_metadata_matches_config(models, tmp_path, arch):
    folder = models[arch]
    config = json.loads((folder / "config.json").read_text())
    reader, _ = _reader(export_gguf(folder, tmp_path / "m.gguf", "Q8_0", progress=False).path)
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    expected = {
        "block_count": config["num_hidden_layers"], "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"], "context_length": config["max_position_embeddings"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"], "vocab_size": config["vocab_size"],
    }  # fmt: skip
    for key, value in expected.items():
        assert _field(reader, f"{arch}.{key}") == value, key
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])


@pytest.mark.parametrize(("arch", "pre"), [("llama", "smollm"), ("qwen2", "qwen2")])
def test_bpe_tokenizer_rebuilt_from_gguf_encodes_like_hf(models, tmp_path, arch, pre):
    from tokenizers import AddedToken, Tokenizer
    from tokenizers import models as tk_models
    from transformers import AutoTokenizer

    folder = models[arch]
    reader, _ = _reader(export_gguf(folder, tmp_path / "m.gguf", "Q4_0", progress=False).path)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == pre
    tokens, kinds = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == json.loads((folder / "config.json").read_text())["vocab_size"]
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, kinds, strict=True)) if k != gguf.TokenType.UNUSED}
    rebuilt = Tokenizer(tk_models.BPE(vocab=vocab, merges=merges))
    rebuilt.pre_tokenizer = _pre_tokenizer(pre)
    rebuilt.add_special_tokens(
        [AddedToken(t, special=True) for t, k in zip(tokens, kinds, strict=True) if k == 3]
    )
    hf = AutoTokenizer.from_pretrained(str(folder))
    for text in [*SAMPLES, TEXT]:
        assert rebuilt.encode(text).ids == hf(text, add_special_tokens=False)["input_ids"], text
    assert _field(reader, "tokenizer.ggml.eos_token_id") == hf.eos_token_id
    assert _field(reader, "tokenizer.ggml.bos_token_id") == hf.bos_token_id
    assert kinds[hf.eos_token_id] == gguf.TokenType.CONTROL


def test_sentencepiece_tokens_and_scores(stories_path, tmp_path):
    reader, _ = _reader(export_gguf(stories_path, tmp_path / "s.gguf", "F16", progress=False).path)
    tokenizer = json.loads((stories_path / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    tokens, kinds = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert tokens == [by_id[i] for i in range(len(by_id))]
    assert kinds[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert all(kinds[i] == gguf.TokenType.BYTE for i in range(3, 259))
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (
        1,
        2,
    )
    # llama.cpp merges the pair whose result scores highest: the order HF's merges list keeps
    ranks = {a + b: k for k, (a, b) in enumerate(m.split(" ") if isinstance(m, str) else m
                                                  for m in tokenizer["model"]["merges"])}  # fmt: skip
    merged = sorted((ranks[t], scores[i]) for i, t in enumerate(tokens) if t in ranks)
    assert len(merged) > 100 and all(a[1] > b[1] for a, b in zip(merged, merged[1:], strict=False))


def _mamba(folder, tmp_path):
    target = tmp_path / "mamba"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"model_type": "mamba"}))
    return target


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("type", "unknown GGUF type 'Q5_K': use one of F32, F16, BF16, Q8_0, Q4_0"),
        ("gpt2", "model_type 'gpt2': supported are llama, qwen2"),
        ("mamba", "model_type 'mamba': supported are llama, qwen2"),
        ("missing", "does not exist"),
        ("suffix", "must end in .gguf"),
        ("no-config", "has no config.json"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_file(models, tmp_path, case, match):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model, out, type_name = models["llama"], out_dir / "m.gguf", "Q8_0"
    if case == "type":
        type_name = "Q5_K"
    elif case == "gpt2":
        model = save_tiny(tiny_gpt2(), tmp_path / "gpt2")
    elif case == "mamba":
        model = _mamba(models["llama"], tmp_path)
    elif case == "missing":
        model = tmp_path / "nowhere"
    elif case == "suffix":
        out = out_dir / "m.bin"
    else:
        model = tmp_path / "empty"
        model.mkdir()
    with pytest.raises(InputError, match=match) as info:
        export_gguf(model, out, type_name, progress=False)
    assert "\n" not in str(info.value)
    assert list(out_dir.iterdir()) == []


def test_failure_midway_leaves_no_file(models, tmp_path, monkeypatch):
    import sinkquant.gguf.writer as writer

    real = writer.packed_tensors

    def failing(model, plan):
        for i, item in enumerate(real(model, plan)):
            if i == 3:
                raise RuntimeError("disk full")
            yield item

    monkeypatch.setattr(writer, "packed_tensors", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(models["qwen2"], tmp_path / "m.gguf", "Q4_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(InputError, match="exists"):
        export_gguf(models["llama"], out, "F16", progress=False)
    assert out.read_bytes() == b"old"
    export_gguf(models["llama"], out, "F16", progress=False, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_writes_gguf_and_reports(models, tmp_path):
    out = tmp_path / "m.gguf"
    args = ["export", str(models["qwen2"]), str(out), "--format", "gguf", "--type", "Q4_0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "GGUF Q4_0" in result.output and "bits per weight" in result.output
    assert "Q4_0" in result.output.splitlines()[2]  # the most common type heads the table
    bad = CliRunner().invoke(main, [*args[:-1], "Q5_K"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "unknown GGUF type" in bad.stderr
    mixed = CliRunner().invoke(main, [*args, "--smooth"])
    assert mixed.exit_code == 2 and "--smooth applies to --format compressed-tensors only" in mixed.stderr
    assert len(mixed.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
