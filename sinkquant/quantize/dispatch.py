"""The forward paths of `SinkQuantLinear` (linear.py): which kernel serves a call, each path built once
per layer and activation dtype from the layer's buffers (`Layouts`), then called per forward.

Forward, on CPU where the scheme's PyTorch kernel serves the activation dtype (`use_kernels(False)`
switches all kernels off), by input rows of bf16 activations:
    <= FUSED_MAX_ROWS (decode): sinkquant's fused kernel (`sinkquant.kernels`' GemvLayer): gather, integer
        matmul, outlier columns and bias in one call, float32 accumulation;
    >= DENSE_MIN_ROWS (prefill): the fused kernel's build dequantizes the layer into one reused dense
        buffer for a BLAS matmul (bf16 where the CPU has bf16 dot products, float32 elsewhere), plus
        the outlier part;
    between, and for the other activation dtypes the kernel takes: PyTorch's integer kernel
        (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`) plus the outlier part.
Elsewhere the weight is dequantized and multiplied, giving the same numbers up to the activation
precision the kernel uses. `use_fused_kernel(False)` keeps PyTorch's kernels for every row count.

Every function here takes the layer as an argument: linear.py imports this module, not the reverse.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ..format.features import InputTransform
from ..format.primitives import complement_indices
from ..format.schemes import PytorchKernel, scheme_for

#: what the functions here take: a `SinkQuantLinear` (not imported: linear.py imports this module)
Layer = nn.Module

#: the switches `use_kernels` and `use_fused_kernel` set (each forward binds its path under the pair)
KERNELS = {"enabled": True, "fused": True}
#: input rows up to which bf16 calls take the fused kernel: it reads the weights once per row, so it
#: serves decode; PyTorch's kernel is better with many rows (prefill)
FUSED_MAX_ROWS = 2
#: input rows from which bf16 calls dequantize the layer into a reused dense buffer and take one BLAS
#: matmul (prefill): dequantizing the whole layer is a fixed cost per call that one BLAS matmul repays only
#: over enough rows, so this is where it overtakes PyTorch's integer kernels, which serve the rows between
DENSE_MIN_ROWS = 64
#: outlier columns x outputs up to which the outlier part of a bf16 call is a bf16 addmm: CPU BLAS has no
#: fast bf16 route for a matmul this thin, so a larger one is summed in float32
_SMALL_DENSE = 3072


Forward = Callable[[torch.Tensor], torch.Tensor]


def _fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX): there a bf16 matmul
    beats float32; elsewhere bf16 is converted on the fly and float32 is faster."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of `shape` (per thread, per dtype; grown to the largest layer seen): the dense
    weight a many-row call dequantizes into. One buffer serves every layer, so the working memory is
    one layer's dense weight, not a dense copy of the model."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    numel = shape[0] * shape[1]
    flat = buffers.get(dtype)
    if flat is None or flat.numel() < numel:
        flat = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(shape)


def kernels_available(bits: int) -> bool:
    """Whether this torch build has PyTorch's CPU kernel for the weight scheme of `bits`."""
    return scheme_for(bits).kernel_available()


@contextlib.contextmanager
def use_kernels(enabled: bool) -> Iterator[None]:
    """Switch the integer kernels off (dequantizing fallback) or on within a block."""
    before = KERNELS["enabled"]
    KERNELS["enabled"] = enabled
    try:
        yield
    finally:
        KERNELS["enabled"] = before


@contextlib.contextmanager
def use_fused_kernel(enabled: bool) -> Iterator[None]:
    """Switch sinkquant's own kernel off (PyTorch's integer kernels then serve every call) or on."""
    before = KERNELS["fused"]
    KERNELS["fused"] = enabled
    try:
        yield
    finally:
        KERNELS["fused"] = before


# -- what the forward paths ask of a layer (its `_kernel_ok`, `_fused` and `_many_rows`) --------------
def kernel_ok(layer: Layer, act_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether PyTorch's integer kernel serves activations of `act_dtype`: kernels on, on CPU, in
    this torch build, and at this scheme's dtypes and shapes."""
    scheme = layer.scheme
    return (
        KERNELS["enabled"]
        and layer.spec.pytorch_kernels  # every feature of the layer allows them (a grid does not)
        and layer.weight.device.type == "cpu"
        and scheme.kernel_available()
        and scheme.kernel_applies(act_dtype, layer.out_features, layer.group_size)
    )


def fused_kernel(layer: Layer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A callable x2 [rows, in] (contiguous, float32 or bf16) -> [rows, out] in x2's dtype: the fused
    kernel with this layer's layout bound, or None where it does not apply (not on CPU, switched
    off, not built here)."""
    if not KERNELS["fused"] or layer.weight.device.type != "cpu":
        return None
    return layer._layouts.fused


def many_rows(layer: Layer) -> Forward | None:
    """The dense-buffer path for prefill-sized calls, or None where the fused kernel does not apply."""
    return None if fused_kernel(layer) is None else layer._layouts.many_rows


def dense_part(layer: Layer, dtype: torch.dtype) -> _DensePart | None:
    """The outlier-column and bias part for outputs of `dtype`; None when there is none."""
    if not layer.n_outliers and layer.bias is None:
        return None
    part = layer._layouts.dense.get(dtype)
    if part is None:
        part = layer._layouts.dense[dtype] = _DensePart(layer, dtype)
    return part


class _DensePart:
    """y + x[:, outlier_idx] @ W_outlier^T + bias for outputs y of one dtype, added into y in place (y
    is a fresh product; a bf16 y stays bf16, sparing two casts of the whole output per call). A bf16
    output uses bf16 copies of the outlier columns while they are small (`_SMALL_DENSE`); every other
    case float32 copies, summed apart in float32 where y is not float32."""

    __slots__ = ("outlier_idx", "weight_t", "bias")

    def __init__(self, layer: Layer, dtype: torch.dtype) -> None:
        small = dtype == torch.bfloat16 and layer.n_outliers * layer.out_features <= _SMALL_DENSE
        dtype = dtype if small else torch.float32
        self.outlier_idx = layer.outlier_idx.long()
        self.weight_t = layer.outlier_weight.to(dtype).t().contiguous() if layer.n_outliers else None
        self.bias = layer.bias.to(dtype) if layer.bias is not None else None

    def __call__(
        self, y: torch.Tensor, x2: torch.Tensor, outliers: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`outliers`: x2's outlier columns where the caller has them already (else selected here)."""
        weight_t, bias = self.weight_t, self.bias
        if weight_t is None:
            return y.add_(bias)
        if outliers is None:
            outliers = x2.index_select(1, self.outlier_idx)
        if weight_t.dtype == y.dtype:
            y.addmm_(outliers.to(y.dtype), weight_t)
            return y if bias is None else y.add_(bias)
        x_out = outliers.float()
        dense = torch.mm(x_out, weight_t) if bias is None else torch.addmm(bias, x_out, weight_t)
        return y.add_(dense)


class Layouts:
    """What the forward paths build from one layer's buffers, each on first use. The layer replaces it
    as a whole wherever the buffers may change (`_apply`, `_load_from_state_dict`, `reset_layouts`),
    so every layout follows the buffers' device and dtype."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.dense: dict[torch.dtype, _DensePart] = {}  # by output dtype
        self.forwards: dict[tuple[torch.dtype, bool, bool], Forward] = {}  # by (dtype, kernels, fused)

    @cached_property
    def keep(self) -> torch.Tensor:
        """The kept input columns, ascending (long)."""
        return complement_indices(self.layer.outlier_idx.long(), self.layer.in_features)

    @cached_property
    def input_transform(self) -> InputTransform | None:
        """What the forward applies to the kept inputs first (a feature's `input_transform`: the
        rotation), None for a layer without one."""
        transforms = [
            t for f in self.layer.spec.features() if (t := f.input_transform(self.layer)) is not None
        ]
        if len(transforms) > 1:
            raise ValueError("a layer takes one input transform; its features declare several")
        return transforms[0] if transforms else None

    @cached_property
    def pytorch_kernel(self) -> PytorchKernel:
        layer = self.layer
        return layer.scheme.pytorch_kernel(
            layer._stored(), self.keep, layer.outlier_idx, layer.in_features, layer.group_size
        )

    @cached_property
    def fused(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The fused kernel with this layer's numbers bound, or None where it cannot be built here."""
        from .. import kernels

        module = kernels.fused_kernels()
        return None if module is None else kernels.bind_layer(module, *self.layer._fused_numbers())

    @cached_property
    def many_rows(self) -> Forward:
        """x2 [rows, in] bf16 -> [rows, out] bf16 for calls of DENSE_MIN_ROWS rows or more: the fused
        kernel's build dequantizes the weight into one dense [out, in] matrix per call (outlier columns
        0), in bf16 where the CPU has bf16 dot products and float32 elsewhere, then one BLAS matmul and
        the outlier part."""
        fused, bf16 = self.fused, _fast_bf16_matmul()
        dtype = torch.bfloat16 if bf16 else torch.float32
        dense = dense_part(self.layer, dtype)
        shape = (self.layer.out_features, self.layer.in_features)

        def run(x2: torch.Tensor) -> torch.Tensor:
            if x2.requires_grad:  # autograd keeps the weight for backward: it must not be reused
                weight = fused.dequantized(bf16)
            else:
                weight = _scratch(shape, dtype)
                fused.dequantize_into(weight)
            y = F.linear(x2.to(dtype), weight)
            if dense is not None:
                y = dense(y, x2)
            return y.to(x2.dtype)

        return run


# -- forward paths: each built once per layer and activation dtype, then called per forward ------------
def bind_forward(layer: Layer, dtype: torch.dtype) -> Forward:
    """The forward for activations of `dtype`, every layout and decision bound once: at batch 1 a
    layer's matmul takes tens of microseconds, so Python work per call (lookups, branches, attribute
    reads) is kept out of it. The dispatch by rows is the module docstring's."""
    in_f, out_f = layer.in_features, layer.out_features
    fused = many = None
    if kernel_ok(layer, dtype):
        middle = _kernel_path(layer, dtype)
        if dtype == torch.bfloat16:
            fused, many = fused_kernel(layer), many_rows(layer)
    else:
        middle = _dequantized_path(layer, dtype)
        # a feature PyTorch's kernels cannot compute (a grid's levels): the fused kernel can
        if not layer.spec.pytorch_kernels and KERNELS["enabled"] and dtype == torch.bfloat16:
            fused, many = fused_kernel(layer), many_rows(layer)
    compiling = torch.compiler.is_compiling  # sinkquant's kernels are opaque to torch.compile
    transform = _transform_inputs(layer)
    # the middle sizes' PyTorch kernel cannot compute such a layer: the fused kernel serves them
    fused_max = FUSED_MAX_ROWS if layer.spec.pytorch_kernels else DENSE_MIN_ROWS - 1

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, in_f)
        if transform is not None:
            x2 = transform(x, x2)
        if fused is not None and not compiling():
            if x2.shape[0] <= fused_max:
                return fused(x2 if x2.is_contiguous() else x2.contiguous()).view(*x.shape[:-1], out_f)
            if x2.shape[0] >= DENSE_MIN_ROWS:
                return many(x2).view(*x.shape[:-1], out_f)
        return middle(x2).view(*x.shape[:-1], out_f)

    return run


#: the last rotated input of this thread: (key, the input, its version, the rotated tensor). Linears that
#: read one input (q/k/v, gate/up) rotate it the same way when they keep the same columns (the signs
#: depend only on the width and the kept columns), so the second and third find it here. Holding the
#: input keeps its memory from being reused by another tensor while it is the key.
_LAST_ROTATED = threading.local()


def forget_rotated_input() -> None:
    """Drop this thread's last rotated input (and the memory it holds): the next rotated layer rotates
    its input itself, as the first linear to read an input does."""
    _LAST_ROTATED.entry = None


def _transform_inputs(layer: Layer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """x2 [rows, in] -> a new [rows, in] with the kept columns transformed by the layer's input transform
    (its rotation; the outlier columns as they are), for every path below to take as its input; None for
    a layer without one. The same input, unchanged since (its version counter), transformed the same
    way by the layer called just before, is taken from `_LAST_ROTATED` instead of transformed again."""
    transform = layer._layouts.input_transform
    if transform is None:
        return None
    keep = layer._layouts.keep.to(layer.outlier_idx.device)
    same = (transform.key, layer.in_features, bytes(layer.outlier_idx.cpu().numpy()))

    def transform_kept(x2: torch.Tensor) -> torch.Tensor:
        return x2.index_copy(1, keep, transform.apply(x2.index_select(1, keep)))

    apply = transform_kept if layer.n_outliers else transform.apply

    def run(x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x: the layer's input as passed (what the next linear is called with too), x2 its 2-D view."""
        # autograd: each call builds its own graph; an inference tensor (torch.inference_mode, as vLLM
        # runs) has no version counter to tell whether it changed in place since
        if torch.is_grad_enabled() or x.is_inference():
            return apply(x2)
        last = getattr(_LAST_ROTATED, "entry", None)
        if last is not None and last[0] == same and last[1] is x and last[2] == x._version:
            return last[3]
        transformed = apply(x2)
        _LAST_ROTATED.entry = (same, x, x._version, transformed)
        return transformed

    return run


def _kernel_path(layer: Layer, dtype: torch.dtype) -> Forward:
    """x2 [rows, in] -> [rows, out] in `dtype` by PyTorch's integer kernel plus the dense part. The
    kernel's bf16 output is cast to `dtype` before the outlier part is added, so a float32 model
    does not sum a massive activation's contribution in bf16."""
    kernel, dense = layer._layouts.pytorch_kernel, dense_part(layer, dtype)

    def run(x2: torch.Tensor) -> torch.Tensor:
        y, outliers = kernel(x2)
        if y.dtype != dtype:
            y = y.to(dtype)
        return y if dense is None else dense(y, x2, outliers)

    return run


def _dequantized_path(layer: Layer, dtype: torch.dtype) -> Forward:
    """x2 [rows, in] -> [rows, out] in `dtype` by a matmul of the dequantized weight, with the
    activations at the precision the scheme's kernel would give them."""
    keep = layer._layouts.keep if layer.n_outliers else None
    to_bf16 = layer.scheme.fallback_rounds_to_bf16(dtype)
    dense = dense_part(layer, torch.float32 if to_bf16 else dtype)

    def run(x2: torch.Tensor) -> torch.Tensor:
        xk = x2 if keep is None else x2.index_select(1, keep)
        if to_bf16:
            y = F.linear(xk.to(torch.bfloat16).float(), layer.dequantized_kept())
        else:
            y = F.linear(xk, layer.dequantized_kept().to(dtype))
        if dense is not None:
            y = dense(y, x2)
        return y.to(dtype)

    return run
