"""GGUF export (llama.cpp's file format) of Hugging Face Llama and Qwen2 model folders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

__all__ = ["GGUFExportResult", "export_gguf"]


@dataclass(frozen=True)
class GGUFExportResult:
    """What `export_gguf` wrote. `bits_per_weight`: the file bytes of the 2-D weight tensors (embedding,
    output head, linear layers; scales included) per weight; `plan`: (GGUF tensor name, ggml type)."""

    path: Path
    type: str
    file_bytes: int
    bits_per_weight: float
    plan: list[tuple[str, str]] = field(default_factory=list)


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise InputError(
            f"output {out} must end in .gguf: name the file, e.g. {out.with_suffix('.gguf').name}"
        )
    if out.is_dir():
        raise InputError(f"output {out} is a folder: name a .gguf file")
    if out.exists() and not overwrite:
        raise InputError(f"output {out} exists: pass overwrite (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise InputError(f"the output's folder {out.parent} does not exist: create it first")


def export_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    gguf_type: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> GGUFExportResult:
    """Write the HF model folder `model_dir` (config.json, *.safetensors, tokenizer) as the GGUF file
    `out_path`, its 2-D weights in `gguf_type` (types.GGUF_TYPES: F32, F16, BF16, Q8_0, Q4_0).
    Raises InputError for bad input; leaves no file behind on any error."""
    _require_gguf()
    from .types import gguf_type as lookup
    from .writer import open_model, write_gguf

    requested = lookup(gguf_type)
    out = Path(out_path)
    _check_output(out, overwrite)
    model = open_model(model_dir)
    plan = write_gguf(model, out, requested, progress)
    matrices = [t for t in plan if len(t.shape) >= 2]
    weights = sum(t.shape[0] * t.shape[1] for t in matrices)
    bits = 8 * sum(t.type.nbytes(t.shape) for t in matrices) / max(weights, 1)
    return GGUFExportResult(
        out, requested.name, out.stat().st_size, bits, [(t.name, t.type.name) for t in plan]
    )


def _require_gguf() -> None:
    """The `gguf` package (llama.cpp's own writer and constants) is not a core requirement: one line
    that says how to install it."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise InputError(
            "GGUF export needs the `gguf` package, which is not installed: pip install 'sinkquant[gguf]'"
        ) from exc
