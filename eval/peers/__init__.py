"""Peers whose pins clash with sinkquant's, each run in a virtual environment of its own.

llm-compressor 0.14 pins transformers <= 5.17 (sinkquant needs 5.23), so `llmcompressor_gptq` makes
`runs/venv-llmcompressor` (once; the CPU torch wheel first, as the README says for sinkquant), runs
`llmcompressor_gptq.py` there on calibration ids written by the caller, and returns where the
decompressed dense copy of its checkpoint lies, for sinkquant's evaluator. A peer that cannot be
installed or run raises `PeerUnavailable` with a one-line reason, which the benchmark table prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / "runs"
LLMCOMPRESSOR_SPEC = "llmcompressor==0.14.*"


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


def llmcompressor_gptq(
    model_dir: str | Path, calib_ids: torch.Tensor, out_dir: Path, group_size: int
) -> dict:
    """Run llm-compressor's GPTQ W4A16 (int4 symmetric, `group_size`) in its own venv.

    calib_ids: int64 [samples, seq_len], the same samples sinkquant calibrates on. Returns peer.json's
    fields plus `dense` (a plain HF folder holding the decompressed weights) and `compressed`.

    A finished run in `out_dir` whose key (model folder, group size, peer version, sha256 of the ids)
    matches is reused rather than repeated (its peer.json says `reused: true`): the peer's run takes
    ten minutes on 2 cores and gives the same checkpoint for the same inputs."""
    import hashlib

    from safetensors.torch import save_file

    python = ensure_venv("llmcompressor", [LLMCOMPRESSOR_SPEC])
    out_dir = Path(out_dir)
    ids = calib_ids.to(torch.int64).contiguous()
    key = hashlib.sha256(
        f"{Path(model_dir).resolve()}|{group_size}|{LLMCOMPRESSOR_SPEC}|{tuple(ids.shape)}|".encode()
        + ids.numpy().tobytes()
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
    script = Path(__file__).with_name("llmcompressor_gptq.py")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [str(python), str(script), str(model_dir), str(ids_path), str(out_dir), str(group_size)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    if done.returncode != 0:
        raise PeerUnavailable(f"llm-compressor failed: {_last_line(done.stderr)}")
    info = json.loads(done_file.read_text())
    (out_dir / "run.key").write_text(key)
    info["dense"], info["compressed"] = str(out_dir / "dense"), str(out_dir / "compressed")
    return info
