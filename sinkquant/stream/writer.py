"""Writing a model's tensors as sharded safetensors while they are produced, layer by layer.

The layout is transformers' own: `model.safetensors` when everything fits one shard, otherwise
`model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json` (`metadata.total_size` and a
`weight_map` from tensor name to shard), so `from_pretrained` and `SafetensorsSource` read it as any
sharded model. Tensors wait in memory until a shard's worth has arrived; a shard is written to a
temporary name and renamed once the number of shards is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .source import INDEX

#: the largest shard written (bytes); smaller when the run's memory budget is smaller
SHARD_BYTES = 2 << 30


class ShardWriter:
    """Collects tensors by name and writes them to `folder` in shards of at most `shard_bytes`."""

    def __init__(self, folder: str | Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.folder = Path(folder)
        self.shard_bytes = max(1, shard_bytes)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_size = 0
        self.files: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self.flush()
        self._pending[name] = tensor.clone() if _is_view(tensor) else tensor
        self._pending_bytes += size
        self.total_size += size

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def flush(self) -> None:
        """Write the tensors waiting in memory as a shard now."""
        from safetensors.torch import save_file

        if not self._pending:
            return
        name = f".shard-{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, str(self.folder / name), metadata={"format": "pt"})
        self._written.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left, give the shards their final names and write the index; returns the
        safetensors file names."""
        self.flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for i, (temporary, names) in enumerate(self._written, start=1):
            final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.folder / temporary).rename(self.folder / final)
            self.files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files


def _is_view(tensor: torch.Tensor) -> bool:
    """A tensor sharing its storage with a bigger one: saved alone it would drag the whole storage."""
    return tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
