"""Reading a model's tensors from its safetensors files, a few at a time.

A model folder holds one `model.safetensors` or many shards listed by `model.safetensors.index.json`
(as transformers writes them); `SafetensorsSource` maps every tensor name to its file and reads only
the tensors asked for, through safetensors' memory map, so holding the source costs nothing until a
layer is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError

INDEX = "model.safetensors.index.json"


class SafetensorsSource:
    """The tensors of the safetensors files in `folder` (through the index when there is one)."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise InputError(f"{index} is unreadable or damaged ({exc}); re-copy the model") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise InputError(f"{self.folder} holds no .safetensors file to stream the model from")
        self.where: dict[str, str] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise InputError(f"{path} is listed in {INDEX} but missing; re-copy the model")
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        if weight_map is not None and weight_map.get(key) != name:
                            continue
                        piece = fh.get_slice(key)
                        self.where[key] = name
                        self._dtypes[key] = _DTYPES[piece.get_dtype()]
                        self._shapes[key] = tuple(piece.get_shape())
            except (SafetensorError, OSError, ValueError) as exc:
                raise InputError(
                    f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}): it is truncated "
                    "or corrupt; re-download or re-copy the model"
                ) from exc
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.where))
            if absent:
                raise InputError(f"{INDEX} lists {absent[0]}, which no shard holds; re-copy the model")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def dtype_of(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def float_dtype(self) -> torch.dtype:
        """The dtype most floating-point bytes are stored in (the model's storage precision)."""
        count: dict[torch.dtype, int] = {}
        for name, dtype in self._dtypes.items():
            if dtype.is_floating_point:
                count[dtype] = count.get(dtype, 0) + _numel(self._shapes[name]) * dtype.itemsize
        return max(count, key=count.get) if count else torch.float32

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `names`, as stored (one file opened at a time)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as fh:
                for key in keys:
                    out[key] = fh.get_tensor(key)
        return out

    def nbytes(self) -> int:
        return sum(_numel(s) * self._dtypes[n].itemsize for n, s in self._shapes.items())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
