"""`TokenFlags`: the record, shared by every layer of one cache, of which tokens are real (not
padding) and which are sinks. Nothing here sees a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class TokenFlags:
    """Per-token facts shared by all layers of one cache, indexed by absolute token position.

    real [B, T]: not padding. sink [T] / leading [T]: the position is kept at full precision (union over
    the batch, so every row stores the same columns). Flags of positions below `known` are final: a
    layer may quantize only those. Leading sinks are counted from each row's first real token.
    """

    def __init__(self, leading_positions: Sequence[int], detecting: bool) -> None:
        self.leading_positions = sorted(set(int(p) for p in leading_positions))
        self.detecting = detecting
        self.real: torch.Tensor | None = None
        self.sink = torch.zeros(0, dtype=torch.bool)
        self.leading = torch.zeros(0, dtype=torch.bool)
        self.known = 0
        self.open: tuple[int, int] | None = None  # (start, length) of the chunk the running forward feeds

    @property
    def length(self) -> int:
        return self.sink.numel()

    def begin(self, batch: int, n: int, real: torch.Tensor | None, device: torch.device) -> None:
        """Register the next n tokens (real: bool [B, n], None for no padding) before a forward runs them."""
        self.known = self.length  # earlier chunks are final, even if a detection pass never ran
        real = (
            torch.ones(batch, n, dtype=torch.bool, device=device)
            if real is None
            else real.to(device, torch.bool)
        )
        if self.real is None:
            self.real = real[:, :0]
            self.sink, self.leading = self.sink.to(device), self.leading.to(device)
        count = self.real.sum(dim=1, keepdim=True)
        index = count + real.long().cumsum(dim=1) - 1  # each real token's rank among its row's real tokens
        wanted = torch.tensor(self.leading_positions, dtype=torch.long, device=device)
        leading = (real & torch.isin(index, wanted)).any(dim=0)
        self.open = (self.length, n)
        self.real = torch.cat([self.real, real], dim=1)
        self.leading = torch.cat([self.leading, leading])
        self.sink = torch.cat([self.sink, leading])
        if not self.detecting:
            self.known = self.length

    def detected(self, flags: torch.Tensor) -> None:
        """flags bool [B, n] from the detection hook, for the chunk opened by `begin`."""
        if self.open is None:
            return
        start, n = self.open
        if flags.shape[-1] == n:
            hit = (flags.to(self.sink.device) & self.real[:, start : start + n]).any(dim=0)
            self.sink[start : start + n] |= hit
        self.known = start + n

    def close(self) -> None:
        self.open = None

    def ensure(self, batch: int, total: int, device: torch.device) -> None:
        """Cover `total` tokens even when no hook registered them (a cache used without `attach`)."""
        if total > self.length:
            self.begin(batch, total - self.length, None, device)
            self.known, self.open = self.length, None

    def has_padding(self) -> bool:
        return self.real is not None and not bool(self.real.all())

    def crop(self, total: int) -> None:
        self.sink, self.leading = self.sink[:total], self.leading[:total]
        if self.real is not None:
            self.real = self.real[:, :total]
        self.known = min(self.known, total)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.real is not None:
            self.real = fn(self.real)
