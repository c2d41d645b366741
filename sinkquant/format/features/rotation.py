"""`weights.rotation`: an input rotation (incoherence processing, as in QuIP#, QuaRot and HIGGS) of a
linear layer's kept columns.

A layer stores W' = W R instead of W, with R orthogonal, and rotates its input first: (x R) W'ᵀ = x Wᵀ.
R mixes each input with its neighbours, so a group's range is set by many comparable values instead
of a few large ones and the rounding error is spread evenly; GPTQ then rounds W' against the rotated
Hessian Rᵀ H R.

R here is block diagonal over the kept input columns (in ascending order): blocks of `block` columns,
the last ones the powers of two that make up the rest (570 kept columns, blocks of 32: 17 of 32, then
16, 8 and 2), each the normalised Sylvester-Hadamard matrix Hb, with a random sign per column:
R = diag(s) · blockdiag(Hb). Outlier columns are outside it: their massive activations stay in their
own exact columns instead of being spread over a block's int4 inputs. At run time the rotation is a
`block`-point transform per input row, a small cost beside the layer's matmul.

The signs are drawn from a generator seeded by the layer's input width (so every layer of one width
gets the same ones), and stored with the layer packed eight to a byte, so a checkpoint never depends on
the random generator that drew them.

The feature (`Rotation`) stores the signs, rotates the weight and Hessian before GPTQ and the inputs
at run time; no export format stores it, so it needs sinkquant's own layer wherever it runs.
"""

from __future__ import annotations

from functools import cache

import torch

from .base import BufferSpecs, LayerFeature, register_feature

#: the block sizes a layer may have: powers of two, at most one int4 group (recipe.RotationBlock, the
#: recipe's field, lists the same; tests/format/test_features.py checks they agree)
BLOCKS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)


@cache
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), normalised to be orthogonal (and symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def block_sizes(n: int, block: int) -> list[int]:
    """The diagonal blocks of n columns: `block` as often as it fits, then the rest's powers of two."""
    rest = n % block
    return [block] * (n // block) + [2**k for k in range(block.bit_length(), -1, -1) if rest & 2**k]


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 [n] -> uint8 [ceil(n / 8)], bit k of byte i set where signs[8i + k] is -1."""
    negative = torch.nn.functional.pad((signs < 0).to(torch.uint8), (0, -signs.numel() % 8))
    weights = 2 ** torch.arange(8, dtype=torch.uint8)
    return (negative.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_signs`: float32 ±1 [n]."""
    bits = (packed.to(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:n].float()


def draw_signs(in_features: int, n_kept: int) -> torch.Tensor:
    """The signs of a layer of `in_features` inputs of which `n_kept` are rotated: float32 ±1 [n_kept]."""
    gen = torch.Generator().manual_seed(in_features)
    return torch.randint(0, 2, (n_kept,), generator=gen).to(torch.float32) * 2 - 1


class InputRotation:
    """R = diag(signs) · blockdiag(Hb) over n = len(signs) columns; applies R or Rᵀ along a tensor's last
    dimension, computing in the tensor's dtype (float32 for lower precisions) and returning that dtype.

    A decode step rotates one row per layer, where each op's fixed cost dominates, so the transform is
    four ops: the signs, one batched product for the full blocks, one product with the (small, dense)
    block-diagonal matrix of the rest, and a concatenation."""

    def __init__(self, signs: torch.Tensor, block: int) -> None:
        if block not in BLOCKS:
            raise ValueError(f"rotation block {block} is not one of {BLOCKS}")
        self.signs, self.block = signs.float(), block
        self.sizes = block_sizes(signs.numel(), block)
        self.full = self.sizes.count(block) * block  # columns in whole blocks; the rest in smaller ones
        self._parts: dict[tuple[torch.dtype, torch.device], tuple] = {}
        self.key = (block, pack_signs(self.signs).numpy().tobytes())  # InputTransform's

    def __len__(self) -> int:
        return self.signs.numel()

    def _parts_for(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(signs, Hb, blockdiag of the rest's blocks or None) in `dtype` on `device`, built once each."""
        parts = self._parts.get((dtype, device))
        if parts is None:
            rest = self.sizes[self.full // self.block :]
            rest_matrix = torch.block_diag(*[_hadamard(b, dtype, device) for b in rest]) if rest else None
            parts = (
                self.signs.to(device=device, dtype=dtype),
                _hadamard(self.block, dtype, device),
                rest_matrix,
            )
            self._parts[(dtype, device)] = parts
        return parts

    def _blocks(self, t: torch.Tensor, hb: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
        """t [..., n] times blockdiag(Hb) (symmetric, so also its transpose)."""
        if not self.full:
            return t @ rest
        lead = t.shape[:-1]
        head = (t[..., : self.full].reshape(-1, self.block) @ hb).reshape(*lead, self.full)
        return head if rest is None else torch.cat([head, t[..., self.full :] @ rest], -1)

    def _compute_dtype(self, t: torch.Tensor) -> torch.dtype:
        return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """t R along the last dimension: rotated inputs, or the rows of the weight to store (W R)."""
        dtype = self._compute_dtype(t)
        signs, hb, rest = self._parts_for(dtype, t.device)
        out = self._blocks(t.to(dtype) * signs, hb, rest)
        return out if out.dtype == t.dtype else out.to(t.dtype)

    def apply_transposed(self, t: torch.Tensor) -> torch.Tensor:
        """t Rᵀ along the last dimension: a stored weight's rows back in the input basis (W' Rᵀ = W)."""
        dtype = self._compute_dtype(t)
        signs, hb, rest = self._parts_for(dtype, t.device)
        return (self._blocks(t.to(dtype), hb, rest) * signs).to(t.dtype)

    def rotate_columns(self, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """t [..., in] with its `keep` columns times R (the others as they are), in float64: Q the
        identity on the other columns and R on `keep`, this is t Q."""
        out = t.to(torch.float64)  # a copy for lower precisions; cloned below otherwise
        out = out.clone() if out is t else out
        out[..., keep] = self.apply(out[..., keep])
        return out

    def rotate_hessian(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Qᵀ H Q of a symmetric [in, in] H (Q as in `rotate_columns`), in float64."""
        return self.rotate_columns(self.rotate_columns(h, keep).T, keep)  # (H Q)ᵀ Q, H symmetric


@register_feature
class Rotation(LayerFeature):
    field = "rotation"
    since = 5
    export_refusal = ("layers with rotated inputs", "no export format stores the rotation")

    def extra_buffers(self, spec, shards: int) -> BufferSpecs:
        # shared by a serving engine's fused shards: the signs depend only on the width and kept columns
        return {"input_signs": ((-(-spec.kept // 8),), torch.uint8)}

    def describe(self, spec) -> str:
        return f"inputs rotated (blocks of {spec.rotation})"

    def prepare(self, spec, weight, hessian, keep, cache=None):
        """W Q (float32) and Qᵀ H Q (H's dtype), Q rotating the kept columns; the rotation is the state.
        Qᵀ H Q is computed once for the linears that share H and outlier columns (q/k/v, gate/up):
        `cache` holds H beside it, so H's id stays its own."""
        rotation = InputRotation(draw_signs(spec.in_features, keep.numel()), spec.rotation)
        rotated = rotation.rotate_columns(weight, keep).float()
        if hessian is None:
            return rotated, None, rotation
        key = ("rotated", id(hessian), keep.numpy().tobytes(), rotation.block)
        if cache is None or key not in cache:
            rotated_hessian = rotation.rotate_hessian(hessian, keep).to(hessian.dtype)
            if cache is None:
                return rotated, rotated_hessian, rotation
            cache[key] = (hessian, rotated_hessian)
        return rotated, cache[key][1], rotation

    def transform_kept(self, state, kept_weight):
        if len(state) != kept_weight.shape[1]:
            raise ValueError(
                f"the rotation spans {len(state)} columns; the layer keeps {kept_weight.shape[1]}"
            )
        return state.apply(kept_weight)

    def spec_value(self, state):
        return state.block

    def write(self, module, state) -> None:
        if len(state) != module.in_kept:
            raise ValueError(f"the rotation spans {len(state)} columns; the layer keeps {module.in_kept}")
        module.input_signs.copy_(pack_signs(state.signs))

    def input_transform(self, module):
        return InputRotation(unpack_signs(module.input_signs.cpu(), module.in_kept), module.spec.rotation)
