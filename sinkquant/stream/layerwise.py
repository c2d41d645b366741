"""Run many sequences (calibration samples, evaluation windows) through a model one decoder layer at a
time.

Calibration, GPTQ and perplexity all walk the layers in order over every sequence at once, so only one
layer's weights need to be in memory (see `host.py`); GPTQ also needs each layer's inputs *as the
already-quantized layers before it produce them*. This module owns that plumbing and knows nothing
about what is measured or how weights are quantized:

1. `capture_inputs`: the hidden states entering decoder layer 0, and the other arguments every layer
   is called with (position embeddings, attention mask, position ids, cache position, ...), batch by
   batch. Each layer is temporarily replaced by a stand-in that records its call and passes the hidden
   state through untouched; the last one raises `_StopForward`, so no layer and no LM head is
   computed. Arguments are recorded per layer, so models whose layers differ (sliding-window and global
   attention in Gemma 3) get each layer's own mask and rotary embedding.
2. `observe_inputs`: forward pre-hooks that hand every linear layer's input to an observer; linear
   layers fed the very same tensor (q/k/v, gate/up) share one observer, so its statistics are computed
   once.
3. `run_layer`: one decoder layer over all batches, its outputs replacing its inputs; GPTQ runs it once
   with the float weights (observers attached) and once after quantization.
4. `merge_batches`: the recorded batches as one batch, so a layer can run over every calibration
   token in a single call. GPTQ then quantizes each linear layer inside that call, as its input
   arrives (one pass per layer instead of two, and every linear layer sees the outputs of the
   quantized ones before it in the same layer).
5. `head_logits`: what the model computes after its last decoder layer (final norm, LM head, soft-capping)
   on given final hidden states, by the model's own forward with the layers standing aside.
6. `computing_in`: a decoder layer computing in another float dtype (float64 for GPTQ's portable
   numerics) while its inputs and outputs stay as stored.

Peak memory is the layer in use, the hidden states (inputs and outputs of one layer) and the
observers of one layer; with merged batches, also one layer's intermediate activations for all
calibration tokens at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..architecture import decoder_layers, hidden_of
from ..errors import SinkQuantError


class _StopForward(Exception):
    """Raised by the last stand-in layer: everything the layers need has been recorded."""


@dataclass
class LayerInputs:
    """hidden[b]: [batch, seq, hidden] entering the current layer; calls[layer][b]: the positional
    arguments after the hidden state and the keyword arguments that layer is called with for batch b."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]


@torch.no_grad()
def capture_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device | None = None
) -> LayerInputs:
    """Embed `input_ids` [n, seq] in batches of `batch_size` on `device` (default: the embedding's)
    and record what each decoder layer gets. Only the modules before the first decoder layer need to
    hold weights."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def stand_in(index: int):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            kwargs["use_cache"] = False
            kwargs.pop("past_key_values", None)
            kwargs.pop("past_key_value", None)
            calls[index].append((tuple(args[1:]), kwargs))
            if index == 0:
                hidden.append(h)
            if index == len(layers) - 1:
                raise _StopForward
            return h

        return forward

    if device is None:
        device = model.get_input_embeddings().weight.device
    with _standing_aside(layers, stand_in):
        for start in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    batches = len(hidden)
    if batches == 0 or any(len(c) != batches for c in calls):
        raise SinkQuantError(
            f"could not record the inputs of the {len(layers)} decoder layers of {type(model).__name__} "
            "(the model does not call them one after another); use weights.algorithm: rtn"
        )
    return LayerInputs(hidden, calls)


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    index: int,
    keep: bool = True,
    before: Callable[[int], None] | None = None,
) -> None:
    """Decoder layer `index` over every batch of `inputs.hidden` (a list or a `HiddenStore`); with
    `keep`, each batch's output replaces its input. `before(b)` runs before batch b (collectors that
    need to know which sample they see)."""
    for b in range(len(inputs.calls[index])):
        if before is not None:
            before(b)
        run_batch(layer, inputs, index, b, keep)


@torch.no_grad()
def run_batch(layer: nn.Module, inputs: LayerInputs, index: int, b: int, keep: bool = True) -> None:
    """Decoder layer `index` over batch b of `inputs.hidden`; with `keep`, its output replaces the input."""
    args, kwargs = inputs.calls[index][b]
    out = hidden_of(layer(inputs.hidden[b], *args, **kwargs))
    if keep:
        inputs.hidden[b] = out


def _cast_floats(value, source: torch.dtype, target: torch.dtype):
    """`value` with every `source`-dtype tensor in it (in tuples, lists, dicts too) cast to `target`."""
    if isinstance(value, torch.Tensor):
        return value.to(target) if value.dtype == source else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, source, target) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, source, target) for k, v in value.items()}
    return value


@contextlib.contextmanager
def computing_in(layer: nn.Module, dtype: torch.dtype, stored: torch.dtype = torch.float32) -> Iterator[None]:
    """`layer` computes in `dtype` for the `with` block: its floating parameters and buffers are cast,
    every `stored`-dtype tensor it is called with (hidden state, position embeddings, masks) is cast on
    the way in, and its outputs go back to `stored` on the way out, so the hidden states between layers
    keep their dtype. On exit the original tensors are put back; one whose data was replaced in the
    block (GPTQ points a linear layer at its quantized weights) is cast back to its original dtype."""
    originals = [(t, t.data) for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
    copies = []  # where each cast copy lives: a tensor still pointing there was not replaced in the block
    for tensor, data in originals:
        tensor.data = data.to(dtype)
        copies.append(tensor.data_ptr())
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs: (_cast_floats(args, stored, dtype), _cast_floats(kwargs, stored, dtype)),
            with_kwargs=True,
        ),
        layer.register_forward_hook(lambda _m, _args, output: _cast_floats(output, dtype, stored)),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for (tensor, data), copy in zip(originals, copies, strict=True):
            tensor.data = data if tensor.data_ptr() == copy else tensor.data.to(data.dtype)


@torch.no_grad()
def head_logits(model: nn.Module, final_hidden: torch.Tensor, **kwargs):
    """The model's output given the last decoder layer's output `final_hidden` [b, seq, hidden]: the
    model's own forward runs on it as `inputs_embeds` with every decoder layer standing aside (the first
    returns `final_hidden`), so whatever follows the layers in that model (final norm, LM head, logit
    soft-capping, `logits_to_keep`) is applied exactly. Needs only those modules to hold weights."""
    layers = decoder_layers(model)

    def stand_in(index: int):
        def forward(*args, **kw):
            return final_hidden if index == 0 else (args[0] if args else kw["hidden_states"])

        return forward

    with _standing_aside(layers, stand_in):  # the input embedding is not run (it may hold no weights)
        return model(inputs_embeds=final_hidden, use_cache=False, **kwargs)


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
          "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")  # fmt: skip


@contextlib.contextmanager
def _standing_aside(layers: nn.ModuleList, make_forward: Callable[[int], Callable]):
    """Each layer's forward replaced by `make_forward(index)` for the block (an instance attribute
    shadows the class's), and the hooks others attached to the layers held back meanwhile (a
    collector measuring layer outputs must not see a stand-in's)."""
    saved = []
    try:
        for i, layer in enumerate(layers):
            saved.append({name: getattr(layer, name) for name in _HOOKS})
            for name in _HOOKS:
                setattr(layer, name, type(saved[-1][name])())
            layer.forward = make_forward(i)
        yield
    finally:
        for layer, hooks in zip(layers, saved, strict=False):
            layer.__dict__.pop("forward", None)
            for name, value in hooks.items():
                setattr(layer, name, value)


def merge_batches(inputs: LayerInputs) -> LayerInputs | None:
    """The batches of `inputs` as a single batch, or None when a layer's arguments cannot be merged.

    Per argument: tensors whose first dimension is each batch's size are concatenated (masks with a
    batch dimension); tensors equal in every batch are shared (rotary cos/sin of shape [1, seq, d],
    cache positions); other values must be equal in every batch. Anything else (a batch-dependent
    value of another shape) gives None, and the caller keeps the batches."""
    if len(inputs.hidden) <= 1:
        return inputs
    sizes = [h.shape[0] for h in inputs.hidden]
    calls: list[list[tuple[tuple, dict]]] = []
    for layer_calls in inputs.calls:
        try:
            args = _merge_values([a for a, _ in layer_calls], sizes)
            kwargs = _merge_values([k for _, k in layer_calls], sizes)
        except _Unmergeable:
            return None
        calls.append([(args, kwargs)])
    return LayerInputs([torch.cat(inputs.hidden)], calls)


class _Unmergeable(Exception):
    pass


def _merge_values(values: list, sizes: list[int]):
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise _Unmergeable
        batched = sum(sizes) != len(sizes) and all(
            v.dim() > 0 and v.shape[0] == n for v, n in zip(values, sizes, strict=True)
        )
        if batched and all(v.shape[1:] == first.shape[1:] for v in values):
            return torch.cat(values)
        if all(v.shape == first.shape and torch.equal(v, first) for v in values[1:]):
            return first
        raise _Unmergeable
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise _Unmergeable
        return {key: _merge_values([v[key] for v in values], sizes) for key in first}
    if isinstance(first, (tuple, list)):
        if any(type(v) is not type(first) or len(v) != len(first) for v in values):
            raise _Unmergeable
        return type(first)(_merge_values([v[i] for v in values], sizes) for i in range(len(first)))
    if all(v is first or v == first for v in values[1:]):
        return first
    raise _Unmergeable


class InputObserver(Protocol):
    """What `observe_inputs` feeds: any object with `add(x)`, x = a linear layer's input [..., in]."""

    def add(self, x: torch.Tensor) -> None: ...


@contextlib.contextmanager
def observe_inputs(
    modules: dict[str, nn.Module],
    make: Callable[[str, int], InputObserver],
    *,
    split: int | None = None,
    on_arrival: Callable[[str, nn.Module, InputObserver], None] | None = None,
) -> Iterator[dict[str, InputObserver]]:
    """Attach forward pre-hooks to `modules` (name -> linear layer) for the `with` block.

    Yields name -> observer, filled as the block runs forward passes; `make(name, in_features)` builds
    an observer for the first module it serves. A module called with the same tensor object as the module hooked just before it (q/k/v
    on one normed hidden state) shares that module's observer, decided at the first call.

    `split`: an input of whole samples [samples, ...] is fed in slices of that many samples, so the
    sums come out as they do over batches of that size. `on_arrival(name, module, observer)`: called
    once per module, at its first call, after its input was observed (GPTQ quantizes there, so the
    module computes with its quantized weights in the same forward); later calls are ignored."""
    observers: dict[str, InputObserver] = {}
    owners: dict[str, bool] = {}  # name -> whether it feeds its observer (False: shares another's)
    last: dict = {"x": None, "name": None}

    def hook(name: str):
        def pre_hook(module, args):
            if on_arrival is not None and name in observers:
                return
            x = args[0]
            if name not in observers:
                shared = last["x"] is x and last["name"] in observers
                observers[name] = observers[last["name"]] if shared else make(name, x.shape[-1])
                owners[name] = not shared
            if owners[name]:
                for part in x.split(split) if split and x.dim() >= 3 else (x,):
                    observers[name].add(part)
            last["x"], last["name"] = x, name
            if on_arrival is not None:
                on_arrival(name, module, observers[name])

        return pre_hook

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        yield observers
    finally:
        for handle in handles:
            handle.remove()
        last["x"] = None
