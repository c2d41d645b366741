"""The hidden states of every calibration sample (or evaluation window) between two decoder layers.

They stay in memory while their bytes fit the run's memory budget; past it, each further entry is
written to a temporary folder and read back when the next layer needs it. The folder is removed when
the store closes, on success, on an error and on Ctrl-C (`with HiddenStore(...) as store:`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

GIB = 1 << 30


def memory_limit_bytes() -> int:
    """The memory this process may use: its cgroup's limit when one is set, else the machine's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            own = _own_cgroup_file(path)
            value = Path(own).read_text().strip()
        except (OSError, ValueError):
            continue
        if value.isdigit() and int(value) < (1 << 60):
            return int(value)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _own_cgroup_file(default: str) -> str:
    """`default` inside this process's own cgroup (v2: /proc/self/cgroup's `0::/path`)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            v2 = hierarchy == "0" and default.endswith("memory.max")
            v1 = "memory" in controllers.split(",") and not default.endswith("memory.max")
            if v2 or v1:
                base, name = os.path.split(default)
                own = os.path.join(base, path.lstrip("/"), name)
                if os.path.exists(own):
                    return own
    except (OSError, ValueError):
        pass
    return default


def default_budget_bytes() -> int:
    """A quarter of the memory limit: the rest holds one layer, its statistics and the runtime."""
    return memory_limit_bytes() // 4


class HiddenStore:
    """A list of tensors of fixed length whose entries past `budget` bytes live on disk."""

    def __init__(self, entries: list[torch.Tensor], budget: int | None = None, spill_dir: str | None = None):
        self.budget = default_budget_bytes() if budget is None else budget
        self._spill_parent = spill_dir
        self._dir: Path | None = None
        self._memory: list[torch.Tensor | None] = [None] * len(entries)
        self._device: list[torch.device | None] = [None] * len(entries)
        self._held = 0
        self.spilled = 0  # entries written to disk at least once
        for i, t in enumerate(entries):
            self[i] = t

    def __len__(self) -> int:
        return len(self._memory)

    def __getitem__(self, index: int) -> torch.Tensor:
        t = self._memory[index]
        if t is not None:
            return t
        return torch.load(self._file(index), weights_only=True).to(self._device[index])

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        old = self._memory[index]
        if old is not None:
            self._held -= old.numel() * old.element_size()
        size = value.numel() * value.element_size()
        self._device[index] = value.device
        if self._held + size <= self.budget:
            self._memory[index] = value
            self._held += size
            return
        self._memory[index] = None
        torch.save(value.detach().cpu(), self._file(index))
        self.spilled += 1

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def _file(self, index: int) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="sinkquant-spill-", dir=self._spill_parent))
        return self._dir / f"{index}.pt"

    @property
    def spill_dir(self) -> Path | None:
        return self._dir

    def close(self) -> None:
        self._memory = [None] * len(self._memory)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
