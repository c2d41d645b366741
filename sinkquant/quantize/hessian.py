"""The Hessian GPTQ works from: H = 2/n Σ x xᵀ of a linear layer's inputs, accumulated over the
calibration tokens, and the upper Cholesky factor of its inverse.

xᵀx is a float32 matmul per batch, summed into float64; the factorisation runs in float64 (in float32
from WIDE_FACTOR inputs, where H itself is then kept in float32). Tokens at
the report's sink positions enter H as they are (`include`), not at all (`exclude`), or clipped per
channel to the largest |x| of the other tokens (`cap`).
"""

from __future__ import annotations

import warnings

import torch

from ..errors import SinkQuantError

_RETRIES = 4


def split_sink_rows(x: torch.Tensor, sink_positions: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """x [..., seq, in] (or [tokens, in]: no positions, every row a body row) -> (the rows at
    `sink_positions` or None, the other rows), each [rows, in]."""
    if x.dim() < 3:
        return None, x
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    sinks = [p for p in sink_positions if p < x.shape[1]]
    if not sinks:
        return None, x.reshape(-1, x.shape[-1])
    body_mask = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    body_mask[sinks] = False
    return x[:, sinks].reshape(-1, x.shape[-1]), x[:, body_mask].reshape(-1, x.shape[-1])


def damping_level(hessian: torch.Tensor, damping: float, columns: torch.Tensor) -> float:
    """damping x the mean of diag(H) over the live (diag > 0) entries among `columns` (1 if none):
    what GPTQ adds to H's diagonal."""
    diag = hessian.diagonal()[columns]
    live = diag > 0
    return damping * (float(diag[live].mean()) if bool(live.any()) else 1.0)


class HessianAccumulator:
    """Σ x xᵀ of one linear layer's input, with the rows at sink positions kept apart.

    `add(x)` takes x [batch, seq, in] (or [tokens, in], then positions are not known and every row is
    a body row). The body sum is float64 (each batch's product in the input's dtype: float32, or float64
    for GPTQ's `precision: float64`); the sink rows are few (one
    or two per sample) and stored as they are, so `hessian(mode)` can include, drop or cap them.
    `track_max=False` skips the per-channel max |x| of the body rows that only `cap` needs (an extra
    pass over every batch: about 4% of a GPTQ run)."""

    def __init__(self, in_features: int, sink_positions: list[int], track_max: bool = True) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0
        self.sink_positions = sorted(set(sink_positions))
        self.sink_rows: list[torch.Tensor] = []
        self.body_max = torch.zeros(in_features) if track_max else None
        self._hessians: dict[str, torch.Tensor] = {}

    def add(self, x: torch.Tensor) -> None:
        if self.sum is None:
            raise ValueError("inputs added after the Hessian was taken")
        x = x.detach()
        # float64 inputs (GPTQ's portable numerics) keep their precision, and their products are float64
        sink_rows, body = split_sink_rows(x if x.dtype == torch.float64 else x.float(), self.sink_positions)
        if sink_rows is not None:
            self.sink_rows.append(sink_rows.cpu())
        _add_gram_(self.sum, body)
        self.count += body.shape[0]
        if body.shape[0] and self.body_max is not None:
            low, high = torch.aminmax(body, dim=0)  # max |x| without an |x| copy of the batch
            self.body_max = torch.maximum(self.body_max, torch.maximum(high, -low).cpu())

    def hessian(self, sink_tokens: str = "include") -> torch.Tensor:
        """float64 [in, in]: 2/n Σ x xᵀ with the sink rows included, excluded or capped. The same
        tensor for every call (linear layers sharing an input share it, and `gptq_quantize_weight` can
        reuse its factorisation); callers must not modify it. The sum is turned into the Hessian in
        place (a wide layer's sum is as big as its Hessian, and only one is needed), so nothing can be
        added afterwards and one accumulator gives one `sink_tokens` mode."""
        if sink_tokens not in self._hessians:
            if sink_tokens == "cap" and self.body_max is None:
                raise ValueError("sink_tokens 'cap' needs an accumulator made with track_max=True")
            if self.sum is None:
                raise ValueError(f"this accumulator already gave its Hessian for {', '.join(self._hessians)}")
            self._hessians[sink_tokens] = self._hessian(sink_tokens)
        return self._hessians[sink_tokens]

    def _hessian(self, sink_tokens: str) -> torch.Tensor:
        h, n = self.sum, self.count
        self.sum = None
        if sink_tokens != "exclude" and self.sink_rows:
            rows = torch.cat(self.sink_rows)
            if sink_tokens == "cap":
                if self.body_max is None:
                    raise ValueError("sink_tokens 'cap' needs an accumulator made with track_max=True")
                rows = torch.minimum(torch.maximum(rows, -self.body_max), self.body_max)
            h += (rows.T @ rows).double()
            n += rows.shape[0]
        h.mul_(2.0 / max(n, 1))
        # a wide layer factors in float32 (see inverse_hessian_factor): its H is kept in float32 from
        # here on, so the 512 MiB float64 sum of an 8192-wide layer is not held beside the factor's copy
        return _float32_by_rows(h) if h.shape[0] >= WIDE_FACTOR else h


_ROWS_PER_COPY = 256  # rows per step where a whole-matrix temporary would double a wide layer's memory


def _float32_by_rows(h: torch.Tensor) -> torch.Tensor:
    """h as float32, converted a block of rows at a time (h is released by the caller)."""
    out = torch.empty(h.shape, dtype=torch.float32)
    for a in range(0, h.shape[0], _ROWS_PER_COPY):
        out[a : a + _ROWS_PER_COPY] = h[a : a + _ROWS_PER_COPY]
    return out


def _gather_square(h: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """h[index][:, index] as `dtype`, a block of rows at a time (the same values as one advanced index,
    without a whole copy in h's dtype beside the result)."""
    out = torch.empty(index.numel(), index.numel(), dtype=dtype)
    for a in range(0, index.numel(), _ROWS_PER_COPY):
        out[a : a + _ROWS_PER_COPY] = h[index[a : a + _ROWS_PER_COPY, None], index]
    return out


def _rotate_half_turn_(m: torch.Tensor) -> torch.Tensor:
    """m.flip(0, 1) in place (row i becomes row n-1-i reversed), a block of rows at a time."""
    n = m.shape[0]
    for a in range(0, n // 2, _ROWS_PER_COPY):
        b = min(a + _ROWS_PER_COPY, n // 2)
        top = m[a:b].flip(0, 1)
        m[a:b] = m[n - b : n - a].flip(0, 1)
        m[n - b : n - a] = top
    if n % 2:
        m[n // 2] = m[n // 2].flip(0)
    return m


def _add_gram_(total: torch.Tensor, x: torch.Tensor) -> None:
    """total (CPU) += xᵀx for x [tokens, in], from the float32 blocks on and above the diagonal only (the
    rest is their transpose): each entry is the same BLAS dot product over the tokens as in one `x.T @
    x`, with about 3/8 fewer multiplications at 4 blocks, and no whole [in, in] float32 product or
    float64 copy of it in memory."""
    width = x.shape[1]
    parts = max(1, min(4, width // 128))
    step = -(-width // parts)
    xt = x.T
    for i in range(0, width, step):
        for j in range(i, width, step):
            block = (xt[i : i + step] @ x[:, j : j + step]).cpu()
            total[i : i + step, j : j + step] += block
            if j != i:
                total[j : j + step, i : i + step] += block.T


def _gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx as float32, by `_add_gram_`'s blocks."""
    out = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
    _add_gram_(out, x)
    return out


#: kept columns from which the inverse factor is computed in float32 (see `inverse_hessian_factor`)
WIDE_FACTOR = 4096


def inverse_hessian_factor(
    hessian: torch.Tensor,
    damping: float,
    name: str,
    mean_over: int | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damping * mean(diag H) I)⁻¹ (UᵀU = the inverse), float64 (float32 from WIDE_FACTOR columns),
    for H restricted to `columns` (in that order; default all); retried with 10x damping. The mean is
    over the live (diag > 0) entries among the first `mean_over` of those columns (default all).

    With J the reversal of rows and columns, JHJ = LLᵀ gives H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), and J L⁻¹ J is
    upper triangular with a positive diagonal: U itself. One Cholesky and one triangular solve instead
    of forming H⁻¹ explicitly and factoring it again, the costliest step of the classic recipe. The
    Cholesky runs in place on one reversed copy of the restricted H (gathered a block of rows at a
    time), the solve writes L⁻¹ into one more matrix (in place for wide float32 layers), which is then
    turned in place: H and two matrices of its size, not five."""
    columns = torch.arange(hessian.shape[0]) if columns is None else columns
    mean = damping_level(hessian, 1.0, columns[:mean_over])
    reverse = columns.flip(0)
    info = torch.empty((), dtype=torch.int32)
    # float64 up to WIDE_FACTOR columns; wider layers factor in float32, as the GPTQ authors do for
    # every layer (the sum stays float64): their float64 factor alone would be 512 MiB at 8192 columns
    dtype = torch.float64 if reverse.numel() < WIDE_FACTOR else torch.float32
    for attempt in range(_RETRIES + 1):
        fraction = damping * 10**attempt
        work = _gather_square(hessian, reverse, dtype)  # J H J on the kept columns: one copy
        if attempt == 0 and not bool(torch.isfinite(work).all()):
            raise SinkQuantError(f"the calibration inputs of {name} hold NaN or Inf; the model overflows")
        work.diagonal().add_(fraction * mean)
        torch.linalg.cholesky_ex(work, out=(work, info))  # work is now L
        if int(info) == 0:
            inverse = torch.eye(work.shape[0], dtype=work.dtype, device=work.device)
            if dtype == torch.float64:
                # out of place: LAPACK's in-place solve rounds differently in the last bits, and GPTQ
                # turns last bits into other codes; narrow layers keep the numbers they always had
                inverse = torch.linalg.solve_triangular(work, inverse, upper=False)  # L⁻¹
            else:  # a wide layer: one matrix less
                torch.linalg.solve_triangular(work, inverse, upper=False, out=inverse)
            del work
            upper = _rotate_half_turn_(inverse)  # J L⁻¹ J
            if bool(torch.isfinite(upper).all()):
                return upper, fraction
        del work
        if attempt < _RETRIES:
            warnings.warn(
                f"GPTQ: the Hessian of {name} is not positive definite at damping {fraction:g}; "
                f"retrying with {fraction * 10:g}",
                stacklevel=2,
            )
    raise SinkQuantError(f"GPTQ could not factor the Hessian of {name} even at damping {fraction:g}")
