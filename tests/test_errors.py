"""Every bad input the issue lists, driven through the real `sinkquant` CLI, one test id per case.

Each case asserts what a user sees: the exit code (2 bad input, 1 failure, 130 interrupt), exactly one
non-empty output line starting with `error:` (a successful run with a problem prints one `warning:`
line instead), no traceback, and that nothing was created or changed under the test folder: no
OUT_DIR, no temporary folder beside it, no parent folder made for it, a pre-existing OUT_DIR unchanged.

docs/errors.md shows every case with the message it prints; each case checks that its row there is
what the code prints today. After changing a message, rewrite the table from a run with
`SINKQUANT_WRITE_ERRORS_DOC=1 python -m pytest tests/test_errors.py`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sinkquant.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
WRITE_DOC = os.environ.get("SINKQUANT_WRITE_ERRORS_DOC") == "1"
Q = ["--samples", "2", "--seq-len", "64", "--group-size", "32"]  # fast calibration on stories260k


@dataclass
class Env:
    """What a case's setup works with: its own folder, the real model and text, the quantize output."""

    tmp: Path
    stories: Path
    wikitext: Path
    request: pytest.FixtureRequest

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def model(self, name: str = "model") -> Path:
        """A writable copy of stories260k."""
        folder = self.tmp / name
        shutil.copytree(self.stories, folder)
        for path in [folder, *folder.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        return folder

    def checkpoint(self) -> Path:
        """A writable copy of a sinkquant checkpoint of stories260k."""
        folder = self.tmp / "ckpt"
        shutil.copytree(self.request.getfixturevalue("checkpoint"), folder)
        return folder

    def quantize(self, model: Path | str, *extra: str) -> list[str]:
        return ["quantize", str(model), str(self.out), *Q, *extra]

    def evaluate(self, model: Path | str, *extra: str) -> list[str]:
        return [
            "eval",
            str(model),
            "--dataset",
            str(self.wikitext),
            "--seq-len",
            "64",
            "--max-tokens",
            "256",
            *extra,
        ]

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def recipe(self, text: str) -> list[str]:
        return self.quantize(self.stories, "--recipe", str(self.write("recipe.yaml", text)))


@dataclass(frozen=True)
class Case:
    id: str
    bad_input: str  # the table's description (with how a case is simulated, where it is)
    args: Callable[[Env], list[str]]
    exit: int = 2
    patch: Callable[[Env, pytest.MonkeyPatch], None] | None = None
    warning: bool = False  # a run that succeeds and prints one warning line


# -- helpers that build broken inputs --------------------------------------------------------------------


def _edit_config(env: Env, **changes) -> Path:
    folder = env.model()
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _with_config_text(text: str) -> Callable[[Env], list[str]]:
    def args(env: Env) -> list[str]:
        folder = env.model()
        (folder / "config.json").write_text(text)
        return env.quantize(folder)

    return args


def _truncated(env: Env) -> list[str]:
    folder = env.model()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return env.quantize(folder)


def _garbage_weights(env: Env) -> list[str]:
    folder = env.model()
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    return env.quantize(folder)


def _no_weights(env: Env) -> list[str]:
    folder = env.model()
    (folder / "model.safetensors").unlink()
    return env.quantize(folder)


def _tokenizer_code(env: Env) -> list[str]:
    folder = env.model()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return env.quantize(folder)


class _Payload:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _pickle_bin(zipped: bool) -> Callable[[Env], list[str]]:
    def args(env: Env) -> list[str]:
        folder = env.model()
        (folder / "model.safetensors").unlink()
        state = {"model.embed_tokens.weight": _Payload(env.tmp / "PWNED")}
        if zipped:
            torch.save(state, folder / "pytorch_model.bin")
        else:
            with open(folder / "pytorch_model.bin", "wb") as fh:
                pickle.dump(state, fh)
        return env.quantize(folder)

    return args


def _bad_value(value: float) -> Callable[[Env], list[str]]:
    def args(env: Env) -> list[str]:
        folder = env.model()
        state = load_file(str(folder / "model.safetensors"))
        state["model.layers.2.mlp.down_proj.weight"][3, 5] = value
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return env.quantize(folder)

    return args


def _dataset(name: str, content: str | bytes) -> Callable[[Env], list[str]]:
    def args(env: Env) -> list[str]:
        return env.quantize(env.stories, "--dataset", str(env.write(name, content)))

    return args


def _out_not_empty(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "notes.txt").write_text("weeks of work")
    return env.quantize(env.stories)


def _out_is_file(env: Env) -> list[str]:
    env.write("out", "not a folder")
    return env.quantize(env.stories)


def _out_parent_is_file(env: Env) -> list[str]:
    env.write("parent", "not a folder")
    return ["quantize", str(env.stories), str(env.tmp / "parent" / "out"), *Q]


def _refuse_writes(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, which chmod does not stop: simulate the write failure itself."""
    original = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == env.tmp.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


def _fail_mid_write(error: BaseException) -> Callable[[Env, pytest.MonkeyPatch], None]:
    """Write half of a safetensors shard, then fail the way a full disk or a Ctrl-C would."""

    def patch(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors.torch

        def save_file_then_fail(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 4096)
            raise error

        monkeypatch.setattr(safetensors.torch, "save_file", save_file_then_fail)

    return patch


def _disk_full_over_existing(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "model.safetensors").write_bytes(b"the previous checkpoint")
    return [*env.quantize(env.stories), "--overwrite"]


def _nested_out(env: Env) -> list[str]:
    return ["quantize", str(env.stories), str(env.tmp / "new" / "sub" / "out"), *Q]


def _tampered(env: Env) -> list[str]:
    folder = env.checkpoint()
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    return env.evaluate(folder)


def _checkpoint_edit(edit: Callable[[Path], None], *extra: str) -> Callable[[Env], list[str]]:
    def args(env: Env) -> list[str]:
        folder = env.checkpoint()
        edit(folder)
        return env.evaluate(folder, *extra)

    return args


def _newer_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))


def _newer_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "sinkquant-manifest.json").read_text())
    manifest["format_version"] = 99
    (folder / "sinkquant-manifest.json").write_text(json.dumps(manifest))


def _truncate_checkpoint(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])


def _drop_tensor(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.layers.0.mlp.down_proj.outlier_idx")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _calibration_report(text: str) -> Callable[[Env], list[str]]:
    def args(env: Env) -> list[str]:
        return env.quantize(env.stories, "--calibration", str(env.write("calib.json", text)))

    return args


CASES = [
    # -- the model ---------------------------------------------------------------------------------------
    Case("model-missing", "model folder does not exist", lambda e: e.quantize(e.tmp / "no-such-model")),
    Case("model-is-file", "model path is a file", lambda e: e.quantize(e.write("model.txt", "x"))),
    Case(
        "model-no-config", "model folder without config.json", lambda e: e.quantize(_mkdir(e.tmp / "empty"))
    ),
    Case("config-not-json", "config.json is not JSON", _with_config_text("{not json")),
    Case("config-no-model-type", "config.json without model_type", _with_config_text('{"hidden_size": 64}')),
    Case(
        "not-a-causal-lm",
        "model is not a causal LM (model_type resnet)",
        lambda e: e.quantize(_edit_config(e, model_type="resnet", architectures=["ResNetModel"])),
    ),
    Case("weights-missing", "model folder without weight files", _no_weights),
    Case("safetensors-truncated", "model.safetensors cut in half", _truncated),
    Case("safetensors-corrupt", "model.safetensors is 64 bytes of garbage", _garbage_weights),
    Case(
        "weights-do-not-match-config",
        "config.json asks for more layers than the weights hold (no silent random init)",
        lambda e: e.quantize(_edit_config(e, num_hidden_layers=6)),
    ),
    Case(
        "remote-code-config",
        "config.json has auto_map (custom code), no --trust-remote-code",
        lambda e: e.quantize(_edit_config(e, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})),
    ),
    Case(
        "remote-code-tokenizer", "tokenizer_config.json has auto_map, no --trust-remote-code", _tokenizer_code
    ),
    Case(
        "pickle-bin-payload",
        "only pytorch_model.bin, a raw pickle whose unpickling would create a file",
        _pickle_bin(zipped=False),
    ),
    Case(
        "torch-bin-payload",
        "only pytorch_model.bin, a torch.save archive whose unpickling would create a file",
        _pickle_bin(zipped=True),
    ),
    Case(
        "hub-model-offline",
        "hub model id while offline (HF_HUB_OFFLINE=1), not in the cache",
        lambda e: e.quantize("sinkquant-tests/no-such-model"),
    ),
    Case("nan-weights", "a NaN in one weight tensor", _bad_value(float("nan"))),
    Case("inf-weights", "an Inf in one weight tensor", _bad_value(float("inf"))),
    # -- the recipe --------------------------------------------------------------------------------------
    Case(
        "recipe-missing",
        "recipe file does not exist",
        lambda e: e.quantize(e.stories, "--recipe", str(e.tmp / "nope.yaml")),
    ),
    Case("recipe-not-yaml", "recipe is not valid YAML", lambda e: e.recipe("weights: [1, 2\n")),
    Case(
        "recipe-not-mapping",
        "recipe is a YAML list, not a mapping",
        lambda e: e.recipe("- weights\n- kv_cache\n"),
    ),
    Case(
        "recipe-not-text",
        "recipe file is binary, not UTF-8 text",
        lambda e: e.quantize(e.stories, "--recipe", str(e.write("recipe.yaml", b"\xff\xfe\x00bits"))),
    ),
    Case(
        "recipe-unknown-key",
        "misspelt key (line and nearest valid key)",
        lambda e: e.recipe("weights:\n  bits: 4\n  group_sise: 64\n"),
    ),
    Case(
        "recipe-unknown-section",
        "misspelt top-level section",
        lambda e: e.recipe("calibraton:\n  samples: 4\n"),
    ),
    Case(
        "recipe-wrong-type",
        "a number field given a word",
        lambda e: e.recipe("kv_cache:\n  residual: many\n"),
    ),
    Case("recipe-weight-bits", "weights.bits not in {4, 8}", lambda e: e.recipe("weights:\n  bits: 3\n")),
    Case("recipe-kv-bits", "kv_cache.bits not in {2, 4, 8}", lambda e: e.recipe("kv_cache:\n  bits: 3\n")),
    Case(
        "recipe-group-size-100",
        "weights.group_size not one of 32/64/128/256/channel",
        lambda e: e.recipe("weights:\n  group_size: 100\n"),
    ),
    Case(
        "recipe-group-size-negative",
        "weights.group_size negative",
        lambda e: e.recipe("weights:\n  group_size: -32\n"),
    ),
    Case(
        "recipe-group-size-wider-than-layer",
        "weights.group_size 128 on a model whose layers are 64 wide (found after calibration; nothing written)",
        lambda e: [
            "quantize",
            str(e.stories),
            str(e.out),
            "--samples",
            "2",
            "--seq-len",
            "64",
            "--recipe",
            str(e.write("recipe.yaml", "weights:\n  group_size: 128\n")),
        ],
    ),
    Case(
        "recipe-outlier-fraction-high",
        "outliers.fraction above 0.5",
        lambda e: e.recipe("weights:\n  outliers:\n    fraction: 0.9\n"),
    ),
    Case(
        "recipe-outlier-fraction-negative",
        "outliers.fraction below 0",
        lambda e: e.recipe("weights:\n  outliers:\n    fraction: -0.1\n"),
    ),
    Case(
        "recipe-outlier-fraction-zero",
        "outliers.fraction 0 (use outliers: null to keep none)",
        lambda e: e.recipe("weights:\n  outliers:\n    fraction: 0\n"),
    ),
    Case(
        "recipe-threshold-without-value",
        "outliers.select: threshold with no threshold",
        lambda e: e.recipe("weights:\n  outliers:\n    select: threshold\n"),
    ),
    Case(
        "recipe-rotation-without-gptq",
        "weights.rotation with round-to-nearest (it needs GPTQ's Hessian)",
        lambda e: e.recipe("weights:\n  rotation: 32\n"),
    ),
    Case(
        "recipe-rtn-ranges-with-rotation",
        "gptq.ranges: rtn with a rotation (the rtn ranges are those of the unrotated weights)",
        lambda e: e.recipe("weights:\n  algorithm: gptq\n  rotation: 32\n  gptq:\n    ranges: rtn\n"),
    ),
    Case(
        "recipe-rotation-block",
        "weights.rotation not a power of two up to 128",
        lambda e: e.recipe("weights:\n  algorithm: gptq\n  rotation: 48\n"),
    ),
    Case(
        "recipe-kv-group-not-whole-bytes",
        "kv_cache.group_size whose codes do not fill whole bytes (9 x 2 bits)",
        lambda e: e.recipe("kv_cache:\n  bits: 2\n  group_size: 9\n"),
    ),
    Case(
        "recipe-kv-max-tokens-too-small",
        "kv_cache.max_tokens smaller than sinks + group + residual",
        lambda e: e.recipe("kv_cache:\n  residual: 64\n  max_tokens: 100\n"),
    ),
    Case(
        "recipe-newer-version",
        "recipe from a newer sinkquant (version: 99)",
        lambda e: e.recipe("version: 99\n"),
    ),
    Case(
        "ignore-pattern-matches-nothing",
        "weights.ignore pattern that matches no module (a warning; the run goes on)",
        lambda e: e.recipe("weights:\n  group_size: 32\n  ignore: [lm_head, lm_haed]\n"),
        exit=0,
        warning=True,
    ),
    # -- command-line options ----------------------------------------------------------------------------
    Case(
        "flag-wbits-8-with-group-size",
        "--wbits 8 with --group-size (int8 is per channel)",
        lambda e: e.quantize(e.stories, "--wbits", "8"),
    ),
    Case(
        "flag-group-size-with-w8-recipe",
        "--group-size with a recipe whose weights.bits is 8",
        lambda e: e.quantize(
            e.stories, "--recipe", str(Path(__file__).resolve().parent.parent / "recipes" / "w8.yaml")
        ),
    ),
    Case(
        "flag-group-size-word",
        "--group-size that is not a number",
        lambda e: ["quantize", str(e.stories), str(e.out), "--group-size", "abc"],
    ),
    Case(
        "flag-group-size-zero",
        "--group-size 0",
        lambda e: ["quantize", str(e.stories), str(e.out), "--group-size", "0"],
    ),
    Case(
        "flag-outlier-fraction",
        "--outlier-fraction 0.9",
        lambda e: e.quantize(e.stories, "--outlier-fraction", "0.9"),
    ),
    Case(
        "flag-no-outliers-conflict",
        "--no-outliers with --outlier-fraction",
        lambda e: e.quantize(e.stories, "--no-outliers", "--outlier-fraction", "0.02"),
    ),
    Case("flag-samples-zero", "--samples 0", lambda e: e.quantize(e.stories, "--samples", "0")),
    Case("flag-unknown", "an option that does not exist", lambda e: e.quantize(e.stories, "--bits", "4")),
    Case(
        "flag-stream-without-max-tokens",
        "eval --stream without --max-kv-tokens",
        lambda e: e.evaluate(e.stories, "--stream"),
    ),
    Case(
        "flag-kv-sinks-word",
        "eval --kv-sinks that is not auto/none/N",
        lambda e: e.evaluate(e.stories, "--kv-sinks", "first"),
    ),
    # -- text data ---------------------------------------------------------------------------------------
    Case(
        "dataset-missing",
        "calibration dataset file does not exist",
        lambda e: e.quantize(e.stories, "--dataset", str(e.tmp / "nope.txt")),
    ),
    Case(
        "dataset-folder",
        "calibration dataset is a folder",
        lambda e: e.quantize(e.stories, "--dataset", str(_mkdir(e.tmp / "texts"))),
    ),
    Case("dataset-empty", "calibration dataset is an empty file", _dataset("empty.txt", "")),
    Case(
        "dataset-too-short-calibration",
        "text too short for the calibration samples",
        _dataset("short.txt", "once upon a time"),
    ),
    Case(
        "dataset-too-short-eval",
        "text too short for one evaluation window",
        lambda e: [
            "eval",
            str(e.stories),
            "--dataset",
            str(e.write("short.txt", "once upon a time")),
            "--seq-len",
            "64",
        ],
    ),
    Case(
        "dataset-unknown-format",
        "dataset with an unknown extension (.csv)",
        _dataset("data.csv", "a,b\n1,2\n"),
    ),
    Case(
        "dataset-bad-jsonl", ".jsonl whose lines are not JSON", _dataset("data.jsonl", "this is not json\n")
    ),
    Case("dataset-no-text-field", ".jsonl without a text field", _dataset("data.jsonl", '{"body": "x"}\n')),
    Case(
        "dataset-hub-offline",
        "hub dataset name while offline",
        lambda e: e.quantize(e.stories, "--dataset", "c4"),
    ),
    Case(
        "calibration-report-missing",
        "--calibration report does not exist",
        lambda e: e.quantize(e.stories, "--calibration", str(e.tmp / "calib.json")),
    ),
    Case("calibration-report-not-json", "--calibration report is not JSON", _calibration_report("{oops")),
    # -- the output folder -------------------------------------------------------------------------------
    Case("out-not-empty", "OUT_DIR exists and is not empty, no --overwrite (left unchanged)", _out_not_empty),
    Case("out-is-file", "OUT_DIR is a file", _out_is_file),
    Case("out-parent-is-file", "OUT_DIR's parent is a file", _out_parent_is_file),
    Case(
        "out-not-writable",
        "OUT_DIR's parent not writable (simulated: creating a folder there raises EACCES, as root ignores chmod)",
        lambda e: e.quantize(e.stories),
        patch=_refuse_writes,
    ),
    Case(
        "disk-full-during-save",
        "disk full while writing model.safetensors (simulated: the write raises ENOSPC half-way)",
        _nested_out,
        exit=1,
        patch=_fail_mid_write(OSError(errno.ENOSPC, "No space left on device")),
    ),
    Case(
        "disk-full-replacing-checkpoint",
        "disk full while replacing an existing OUT_DIR with --overwrite (old OUT_DIR kept)",
        _disk_full_over_existing,
        exit=1,
        patch=_fail_mid_write(OSError(errno.ENOSPC, "No space left on device")),
    ),
    Case(
        "interrupt-during-save",
        "Ctrl-C while writing model.safetensors (simulated: KeyboardInterrupt half-way)",
        lambda e: e.quantize(e.stories),
        exit=130,
        patch=_fail_mid_write(KeyboardInterrupt()),
    ),
    # -- checkpoints -------------------------------------------------------------------------------------
    Case(
        "checkpoint-tampered", "checkpoint whose model.safetensors changed after saving (sha256)", _tampered
    ),
    Case(
        "checkpoint-no-manifest",
        "checkpoint without sinkquant-manifest.json",
        _checkpoint_edit(lambda f: (f / "sinkquant-manifest.json").unlink()),
    ),
    Case(
        "checkpoint-extra-file",
        "checkpoint with a safetensors file that is not in the manifest",
        _checkpoint_edit(lambda f: shutil.copy(f / "model.safetensors", f / "extra.safetensors")),
    ),
    Case(
        "checkpoint-newer-format",
        "checkpoint from a newer sinkquant (config format_version 99)",
        _checkpoint_edit(_newer_config),
    ),
    Case(
        "checkpoint-newer-manifest",
        "checkpoint from a newer sinkquant (manifest format_version 99)",
        _checkpoint_edit(_newer_manifest),
    ),
    Case(
        "checkpoint-truncated-unverified",
        "truncated checkpoint loaded with --no-verify",
        _checkpoint_edit(_truncate_checkpoint, "--no-verify"),
    ),
    Case(
        "checkpoint-missing-tensor-unverified",
        "checkpoint missing a tensor, loaded with --no-verify",
        _checkpoint_edit(_drop_tensor, "--no-verify"),
    ),
    Case("inspect-not-checkpoint", "inspect on a plain model folder", lambda e: ["inspect", str(e.stories)]),
]


# -- helpers for the cases found by trying sinkquant as a new user ---------------------------------------


def _no_tokenizer(env: Env) -> list[str]:
    folder = env.model()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    return env.quantize(folder)


def _all_sliding(env: Env) -> list[str]:
    config = json.loads((env.stories / "config.json").read_text())
    layers = config["num_hidden_layers"]
    folder = _edit_config(env, layer_types=["sliding_attention"] * layers, sliding_window=32)
    return env.quantize(folder, "--kv-bits", "4")


def _hold_out_dir_lock(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run holding OUT_DIR, as `sinkquant quantize` does while it works."""
    import contextlib

    from sinkquant.checkpoint import out_dir_lock

    stack = contextlib.ExitStack()
    stack.enter_context(out_dir_lock(env.out))
    env.request.addfinalizer(stack.close)


def _hub_unreachable(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)


def _other_vocab_reference(env: Env) -> list[str]:
    folder = env.model("reference")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = config["vocab_size"] * 2
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file as save

    state = load(str(folder / "model.safetensors"))
    for key in [k for k in state if k.endswith(("embed_tokens.weight", "lm_head.weight"))]:
        state[key] = torch.cat([state[key], state[key]])
    save(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return env.evaluate(env.checkpoint(), "--reference", str(folder))


NEW_CASES = [
    Case(
        "checkpoint-as-source",
        "quantize a sinkquant checkpoint (its layers are quantized already)",
        lambda e: e.quantize(e.checkpoint()),
    ),
    Case(
        "foreign-quantized-source",
        "quantize a model another tool quantized (its config names a quant_method: GPTQ, AWQ, gpt-oss's MXFP4)",
        lambda e: e.quantize(_edit_config(e, quantization_config={"quant_method": "mxfp4"})),
    ),
    Case(
        "recipe-ignores-everything",
        "recipe whose weights.ignore covers every linear layer",
        lambda e: e.recipe('weights:\n  group_size: 32\n  ignore: ["re:.*"]\n'),
    ),
    Case(
        "out-dir-busy",
        "two quantize runs writing the same OUT_DIR at once (the first one simulated by holding its lock)",
        lambda e: e.quantize(e.stories),
        patch=_hold_out_dir_lock,
    ),
    Case(
        "out-is-model-folder",
        "OUT_DIR is the model folder itself, with --overwrite",
        lambda e: ["quantize", str(m := e.model()), str(m), *Q, "--overwrite"],
    ),
    Case(
        "out-holds-model-folder",
        "OUT_DIR is a folder holding the model folder, with --overwrite",
        lambda e: ["quantize", str(e.model()), str(e.tmp), *Q, "--overwrite"],
    ),
    Case(
        "encoder-only-config",
        "model folder of an encoder-only model (model_type bert)",
        lambda e: e.quantize(_edit_config(e, model_type="bert", architectures=["BertModel"])),
    ),
    Case("tokenizer-missing", "model folder with config and weights but no tokenizer files", _no_tokenizer),
    Case("kv-all-sliding-window", "--kv-bits 4 on a model whose layers are all sliding-window", _all_sliding),
    Case(
        "flag-seed-not-int",
        "calibrate --seed that is not an integer",
        lambda e: ["calibrate", str(e.stories), "--samples", "2", "--seq-len", "64", "--seed", "abc"],
    ),
    Case(
        "recipe-seed-not-int",
        "recipe calibration.seed that is not an integer",
        lambda e: e.recipe("calibration:\n  seed: first\n"),
    ),
    Case(
        "recipe-int8-with-group",
        "recipe with weights.bits 8 and a group size (int8 is per output channel)",
        lambda e: e.recipe("weights:\n  bits: 8\n  group_size: 64\n"),
    ),
    Case(
        "recipe-is-folder",
        "--recipe names a folder",
        lambda e: e.quantize(e.stories, "--recipe", str(_mkdir(e.tmp / "recipes"))),
    ),
    Case(
        "dataset-hub-unreachable",
        "hub dataset name, hub not set offline but unreachable (connection refused, simulated)",
        lambda e: e.quantize(e.stories, "--dataset", "c4"),
        exit=1,
        patch=_hub_unreachable,
    ),
    Case(
        "eval-reference-other-vocab",
        "eval --reference whose vocabulary differs from the model's",
        _other_vocab_reference,
    ),
    Case(
        "calibration-report-other-model",
        "--calibration report made for a model with other layers",
        lambda e: e.quantize(e.stories, "--calibration", str(_report_for_layers(e, 7))),
    ),
]
CASES.extend(NEW_CASES)


def _report_for_layers(env: Env, layers: int) -> Path:
    from sinkquant.calibrate import calibrate
    from sinkquant.loading import prepare_model

    model, tok = prepare_model(env.stories, "float32")
    report = calibrate(model, tok, env.wikitext, samples=1, seq_len=32, progress=False)
    report.num_layers = layers
    return report.save(env.tmp / "calib.json")


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


# -- running and checking --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, stories_path) -> Path:
    from sinkquant.pipeline import quantize_model
    from sinkquant.recipe import Recipe

    recipe = Recipe().with_overrides(
        **{"weights.group_size": 32, "calibration.samples": 2, "calibration.seq_len": 64}
    )
    return quantize_model(
        stories_path, tmp_path_factory.mktemp("ckpt") / "ckpt", recipe, progress=False
    ).out_dir


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def _normalise(text: str, env: Env) -> str:
    for path, name in ((env.tmp, "$TMP"), (env.stories, "$STORIES"), (env.wikitext, "$WIKITEXT")):
        text = text.replace(str(path), name)
    return text.replace(str(Path(__file__).resolve().parent.parent) + os.sep, "")


def _row(number: int, case: Case, command: str, message: str) -> str:
    def cell(text: str) -> str:
        text = text.replace("|", "\\|")
        return f"`` {text} ``" if "`" in text else f"`{text}`"

    return (
        f"| {number} | {case.bad_input.replace('|', chr(92) + '|')} | {cell(command)} | {case.exit} "
        f"| {cell(message)} | `test_errors.py::test_bad_input[{case.id}]` |"
    )


_ROWS: dict[int, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_doc():
    yield
    if WRITE_DOC and len(_ROWS) == len(CASES):
        head = DOC.read_text().split("\n| # |")[0].rstrip("\n")
        table = [
            "| # | bad input | command | exit | message (as printed) | test |",
            "|---:|---|---|---:|---|---|",
            *(_ROWS[i] for i in sorted(_ROWS)),
        ]
        DOC.write_text(head + "\n\n" + "\n".join(table) + "\n")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, stories_path, wikitext_path, request, monkeypatch):
    env = Env(tmp_path, stories_path, wikitext_path, request)
    args = case.args(env)
    if case.patch is not None:
        case.patch(env, monkeypatch)
    before = _tree(tmp_path)

    result = CliRunner().invoke(main, args, prog_name="sinkquant")

    assert result.exit_code == case.exit, result.output
    assert "Traceback" not in result.output
    if case.warning:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
        assert (env.out / "model.safetensors").is_file()
    else:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert _tree(tmp_path) == before, "the failed run created, removed or changed files"
    assert not (tmp_path / "PWNED").exists(), "pickled code ran"

    command = _normalise(shlex.join(["sinkquant", *args]), env)
    row = _row(CASES.index(case) + 1, case, command, _normalise(lines[0], env))
    if WRITE_DOC:
        _ROWS[CASES.index(case) + 1] = row
    else:
        assert row in DOC.read_text().splitlines(), (
            f"docs/errors.md does not show what case {case.id} prints now:\n{row}\n"
            "rewrite it with SINKQUANT_WRITE_ERRORS_DOC=1 python -m pytest tests/test_errors.py"
        )


# -- what the cases above do not show ---------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "quantize", str(tmp_path / "missing"), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "Traceback" in result.output and "error: model folder" in result.output


def test_bin_weights_load_through_weights_only(tmp_path, stories_path):
    """A plain `.bin` of tensors is accepted: torch.load(weights_only=True) reads tensors and nothing else."""
    env = Env(tmp_path, stories_path, stories_path, None)
    folder = env.model()
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    result = CliRunner().invoke(main, env.quantize(folder))
    assert result.exit_code == 0, result.output
    assert (env.out / "model.safetensors").is_file()


def test_an_empty_out_dir_is_used_without_overwrite(tmp_path, stories_path):
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["quantize", str(stories_path), str(out), *Q])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it


def test_no_verify_loads_a_changed_checkpoint(tmp_path, stories_path, wikitext_path, request):
    env = Env(tmp_path, stories_path, wikitext_path, request)
    args = _tampered(env)
    assert CliRunner().invoke(main, args).exit_code == 2
    result = CliRunner().invoke(main, [*args, "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output


def test_group_size_is_never_changed_silently(tmp_path, stories_path):
    """A group size that does not divide a layer's width keeps its size (a shorter last group, by
    design); the checkpoint records the size asked for, for every layer."""
    from tiny_models import save_tiny, tiny_llama

    model_dir = save_tiny(tiny_llama(hidden=96, vocab=512), tmp_path / "tiny", stories_path)  # widths 96, 224
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["quantize", str(model_dir), str(out), "--samples", "2", "--seq-len", "64", "--group-size", "64"],
    )
    assert result.exit_code == 0, result.output
    assert "int4 g64" in result.output
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert layers and {spec["group_size"] for spec in layers.values()} == {64}
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        # down_proj: 224 input columns minus its outlier columns -> 4 groups, the last one shorter
        spec = layers["model.layers.0.mlp.down_proj"]
        groups = fh.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_shape()[1]
    assert groups == -(-(spec["in_features"] - spec["outliers"]) // 64)
    assert (spec["in_features"] - spec["outliers"]) % 64 != 0


def test_same_inputs_give_byte_identical_checkpoints(tmp_path, stories_path, c4_path):
    """Same model, recipe, data and seed: the same bytes for every tensor (and the same file)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = CliRunner().invoke(
            main, ["quantize", str(stories_path), str(out), *Q, "--dataset", str(c4_path), "--kv-bits", "4"]
        )
        assert result.exit_code == 0, result.output
    tensors = []
    for out in outs:
        with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
            tensors.append({k: fh.get_tensor(k).contiguous().view(-1).view(torch.uint8) for k in fh.keys()})
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) > 0
    for key, data in tensors[0].items():
        assert torch.equal(data, tensors[1][key]), key
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    manifests = [json.loads((out / "sinkquant-manifest.json").read_text()) for out in outs]
    assert manifests[0] == manifests[1]
