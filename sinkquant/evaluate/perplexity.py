"""Perplexity and KL divergence with one fixed, documented protocol.

Protocol (every figure sinkquant reports uses it):
1. line ends normalised to "\\n"; the whole text tokenized once, without special tokens;
2. optionally only the first `max_tokens` text tokens are kept;
3. non-overlapping windows of `seq_len` tokens (a trailing partial window is dropped); for a tokenizer
   that adds BOS to a fresh sequence each window is BOS + `seq_len - 1` text tokens;
4. each window is scored on its own (no context carried between windows); every token after the first
   of a window is predicted; NLL is averaged over all predicted tokens, perplexity = exp(mean NLL);
5. with a chunk size C, a window is fed C tokens at a time through the model's KV cache (each chunk
   attends to the cached past and itself): the path a quantized KV cache is judged on;
6. with a reference model, KL(p_ref || p_model) per predicted token and top-1 agreement, averaged over
   the same tokens.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import adds_bos, load_documents, tokenize_text
from ..errors import InputError, SinkQuantError
from ..stream.host import ModelHost, as_host
from ..stream.layerwise import capture_inputs, head_logits, run_layer
from ..stream.store import HiddenStore

PROTOCOL = "normalise line ends; tokenize once without special tokens; non-overlapping windows (BOS + seq_len-1 tokens when the tokenizer adds BOS); mean NLL over every predicted token"


@dataclass
class EvalResult:
    perplexity: float
    nll: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    bos: bool
    chunk_size: int | None
    dataset: str
    max_tokens: int | None
    text_tokens: int  # text tokens in the windows
    kl: float | None = None
    top1_agreement: float | None = None
    elapsed_s: float = 0.0
    protocol: str = PROTOCOL
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n_windows, seq_len] token ids following steps 1-3 of the protocol."""
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2 (got {seq_len})")
    ids = tokenize_text(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = adds_bos(tokenizer)
    per_window = seq_len - 1 if bos else seq_len
    n = len(ids) // per_window
    if n == 0:
        raise InputError(
            f"the text has {len(ids)} tokens, fewer than one window of {per_window}; use a shorter --seq-len or more text"
        )
    windows = torch.tensor(ids[: n * per_window], dtype=torch.long).view(n, per_window)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


def default_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def window_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_size: int | None = None,
    cache_factory: Callable[[nn.Module], object] | None = None,
) -> torch.Tensor:
    """Float32 logits [batch, seq, vocab] of one window: a single pass, or `chunk_size` tokens at a time
    through a KV cache made by `cache_factory` (a DynamicCache by default)."""
    if not chunk_size or chunk_size >= input_ids.shape[1]:
        if cache_factory is None:
            return model(input_ids=input_ids, use_cache=False).logits.float()
        chunk_size = input_ids.shape[1]
    cache = (cache_factory or default_cache)(model)
    parts = []
    for start in range(0, input_ids.shape[1], chunk_size):
        out = model(input_ids=input_ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True)
        parts.append(out.logits.float())
    return torch.cat(parts, dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module | ModelHost,
    tokenizer,
    dataset: str | os.PathLike,
    seq_len: int = 1024,
    max_tokens: int | None = None,
    reference: nn.Module | ModelHost | None = None,
    chunk_size: int | None = None,
    cache_factory: Callable[[nn.Module], object] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of `model` on `dataset` under the fixed protocol (see the module docstring); with
    `reference`, also KL(p_ref || p_model) and top-1 agreement on the same windows.

    Without a chunk size or cache, every window walks the decoder layers together, one layer at a time
    (so `model` may be a `ModelHost` streaming a model larger than memory); with one, each window runs
    through the whole model in memory."""
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"--chunk-size must be a positive number of tokens (got {chunk_size})")
    start = time.perf_counter()
    text = "\n\n".join(load_documents(dataset))
    windows = evaluation_windows(tokenizer, text, seq_len, max_tokens)
    host, ref = as_host(model), (as_host(reference) if reference is not None else None)
    if chunk_size or cache_factory is not None:
        if host.streamed:
            raise InputError(
                "a KV cache or --chunk-size needs the whole model in memory; it cannot be streamed"
            )
        scores = _whole_model_scores(host.model, windows, ref.model if ref else None, chunk_size, cache_factory,
                                     progress)  # fmt: skip
    else:
        scores = _layerwise_scores(host, windows, ref, progress)
    nll_sum, kl_sum, agree, count = scores
    nll = nll_sum / count
    if not math.isfinite(nll):
        raise InputError(
            "the model produced non-finite log-probabilities; its precision is probably too narrow "
            "(try --dtype float32)"
        )
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        windows=int(windows.shape[0]),
        seq_len=seq_len,
        bos=adds_bos(tokenizer),
        chunk_size=chunk_size,
        dataset=str(dataset),
        max_tokens=max_tokens,
        text_tokens=int(windows.shape[0] * (seq_len - 1 if adds_bos(tokenizer) else seq_len)),
        kl=kl_sum / count if reference is not None else None,
        top1_agreement=agree / count if reference is not None else None,
        elapsed_s=round(time.perf_counter() - start, 2),
    )


def score_window(
    logits: torch.Tensor, ids: torch.Tensor, ref_logits: torch.Tensor | None, totals: list
) -> None:
    """Add one window's NLL (and KL / top-1 against the reference) to `totals`."""
    targets = ids[0, 1:].to(logits.device)
    logp = F.log_softmax(logits[0, :-1].float(), dim=-1)
    totals[0] += float(-logp.gather(1, targets[:, None]).sum(dtype=torch.float64))
    totals[3] += targets.numel()
    if ref_logits is not None:
        ref_logp = F.log_softmax(ref_logits[0, :-1].float(), dim=-1)
        totals[1] += float((ref_logp.exp() * (ref_logp - logp)).sum(dtype=torch.float64))
        totals[2] += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())


def _whole_model_scores(model, windows, reference, chunk_size, cache_factory, progress) -> list:
    totals = [0.0, 0.0, 0, 0]  # nll, kl, top-1 agreements, predicted tokens
    for i in tqdm(range(windows.shape[0]), desc="evaluating", unit="window", disable=not progress):
        ids = windows[i : i + 1]
        ref = window_logits(reference, ids) if reference is not None else None
        score_window(window_logits(model, ids, chunk_size, cache_factory), ids, ref, totals)
    return totals


def _final_hidden(host: ModelHost, windows: torch.Tensor, progress: bool, desc: str) -> HiddenStore:
    """Every window's output of the last decoder layer, the windows walking the layers together."""
    with host.outside("input"):
        inputs = capture_inputs(host.model, windows, 1, host.device)
    store = HiddenStore(inputs.hidden, host.memory_budget)
    inputs.hidden = store
    try:
        for index in tqdm(range(len(host.layers)), desc=desc, unit="layer", disable=not progress):
            with host.layer(index) as layer:
                run_layer(layer, inputs, index)
    except BaseException:
        store.close()
        raise
    return store


def _layerwise_scores(host: ModelHost, windows, ref: ModelHost | None, progress: bool) -> list:
    try:
        mine = _final_hidden(host, windows, progress, "evaluating")
    except SinkQuantError:  # layers not called one after another: whole windows, in memory
        if host.streamed:
            raise
        return _whole_model_scores(host.model, windows, ref.model if ref else None, None, None, progress)
    totals = [0.0, 0.0, 0, 0]
    with mine, contextlib.ExitStack() as stack:
        theirs = stack.enter_context(_final_hidden(ref, windows, progress, "reference")) if ref else None
        stack.enter_context(host.outside("output"))
        if ref is not None:
            stack.enter_context(ref.outside("output"))
        for w in range(windows.shape[0]):
            ids = windows[w : w + 1]
            logits = head_logits(host.model, mine[w]).logits
            ref_logits = head_logits(ref.model, theirs[w]).logits if ref is not None else None
            score_window(logits, ids, ref_logits, totals)
    return totals
