"""Forward hooks that measure one calibration pass, layer by layer.

Each collector keeps small running statistics and drops the tensors it saw, so no full attention map
or hidden state outlives the layer that produced it.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..architecture import decoder_layers, hidden_of, linear_in_features, linear_modules


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention block inside a decoder layer (by class name: `...Attention`)."""
    for _, module in layer.named_modules():
        if type(module).__name__.endswith("Attention") and module is not layer:
            return module
    raise RuntimeError(f"no attention module found in {type(layer).__name__}")


class _Hooks:
    def __init__(self) -> None:
        self.handles: list = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class AttentionCollector(_Hooks):
    """Mean attention each position receives from the queries after it, per (layer, head).

    Needs eager attention (the attention module then returns its probabilities as output[1]).
    Keeps, summed over samples, the received mean of the first `track_positions` positions per
    (layer, head), and for every position of the current batch the number of (layer, head) pairs whose
    received mean exceeds `epsilon` (for content sinks).
    """

    def __init__(self, model: nn.Module, epsilon: float, track_positions: int, min_queries: int) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.track = track_positions
        self.min_queries = min_queries
        self.layers = decoder_layers(model)
        self.position_sums: torch.Tensor | None = None  # [layers, heads, track]
        self.samples = 0
        self.counts: torch.Tensor | None = None  # [samples, seq] pairs above epsilon
        self.sample = 0  # the sample the next attention call belongs to
        self.num_heads = 0
        self.missing_layers: list[int] = []
        for idx, layer in enumerate(self.layers):
            attn = attention_module(layer)
            self.handles.append(
                attn.register_forward_hook(lambda _m, _i, out, idx=idx: self._on_attention(idx, out))
            )

    def begin(self, samples: int, seq: int) -> None:
        """Make room for `samples` samples of `seq` tokens (layers may visit them in any order)."""
        self.counts = torch.zeros(samples, seq, dtype=torch.int32)
        self.samples = samples

    def _on_attention(self, idx: int, out) -> None:
        probs = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if probs is None or probs.dim() != 4:
            self.missing_layers.append(idx)
            return
        probs = probs.float()
        b, h, q, k = probs.shape
        self.num_heads = h
        # Only the last k queries/keys align when q == k (no cache during calibration).
        received = probs.sum(dim=2) - torch.diagonal(probs, dim1=2, dim2=3)  # [b, h, k]: from queries after k
        later = torch.arange(
            k - 1, -1, -1, dtype=torch.float32, device=probs.device
        )  # queries after j: k-1-j
        mean_after = received / later.clamp(min=1)
        if self.position_sums is None:
            self.position_sums = torch.zeros(len(self.layers), h, self.track)
        t = min(self.track, k)
        self.position_sums[idx, :, :t] += mean_after[:, :, :t].sum(dim=0).cpu()
        scorable = later >= self.min_queries
        above = (mean_after > self.epsilon) & scorable
        self.counts[self.sample : self.sample + b] += above.sum(dim=1).to(torch.int32).cpu()

    def shares(self) -> torch.Tensor:
        """Share of (layer, head) pairs sinking on each position of each sample [samples, seq]."""
        pairs = max(1, len(self.layers) * self.num_heads)
        return self.counts.float() / pairs

    def scorable_positions(self, seq: int) -> torch.Tensor:
        return torch.arange(seq - 1, -1, -1) >= self.min_queries

    def head_means(self) -> torch.Tensor:
        """[layers, heads, track] mean attention received, averaged over samples."""
        return self.position_sums / max(1, self.samples)


class ActivationCollector(_Hooks):
    """Largest |hidden state| per decoder layer output: value, dim, position, and the layer median."""

    def __init__(self, model: nn.Module, top_dims: int = 4) -> None:
        super().__init__()
        self.layers = decoder_layers(model)
        n = len(self.layers)
        self.top_dims = top_dims
        self.best = [(-1.0, 0, 0, 0, 0)] * n  # (max_abs, dim, position, sample, token_id)
        self.dim_max: list[torch.Tensor | None] = [None] * n  # per-dim max |h| over all tokens
        self.medians: list[list[float]] = [[] for _ in range(n)]
        self.pos0: list[tuple[float, int]] = [(0.0, 0)] * n
        self.input_ids: torch.Tensor | None = None
        self.sample_offset = 0
        for idx, layer in enumerate(self.layers):
            self.handles.append(
                layer.register_forward_hook(lambda _m, _i, out, idx=idx: self._on_layer(idx, out))
            )

    def _on_layer(self, idx: int, out) -> None:
        h = hidden_of(out).detach().float().abs()  # [b, seq, hidden]
        b, s, d = h.shape
        flat = h.reshape(b, -1)
        values, where = flat.max(dim=1)
        for i in range(b):
            v = float(values[i])
            if v > self.best[idx][0]:
                pos, dim = divmod(int(where[i]), d)
                token = int(self.input_ids[i, pos]) if self.input_ids is not None else -1
                self.best[idx] = (v, dim, pos, self.sample_offset + i, token)
            self.medians[idx].append(float(h[i].median()))
        per_dim = h.amax(dim=(0, 1)).cpu()
        self.dim_max[idx] = (
            per_dim if self.dim_max[idx] is None else torch.maximum(self.dim_max[idx], per_dim)
        )
        p0, p0_dim = h[:, 0, :].max(dim=-1)
        j = int(p0.argmax())
        if float(p0[j]) > self.pos0[idx][0]:
            self.pos0[idx] = (float(p0[j]), int(p0_dim[j]))


class LinearInputCollector(_Hooks):
    """Per input channel of every linear layer: max |x| and the sums of |x| and of x² over calibration
    tokens, and, for full calibration sequences (`seq_len` long), those sums at each of the first `track`
    positions, so the report can give the means without the sink positions it finds (calibration learns
    where the sinks are only after the last layer, so the leading positions are kept apart until then)."""

    def __init__(self, model: nn.Module, seq_len: int | None = None, track: int = 0) -> None:
        super().__init__()
        self.seq_len, self.track = seq_len, track
        self.max_abs: dict[str, torch.Tensor] = {}
        self.sum_abs: dict[str, torch.Tensor] = defaultdict(lambda: 0)
        self.sum_sq: dict[str, torch.Tensor] = defaultdict(lambda: 0)
        self.tokens: dict[str, int] = defaultdict(int)
        self.leading_abs: dict[str, torch.Tensor] = defaultdict(lambda: 0)  # [track, in] float64
        self.leading_sq: dict[str, torch.Tensor] = defaultdict(lambda: 0)  # [track, in] float64
        self.sequences: dict[str, int] = defaultdict(int)  # full sequences behind leading_abs
        self.in_features: dict[str, int] = {}
        for name, module in linear_modules(model).items():
            self.in_features[name] = linear_in_features(module)
            self.handles.append(
                module.register_forward_pre_hook(lambda _m, args, name=name: self._on_input(name, args))
            )

    def _on_input(self, name: str, args) -> None:
        x = args[0].detach()
        if self.track and x.dim() == 3 and x.shape[1] == self.seq_len:
            lead = x[:, : self.track].float()
            self.leading_abs[name] = self.leading_abs[name] + lead.abs().sum(dim=0, dtype=torch.float64).cpu()
            self.leading_sq[name] = (
                self.leading_sq[name] + lead.square().sum(dim=0, dtype=torch.float64).cpu()
            )
            self.sequences[name] += x.shape[0]
        x = x.reshape(-1, x.shape[-1]).float().abs()  # a fresh tensor: squared in place below
        peak = x.amax(dim=0).cpu()
        self.max_abs[name] = peak if name not in self.max_abs else torch.maximum(self.max_abs[name], peak)
        self.sum_abs[name] = self.sum_abs[name] + x.sum(dim=0, dtype=torch.float64).cpu()
        self.sum_sq[name] = self.sum_sq[name] + x.square_().sum(dim=0, dtype=torch.float64).cpu()
        self.tokens[name] += x.shape[0]

    def mean_abs_without(self, name: str, positions: list[int]) -> torch.Tensor | None:
        """Mean |x| per channel over the tokens not at `positions` (leading positions of every full
        sequence); None when none of `positions` was tracked for this layer."""
        return self._mean_without(self.sum_abs[name], self.leading_abs[name], name, positions)

    def mean_abs(self, name: str) -> torch.Tensor:
        """Mean |x| per channel over all calibration tokens."""
        return (self.sum_abs[name] / max(1, self.tokens[name])).float()

    def mean_square(self, name: str) -> torch.Tensor:
        """Mean x² per channel over all calibration tokens."""
        return (self.sum_sq[name] / max(1, self.tokens[name])).float()

    def mean_square_without(self, name: str, positions: list[int]) -> torch.Tensor | None:
        """Mean x² per channel over the tokens not at `positions`, as `mean_abs_without`."""
        return self._mean_without(self.sum_sq[name], self.leading_sq[name], name, positions)

    def _mean_without(self, total, leading, name: str, positions: list[int]) -> torch.Tensor | None:
        positions = [p for p in positions if p < self.track]
        if not positions or not self.sequences[name]:
            return None
        left = self.tokens[name] - self.sequences[name] * len(positions)
        rest = total - leading[positions].sum(dim=0)
        return (rest.clamp(min=0) / max(1, left)).float()
