"""Where a model's weights live while a job runs: all in memory, or streamed from disk layer by layer.

Every job (calibration, RTN, GPTQ, perplexity) walks the decoder layers in order through a
`ModelHost`: `with host.outside():` makes the modules outside the decoder layers (embeddings, final
norm, LM head) usable, and `with host.layer(i) as layer:` makes decoder layer i usable on the
execution device. `ResidentModel` wraps a model already in memory (a compression pipeline often
holds one): it only moves a layer to the device and back. `StreamedModel` builds the model's skeleton
on the meta device and reads one layer's tensors from the safetensors files when it is entered, then
frees them when it is left, so peak memory is about one layer whatever the model's size.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..architecture import decoder_layers
from ..errors import InputError
from .source import SafetensorsSource
from .store import default_budget_bytes
from .writer import SHARD_BYTES


@dataclass
class Execution:
    """Where a job computes and how much memory its hidden states may hold (one config for the CLI's
    `--device` / `--memory-budget` and the API)."""

    device: str = "auto"  # cpu | cuda | cuda:N | auto (CUDA when there is a GPU)
    memory_budget: int | None = None  # bytes; None: a quarter of the memory limit (`default_budget_bytes`)

    def kwargs(self) -> dict:
        return {"device": self.device, "memory_budget": self.memory_budget}

    def shard_bytes(self, host: ModelHost) -> int:
        """Shards small enough that the one waiting in memory stays within the budget."""
        return max(64 << 20, min(SHARD_BYTES, host.memory_budget // 2))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto`: CUDA when there is a GPU, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return device


class ModelHost(ABC):
    """A model whose decoder layers are used one at a time (see the module docstring)."""

    model: nn.Module
    device: torch.device
    dtype: torch.dtype  # the compute dtype of float tensors
    memory_budget: int  # bytes of hidden states kept in memory before they spill to disk
    streamed: bool = False

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    def prefix(self, index: int) -> str:
        """The qualified name of decoder layer `index` plus a dot."""
        return self._layer_prefix + f"{index}."

    @property
    def _layer_prefix(self) -> str:
        target = self.layers
        for name, module in self.model.named_modules():
            if module is target:
                return name + "."
        raise AssertionError("decoder layers not found among the model's modules")

    @abstractmethod
    def layer(self, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        """Decoder layer `index`, usable on the execution device for the block."""

    @abstractmethod
    def outside(self, part: str = "all") -> contextlib.AbstractContextManager[nn.Module]:
        """The modules outside the decoder layers, usable for the block. `part`: "input" (what runs
        before the first layer: the LM head is left out unless tied), "output" (what runs after the
        last: the input embedding is left out unless tied) or "all"."""

    def storage_dtype(self, name: str) -> torch.dtype | None:
        """The dtype tensor `name` is stored in at its source (None: as the model holds it)."""
        return None

    def read_stored(self, name: str) -> torch.Tensor | None:
        """Tensor `name` exactly as its source stores it (None: the source has no such tensor)."""
        return None


class ResidentModel(ModelHost):
    """A model already in memory; each layer visits `device` while it is used."""

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        memory_budget: int | None = None,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        first = next(model.parameters())
        self.home = first.device
        self.device = self.home if device is None else resolve_device(device)
        self.dtype = first.dtype if first.is_floating_point() else torch.float32
        self.memory_budget = default_budget_bytes() if memory_budget is None else memory_budget
        self._storage = storage_dtype

    def storage_dtype(self, name: str) -> torch.dtype | None:
        return self._storage

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        layer = self.layers[index]
        if self.device != self.home:
            layer.to(self.device)
        try:
            yield layer
        finally:
            if self.device != self.home:
                layer.to(self.home)

    @contextlib.contextmanager
    def outside(self, part: str = "all") -> Iterator[nn.Module]:
        outer = _outer_modules(self.model, part)
        if self.device != self.home:
            for module in outer:
                module.to(self.device)
        try:
            yield self.model
        finally:
            if self.device != self.home:
                for module in outer:
                    module.to(self.home)


class NotStreamable(Exception):
    """The folder's tensors are not named as the model's own (a checkpoint transformers renames on
    load): it is loaded whole instead."""


class StreamedModel(ModelHost):
    """A model read from the safetensors files of `folder`, one decoder layer at a time.

    `prepare(skeleton)`: changes the skeleton before anything is read (a sinkquant checkpoint puts its
    empty quantized linear layers in; their buffers keep the dtypes they were stored in)."""

    streamed = True

    def __init__(
        self,
        folder: str | Path,
        config,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = "cpu",
        prepare: Callable[[nn.Module], None] | None = None,
        attn_implementation: str | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.source = SafetensorsSource(folder)
        self.dtype = dtype
        self.device = resolve_device(device)
        self.memory_budget = default_budget_bytes() if memory_budget is None else memory_budget
        self.model = build_skeleton(config, dtype, prepare, attn_implementation)
        for module in self.model.modules():  # computed buffers (rotary frequencies) live where layers compute
            for name in module._non_persistent_buffers_set:
                if module._buffers.get(name) is not None:
                    module._buffers[name] = module._buffers[name].to(self.device)
        self._tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self._check_coverage()

    def storage_dtype(self, name: str) -> torch.dtype | None:
        return self.source.dtype_of(name) if name in self.source else None

    def read_stored(self, name: str) -> torch.Tensor | None:
        return self.source.read([name])[name] if name in self.source else None

    def _check_coverage(self) -> None:
        expected = set(self.model.state_dict())
        missing = sorted(k for k in expected - set(self.source.names()) if k not in self._tied)
        if missing:
            raise NotStreamable(
                f"{len(missing)} tensors are not in the files under their own names ({missing[0]})"
            )

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        layer = self.layers[index]
        self._materialize(layer, self.prefix(index))
        try:
            yield layer
        finally:
            release(layer)

    @contextlib.contextmanager
    def outside(self, part: str = "all") -> Iterator[nn.Module]:
        tied = any(target not in self.source for target in self._tied)
        outer = _outer_modules(self.model, part, tied)
        names = {id(m): n for n, m in self.model.named_modules()}
        for module in outer:
            self._materialize(module, names[id(module)] + ".")
        self._tie()
        try:
            yield self.model
        finally:
            for module in outer:
                _release(module)
            return_freed_memory()

    def _materialize(self, module: nn.Module, prefix: str) -> None:
        """Read `module`'s tensors (qualified names under `prefix`) into it, on the device, floats in
        the compute dtype except what a quantized layer stores in a dtype of its own."""
        keys = [k for k in module.state_dict() if prefix + k in self.source]
        tensors = self.source.read([prefix + k for k in keys])
        state = {}
        for key in keys:
            t = tensors[prefix + key]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise InputError(
                    f"tensor {prefix + key} holds {kind} values; the model is broken — fix the weights before "
                    "quantizing"
                )
            state[key] = (t.to(self.dtype) if t.is_floating_point() else t).to(self.device)
        module.load_state_dict(state, strict=False, assign=True)
        for sub in module.modules():
            if hasattr(sub, "restore_storage_dtypes"):  # a quantized layer's own storage dtypes
                sub.restore_storage_dtypes()

    def _tie(self) -> None:
        for target, source in self._tied.items():
            if target in self.source:
                continue
            owner, _, attr = target.rpartition(".")
            setattr(self.model.get_submodule(owner), attr, self.model.get_parameter(source))


def as_host(model: nn.Module | ModelHost) -> ModelHost:
    """A host for `model`: itself when it is one, else the in-memory model wrapped."""
    return model if isinstance(model, ModelHost) else ResidentModel(model)


class LayerWriter(Protocol):
    """What receives a model's tensors as a job finishes them (a checkpoint being written)."""

    def write_layer(self, host: ModelHost, index: int, layer: nn.Module) -> None:
        """Decoder layer `index` is final (called while it is still usable)."""

    def write_outside(self, host: ModelHost) -> None:
        """Everything outside the decoder layers is final (called inside `host.outside()`)."""


def _outer_modules(model: nn.Module, part: str = "all", tied: bool | None = None) -> list[nn.Module]:
    """The smallest modules that hold every tensor outside the decoder layers (the embedding, the final
    norm, the LM head, ...), each holding tensors itself; `part` as in `ModelHost.outside`. `tied`:
    whether the LM head shares the embedding's weight (default: whether it holds the same tensor)."""
    layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied is None:
        tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", 0)
    if not tied and part == "input" and head is not None:
        inside |= {id(m) for m in head.modules()}
    if not tied and part == "output" and embedding is not None:
        inside |= {id(m) for m in embedding.modules()}
    outer = []
    for module in model.modules():
        if id(module) in inside:
            continue
        own = list(module.named_parameters(recurse=False)) + [
            (n, b)
            for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set
        ]
        if own:
            outer.append(module)
    return outer


def release(module: nn.Module) -> None:
    """Give back the memory of `module`'s parameters and persistent buffers (they go to the meta
    device; the module keeps its structure and hooks, and is filled again by the next read)."""
    _release(module)
    return_freed_memory()


def _release(module: nn.Module) -> None:
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buffer.to("meta")
        if hasattr(sub, "reset_layouts"):
            sub.reset_layouts()


def return_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc keeps freed blocks of a layer's
    size in its heap, where the next layer's differently sized tensors fragment it: without this the
    resident size creeps up layer after layer)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def build_skeleton(config, dtype: torch.dtype, prepare: Callable[[nn.Module], None] | None = None,
                   attn_implementation: str | None = None) -> nn.Module:  # fmt: skip
    """The model of `config` with every parameter on the meta device (no memory, no initialisation),
    and its non-persistent buffers (rotary frequencies, embedding scales) computed on the CPU as
    transformers' own loader computes them."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    if prepare is not None:
        prepare(model)
    owners = []
    for key, buffer in list(model.named_non_persistent_buffers()):
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[attr] = torch.empty_like(buffer, device="cpu")
        owners.append(module)
    for module in owners:
        model._init_weights(module)
    return model.eval()
