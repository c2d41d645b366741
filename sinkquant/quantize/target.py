"""GPTQ toward the float model (`weights.gptq.target: model`), after GPTAQ (Li et al. 2025).

Plain GPTQ makes each linear layer reproduce its own float output on the inputs X it now gets from the
already quantized layers before it: min ‖W X - Q X‖. Those inputs are not the float model's inputs X̃,
so whatever error the earlier layers left stays in. With `target: model` each layer aims at the float
model's output at that point instead, min ‖W X̃ - Q X‖, and so corrects some of the error it inherits.

The target splits exactly: with C = X̃ Xᵀ and H = X Xᵀ, the unconstrained optimum is W' = W C H⁻¹, and
‖W X̃ - Q X‖² = ‖W X̃ - W' X‖² + ‖(W' - Q) X‖² for every Q (the first residual is orthogonal to
X's rows). So running plain GPTQ on W' with the usual H minimises the new target, and nothing in
the column sweep changes. W' is computed as W + W (C - H)(H + λI)⁻¹ with GPTQ's damping λ. Where the two
inputs agree, C = H and W' = W.

The float model's inputs come from a second stream of hidden states. Each decoder layer first runs
with its float weights on the float hidden states, and `ReferenceInputs` records every linear
layer's input. Then the layer runs as usual on the quantized stream, and each observer pairs
its input with the recorded one for the same tokens (`GPTQObserver`). The outlier columns are part
of W', so they are stored corrected, not as the source had them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import SinkQuantError
from .hessian import CrossAccumulator, HessianAccumulator, damping_level


class ReferenceInputs:
    """Each linear layer's input in the float model's forward of the current layer (or batch), handed
    out in order: `take(name, n)` gives the next n samples of `name`'s recorded input."""

    def __init__(self) -> None:
        self._inputs: dict[str, torch.Tensor] = {}
        self._cursor: dict[str, int] = {}
        self.recording = False

    @contextlib.contextmanager
    def record(self, modules: dict[str, nn.Module]):
        """Inside the block, forward calls of `modules` record their inputs (replacing the previous
        recording); observers ignore what they see meanwhile (`recording` is set)."""
        self._inputs, self._cursor = {}, {}

        def hook(name: str):
            def pre_hook(module, args):
                if name not in self._inputs:
                    self._inputs[name] = args[0].detach()
                    self._cursor[name] = 0

            return pre_hook

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        self.recording = True
        try:
            yield
        finally:
            self.recording = False
            for handle in handles:
                handle.remove()

    def take(self, name: str, n: int) -> torch.Tensor:
        if name not in self._inputs:
            raise SinkQuantError(f"{name} was not called in the float model's forward of its layer")
        start = self._cursor[name]
        self._cursor[name] = start + n
        return self._inputs[name][start : start + n]

    def clear(self) -> None:
        self._inputs, self._cursor = {}, {}


class GPTQObserver:
    """What GPTQ accumulates from one linear layer's input: H, and with `references` the cross term
    against the float model's input for the same tokens."""

    def __init__(
        self,
        name: str,
        in_features: int,
        sink_positions: list[int],
        track_max: bool,
        references: ReferenceInputs | None,
    ) -> None:
        self.name = name
        self.hessians = HessianAccumulator(in_features, sink_positions, track_max=track_max)
        self.references = references
        self.crosses = CrossAccumulator(in_features, sink_positions) if references is not None else None
        self._corrections: dict[tuple, torch.Tensor] = {}

    def add(self, x: torch.Tensor) -> None:
        if self.references is not None and self.references.recording:
            return  # the float model's own pass
        self.hessians.add(x)
        if self.crosses is not None:
            self.crosses.add(x, self.references.take(self.name, x.shape[0]))

    def target_weight(
        self,
        weight: torch.Tensor,
        hessian: torch.Tensor,
        sink_tokens: str,
        kept: torch.Tensor,
        damping: float,
    ) -> torch.Tensor:
        """W' = W + W (C - H)(H + λI)⁻¹ (float32 [out, in]), λ = damping x mean diag(H) over the `kept`
        columns as GPTQ damps. The [in, in] factor is computed once per set of kept columns and shared by
        the linear layers fed this input (q/k/v, gate/up)."""
        key = (sink_tokens, kept.numpy().tobytes(), damping)
        if key not in self._corrections:
            h = hessian.double()
            damped = h + damping_level(h, damping, kept) * torch.eye(h.shape[0], dtype=h.dtype)
            factor, info = torch.linalg.cholesky_ex(damped)
            if int(info) != 0:
                raise SinkQuantError(f"GPTQ target: model: H + λI of {self.name} is not positive definite")
            difference = self.crosses.cross(sink_tokens) - h
            # K = (C - H)(H + λI)⁻¹, from (H + λI) Kᵀ = (C - H)ᵀ (H is symmetric)
            self._corrections[key] = torch.cholesky_solve(difference.T.contiguous(), factor).T
        return (weight.double() + weight.double() @ self._corrections[key]).float()
