"""How a sink-aware cache follows the model's forward calls.

A cache needs two things from each forward it takes part in: the attention mask of the new tokens
(which are padding) and, with run-time sink detection, the hidden state of one decoder layer. One set
of hooks per model serves every cache attached to it. Each forward finds its own cache, the one passed
as `past_key_values`, and the layer hook reads the cache of the forward running in its thread. So
caches used by concurrent generations (one per thread) or interleaved ones (one after another on
the same model) each keep their own flags, and attaching a new cache never takes another's hooks.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol

import torch
from torch import nn

from ..architecture import decoder_layers, hidden_of
from .flags import TokenFlags

_ATTR = "_sinkquant_kv_hooks"
_RUNNING = threading.local()  # per thread: the caches of the forwards running now (innermost last)


def _running() -> list:
    stack = getattr(_RUNNING, "stack", None)
    if stack is None:
        stack = _RUNNING.stack = []
    return stack


class AttachedCache(Protocol):
    """What the hooks use of a cache (`SinkQuantizedCache`)."""

    detect: object | None  # SinkDetection: layer, dims, threshold
    flags: TokenFlags

    def begin_chunk(self, batch: int, n: int, attention_mask: torch.Tensor | None, device) -> None: ...


class ModelHooks:
    """The hooks of one model and the caches attached to it (held weakly: a cache that is gone
    needs no detach)."""

    def __init__(self, model: nn.Module) -> None:
        self.caches: weakref.WeakSet = weakref.WeakSet()
        self._model = weakref.ref(model)
        self._layers: dict[int, object] = {}  # decoder layer index -> its detection hook
        self._handles = [
            model.register_forward_pre_hook(self._on_model_start, with_kwargs=True),
            model.register_forward_hook(self._on_model_end, always_call=True),
        ]

    @classmethod
    def of(cls, model: nn.Module) -> ModelHooks:
        hooks = model.__dict__.get(_ATTR)
        if hooks is None:
            hooks = cls(model)
            model.__dict__[_ATTR] = hooks  # not a submodule, not in state_dict
        return hooks

    def add(self, cache: AttachedCache) -> None:
        self.caches.add(cache)
        if cache.detect is not None and cache.detect.layer not in self._layers:
            layer = decoder_layers(self._model())[cache.detect.layer]
            index = cache.detect.layer
            self._layers[index] = layer.register_forward_hook(
                lambda _m, _a, output: self._on_layer_end(index, output)
            )

    def discard(self, cache: AttachedCache) -> None:
        """Take `cache` out; the model's hooks go with the last cache."""
        self.caches.discard(cache)
        model = self._model()
        if len(self.caches) == 0 and model is not None:
            self.detach_all(model)

    @classmethod
    def detach_all(cls, model: nn.Module) -> None:
        """Remove every hook sinkquant's caches put on `model`, whatever caches are still alive (for
        code that reuses one model across many caches, e.g. a benchmark)."""
        hooks = model.__dict__.pop(_ATTR, None)
        if hooks is not None:
            for handle in [*hooks._handles, *hooks._layers.values()]:
                handle.remove()
            hooks._handles, hooks._layers = [], {}
            hooks.caches = weakref.WeakSet()

    def _on_model_start(self, _module, args, kwargs):
        given = kwargs.get("past_key_values")
        cache = given if given is not None and given in self.caches else None
        _running().append(cache)  # first, so the end hook (which runs even if this raises) pops it
        if cache is not None:
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is not None:
                cache.begin_chunk(x.shape[0], x.shape[1], kwargs.get("attention_mask"), x.device)
        return None

    def _on_model_end(self, _module, _args, _output):
        stack = _running()
        cache = stack.pop() if stack else None
        if cache is not None:
            cache.flags.close()

    def _on_layer_end(self, index: int, output) -> None:
        stack = _running()
        cache = stack[-1] if stack else None
        if cache is None or cache.detect is None or cache.detect.layer != index or cache.flags.open is None:
            return
        h = hidden_of(output)
        dims = torch.tensor(cache.detect.dims, device=h.device, dtype=torch.long)
        cache.flags.detected((h.index_select(-1, dims).abs() > cache.detect.threshold).any(dim=-1))
