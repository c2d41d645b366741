"""Peers whose pins clash with sinkquant's, each run in a virtual environment of its own.

llm-compressor 0.14 pins transformers <= 5.17 and auto-round 0.16 takes 5.24 (sinkquant pins 5.23), so
`llmcompressor_w4a16` and `autoround_w4a16` make `runs/venv-llmcompressor` and `runs/venv-autoround`
(once; the CPU torch wheel first, as the README says for sinkquant), run `llmcompressor_oneshot.py` or
`autoround_run.py` there on calibration ids written by the caller, and return where the dense copy of
the peer's quantized model lies, for sinkquant's evaluator. A peer that cannot be installed or run
raises `PeerUnavailable` with a one-line reason, which the benchmark table prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from eval.lib.common import ROOT

VENVS = ROOT / "runs"
LLMCOMPRESSOR_SPEC = "llmcompressor==0.14.*"
AUTOROUND_SPEC = "auto-round==0.16.*"


class PeerUnavailable(RuntimeError):
    """A peer could not be installed or run; str() is the one-line reason for the table."""


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def ensure_venv(name: str, packages: list[str]) -> Path:
    """The python of runs/venv-NAME, made with `packages` when missing (CPU torch pinned to ours)."""
    venv = VENVS / f"venv-{name}"
    python = venv / "bin" / "python"
    marker = venv / ".sinkquant-ready"
    if marker.is_file() and marker.read_text() == " ".join(packages):
        return python
    VENVS.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}"],
        [str(python), "-m", "pip", "install", "--quiet", *packages],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PeerUnavailable(f"installing {' '.join(packages)} failed: {_last_line(done.stderr)}")
    marker.write_text(" ".join(packages))
    return python


def llmcompressor_w4a16(
    model_dir: str | Path, calib_ids: torch.Tensor, out_dir: Path, group_size: int, method: str = "gptq"
) -> dict:
    """Run llm-compressor's W4A16 `method` (gptq, awq or awq-gptq; see llmcompressor_oneshot.py) in its
    own venv on `calib_ids` (int64 [samples, seq_len], the samples sinkquant calibrates on).

    Returns peer.json's fields plus `dense` (a plain HF folder holding the decompressed weights) and
    `compressed`. A finished run on the same inputs is reused (see `_run_peer`)."""
    python = ensure_venv("llmcompressor", [LLMCOMPRESSOR_SPEC])
    script = Path(__file__).with_name("llmcompressor_oneshot.py")
    key = f"{group_size}|{method}|{LLMCOMPRESSOR_SPEC}"
    return _run_peer(python, script, model_dir, calib_ids, out_dir, [str(group_size), method], key)


def autoround_w4a16(
    model_dir: str | Path,
    calib_ids: torch.Tensor,
    out_dir: Path,
    group_size: int = 128,
    preset: str = "default",
    symmetric: bool = True,
) -> dict:
    """Run AutoRound's `preset` (default, light or best: autoround_run.py) in its own venv on `calib_ids`; returns peer.json's fields plus
    `dense` and `compressed`, like `llmcompressor_w4a16`."""
    python = ensure_venv("autoround", [AUTOROUND_SPEC])
    script = Path(__file__).with_name("autoround_run.py")
    args = [str(group_size), preset, "1" if symmetric else "0"]
    return _run_peer(
        python, script, model_dir, calib_ids, out_dir, args, f"{'|'.join(args)}|{AUTOROUND_SPEC}"
    )


def _run_peer(
    python: Path, script: Path, model_dir, calib_ids: torch.Tensor, out_dir: Path, args: list[str], key: str
) -> dict:
    """Write the ids, run `script MODEL IDS OUT *args` in the peer's venv, read its peer.json.

    A finished run in `out_dir` whose key (model folder, `key`, sha256 of the ids) matches is reused
    rather than repeated (its peer.json says `reused: true`): a peer's run takes minutes on 2 cores and
    gives the same checkpoint for the same inputs."""
    import hashlib

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    ids = calib_ids.to(torch.int64).contiguous()
    key = hashlib.sha256(
        f"{Path(model_dir).resolve()}|{key}|{tuple(ids.shape)}|".encode() + ids.numpy().tobytes()
    ).hexdigest()
    done_file = out_dir / "peer.json"
    if done_file.is_file() and (out_dir / "run.key").is_file() and (out_dir / "run.key").read_text() == key:
        info = json.loads(done_file.read_text())
        info["reused"] = True
        info["dense"], info["compressed"] = str(out_dir / "dense"), str(out_dir / "compressed")
        return info
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.key").unlink(missing_ok=True)
    ids_path = out_dir / "calib_ids.safetensors"
    save_file({"input_ids": ids}, str(ids_path))
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [str(python), str(script), str(model_dir), str(ids_path), str(out_dir), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    (out_dir / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise PeerUnavailable(f"{script.stem} failed: {_last_line(done.stderr)}")
    info = json.loads(done_file.read_text())
    (out_dir / "run.key").write_text(key)
    info["dense"], info["compressed"] = str(out_dir / "dense"), str(out_dir / "compressed")
    return info
