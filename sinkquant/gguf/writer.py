"""Write an HF model folder as one GGUF file: plan each tensor's type, then stream tensor by tensor
(one tensor in memory at a time) into a temporary file that is renamed into place when complete."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import InputError
from ..stream.source import SafetensorsSource
from .architectures import Architecture, TensorMap, add_hyperparameters, architecture
from .tokenizer import add_tokenizer
from .types import GGUF_TYPES, GGUFType, Packed

#: tensors whose type follows the requested one only when it keeps 8 bits or more: the embedding and the
#: output head cost the most quality at 4 bits (llama.cpp's own quantize keeps the head at 6 bits)
_EMBEDDINGS = ("token_embd.weight", "output.weight")


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its HF name, its GGUF name, shape (HF's [rows, cols]) and type."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    type: GGUFType


@dataclass(frozen=True)
class ModelFolder:
    """An HF model folder, checked: its config, architecture and tensors (`SafetensorsSource`, the
    reader the streaming executor uses: shards through their index, one-line errors for damaged files)."""

    path: Path
    config: dict[str, Any]
    arch: Architecture
    source: SafetensorsSource


def open_model(model_dir: str | os.PathLike) -> ModelFolder:
    """The model folder with config.json and *.safetensors; InputError for anything missing."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"model folder {path} does not exist: pass a Hugging Face model folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{path} has no config.json: pass a Hugging Face model folder (save_pretrained)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return ModelFolder(path, config, architecture(config), SafetensorsSource(path))


def _tensor_type(name: str, shape: tuple[int, ...], requested: GGUFType) -> GGUFType:
    if len(shape) < 2:  # norms and biases: tiny, and llama.cpp expects them F32
        return GGUF_TYPES["F32"]
    if name in _EMBEDDINGS and requested.bits < 8:
        return GGUF_TYPES["F16"]
    # a row that does not split into whole blocks cannot be stored in a block type
    return requested if requested.fits(shape[-1]) else GGUF_TYPES["F16"]


def plan_tensors(model: ModelFolder, requested: GGUFType) -> list[PlannedTensor]:
    """Every tensor the file will hold, in file order, from the safetensors headers alone."""
    names = TensorMap(model.arch, model.config)
    plan: list[PlannedTensor] = []
    for hf_name in model.source.names():
        name = names.gguf_name(hf_name)
        if name is not None:
            shape = model.source.shape_of(hf_name)
            plan.append(PlannedTensor(hf_name, name, shape, _tensor_type(name, shape, requested)))
    return plan


def packed_tensors(
    model: ModelFolder, plan: list[PlannedTensor]
) -> Iterator[tuple[PlannedTensor, np.ndarray, Packed]]:
    """(tensor, its float32 source in llama.cpp's row order, its packed bytes and intended weights), one
    tensor at a time."""
    import torch

    names = TensorMap(model.arch, model.config)
    for tensor in plan:
        stored = model.source.read([tensor.hf_name])[tensor.hf_name]
        source = names.transform(tensor.name, stored.to(torch.float32).numpy())
        yield tensor, source, tensor.type.pack(source)


def _temporary(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def _write(writer: gguf.GGUFWriter, model: ModelFolder, plan: list[PlannedTensor], progress: bool) -> None:
    for tensor in plan:
        # the type's own byte count, so a packer that disagrees with it fails here, not in llama.cpp
        writer.add_tensor_info(
            tensor.name,
            tensor.shape,
            np.dtype(np.float32),
            tensor.type.nbytes(tensor.shape),
            tensor.type.ggml,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    items = packed_tensors(model, plan)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(plan), desc="gguf", unit="tensor")
    for _, _, packed in items:
        writer.write_tensor_data(packed.data)


def write_gguf(model: ModelFolder, out: Path, requested: GGUFType, progress: bool) -> list[PlannedTensor]:
    """Write `model` to `out` with 2-D weights in `requested`; returns the plan written."""
    plan = plan_tensors(model, requested)
    tmp = _temporary(out)
    writer = gguf.GGUFWriter(tmp, model.arch.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model.path.resolve().name)
        writer.add_file_type(int(requested.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, model.config)
        add_tokenizer(writer, model.path, int(model.config["vocab_size"]))
        _write(writer, model, plan, progress)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        # nothing half-written stays behind, whatever failed (a bad tokenizer, a full disk, Ctrl-C)
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return plan
