"""Least-squares refit of a quantized layer's group parameters, with its integer codes held fixed.

GPTQ chooses each group's scale (and minimum) once, when the sweep reaches the group, from weights that
later columns' error updates have not yet touched; then it chooses the codes. With the codes fixed, the
layer's proxy error Σ_rows (w - ŵ)ᵀ H (w - ŵ) is a quadratic in the group parameters, because the
dequantized weight ŵ = code · scale + minimum is linear in them. So the best scales and minima for
the chosen codes are one small linear solve per output row: 2 unknowns per group (1 for symmetric
int4, whose minimum is tied to the scale) coupled through H. H couples the groups, so each row
has one system, not one per group.

`refit_group_params` does that solve; `gptq.py` alternates it with a GPTQ sweep on the refitted,
frozen parameters (`weights.gptq.refine_rounds`) and keeps, row by row, whichever candidate has the
lowest error. That way no round can make a row worse than GPTQ's own result.
"""

from __future__ import annotations

import torch

#: relative ridge on the normal equations: a group whose codes are all equal makes its scale and
#: minimum collinear; the ridge picks one solution instead of failing
_RIDGE = 1e-9
#: the most elements of the per-chunk intermediate [rows, bases, n, groups] (float64: 128 MiB)
_CHUNK_ELEMENTS = 1 << 24


def _bases(codes: torch.Tensor, symmetric: bool, levels: int) -> torch.Tensor:
    """[rows, k, n]: the columns of each row's design matrix before they are split by group: the codes
    (times the scale) and, for asymmetric groups, ones (times the minimum); symmetric int4 stores
    minimum = -half · scale, so its one basis is code - half."""
    if symmetric:
        return (codes - (levels + 1) // 2)[:, None]
    return torch.stack([codes, torch.ones_like(codes)], dim=1)


def refit_group_params(
    weight: torch.Tensor,
    codes: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    symmetric: bool,
    levels: int = 15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and minimum per (row, group) minimising Σ_r (w_r - ŵ_r)ᵀ H (w_r - ŵ_r) for fixed codes.

    weight, codes: [out, n] (the kept columns in natural order; codes as numbers in [0, levels]);
    hessian: [n, n] on the same columns. Returns float64 (scale, minimum), each [out, groups]; the
    caller rounds them to the stored dtype and checks the error again (the rounding can cost a row)."""
    out, n = weight.shape
    groups = -(-n // group_size)
    pad = groups * group_size - n
    # the products run in H's dtype (float32 for the layers wide enough that gptq.py keeps H so), the
    # small systems in float64
    dtype = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
    h = torch.nn.functional.pad(hessian.to(dtype), (0, pad, 0, pad)).reshape(
        groups, group_size, groups, group_size
    )
    k = 1 if symmetric else 2
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (k * groups * group_size * groups))
    scale = torch.empty(out, groups, dtype=torch.float64)
    minimum = torch.empty(out, groups, dtype=torch.float64)
    eye = torch.eye(k * groups, dtype=torch.float64)
    for r0 in range(0, out, rows_per_chunk):
        r1 = min(out, r0 + rows_per_chunk)
        c = torch.nn.functional.pad(codes[r0:r1].to(dtype), (0, pad))
        # padded columns: H's padded rows and columns are zero, so whatever the bases hold there adds nothing
        basis = _bases(c, symmetric, levels).reshape(r1 - r0, k, groups, group_size)
        w = torch.nn.functional.pad(weight[r0:r1].to(dtype), (0, pad)).reshape(r1 - r0, groups, group_size)
        # hb[r, b, g, i, h] = Σ_j H[g, i, h, j] basis[r, b, h, j]
        hb = torch.einsum("gihj,rbhj->rbgih", h, basis)
        # normal matrix [r, a, g, b, h] and right-hand side [r, a, g]
        normal = (
            torch.einsum("ragi,rbgih->ragbh", basis, hb).reshape(r1 - r0, k * groups, k * groups).double()
        )
        hw = torch.einsum("gihj,rhj->rgi", h, w)
        rhs = torch.einsum("ragi,rgi->rag", basis, hw).reshape(r1 - r0, k * groups).double()
        level = normal.diagonal(dim1=1, dim2=2).abs().mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
        theta = torch.linalg.solve(normal + _RIDGE * level[:, None, None] * eye, rhs)
        scale[r0:r1] = theta[:, :groups]
        if symmetric:
            minimum[r0:r1] = -((levels + 1) // 2) * theta[:, :groups]
        else:
            minimum[r0:r1] = theta[:, groups:]
    return scale, minimum


def row_errors(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """float64 [out]: (w_r - ŵ_r)ᵀ H (w_r - ŵ_r) per row, the layer's output error on the calibration
    tokens that row by row GPTQ minimises."""
    dtype = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
    diff = weight.to(dtype) - dequantized.to(dtype)
    return ((diff @ hessian.to(dtype)) * diff).sum(1, dtype=torch.float64)
