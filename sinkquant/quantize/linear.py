"""`SinkQuantLinear`: an integer weight plus a few full-precision input columns.

    y = x[:, kept] @ dequant(Wq)^T  +  x[:, outlier_idx] @ W_outlier^T  (+ bias)

The kept columns are stored as int8 per output channel (symmetric) or as int4 in groups along the
input (min/max, packed two to a byte; a last group may be shorter than the group size). The outlier
columns are the input channels where calibration saw the largest activations; their rounding error
would be multiplied by those activations, so they stay exactly as they were.

Buffers (the checkpoint keys, written by `from_float` and read back by `empty`):
    weight          int8 [out, in_kept]               (bits 8)
                    uint8 [out, ceil(in_kept / 2)]     (bits 4, low nibble first)
    weight_scale    float32 [out] (bits 8)  |  bfloat16 [out, groups] (bits 4)
    weight_min      bfloat16 [out, groups]  (bits 4 only)
    outlier_idx     int32 [n_outliers]
    outlier_weight  [out, n_outliers] in the original weight dtype
    bias            [out] (if the layer has one)

Kernels on CPU: `torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu` (bf16 activations);
where a kernel is missing (or `use_kernels(False)`), the weight is dequantized and multiplied, giving
the same numbers up to the activation precision the kernel uses. Where sinkquant's own kernel could be
built (`cpu_kernels.GemvLayer`, int4 and int8), bf16 activations with at most `FUSED_MAX_ROWS` rows
(decode) take its fused matrix-vector product (gather, integer matmul, outlier columns and bias in one
call, float32 accumulation), and calls with `DENSE_MIN_ROWS` rows or more (prefill) have it dequantize
the layer into one reused dense buffer for a BLAS matmul (bf16 where the CPU has bf16 dot products,
float32 elsewhere) plus the outlier part; `use_fused_kernel(False)` keeps PyTorch's kernels for all.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .primitives import (
    dequantize_grouped,
    dequantize_int8_per_channel,
    pack_bits,
    packed_size,
    quantize_grouped,
    quantize_grouped_clipped,
    quantize_int8_per_channel,
    unpack_bits,
)

_KERNELS = {"enabled": True, "fused": True}
#: input rows up to which bf16 calls take the fused kernel: it reads the weights once per row,
#: so it serves decode; PyTorch's kernel is better with many rows (prefill)
FUSED_MAX_ROWS = 2
#: input rows from which bf16 calls dequantize the layer into a reused dense buffer and take one BLAS
#: matmul (prefill); between the two, PyTorch's integer kernels. Measured on one layer at 1-512 rows
#: (AVX-512 with bf16 dot products): the fused kernel wins at 1-2 rows, PyTorch's kernels at 3-16,
#: the two are close at 32, the dense matmul wins from 64 (2.4-3.8x PyTorch's int4 kernel at 512 rows)
DENSE_MIN_ROWS = 64
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)
_SMALL_DENSE = 3072  # outlier columns x outputs up to which a bf16 addmm beats float32 (measured)


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
    ops = torch.ops.aten
    if bits == 8:
        return hasattr(ops, "_weight_int8pack_mm")
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Switch the integer kernels off (dequantizing fallback) or on within a block."""
    before = _KERNELS["enabled"]
    _KERNELS["enabled"] = enabled
    try:
        yield
    finally:
        _KERNELS["enabled"] = before


@contextlib.contextmanager
def use_fused_kernel(enabled: bool):
    """Switch sinkquant's own kernel off (PyTorch's integer kernels then serve every call) or on."""
    before = _KERNELS["fused"]
    _KERNELS["fused"] = enabled
    try:
        yield
    finally:
        _KERNELS["fused"] = before


class SinkQuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        n_outliers: int,
        bias: bool,
        outlier_dtype: torch.dtype = torch.float16,
        device=None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"SinkQuantLinear supports 4 or 8 bits (got {bits})")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.n_outliers = n_outliers
        kept = in_features - n_outliers
        self.in_kept = kept
        self.group_size = kept if (bits == 8 or group_size is None) else group_size
        groups = math.ceil(kept / self.group_size) if kept else 0
        kw = {"device": device}
        if bits == 8:
            self.register_buffer("weight", torch.empty(out_features, kept, dtype=torch.int8, **kw))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, **kw))
            self.weight_min = None
        else:
            self.register_buffer(
                "weight", torch.empty(out_features, packed_size(kept, 4), dtype=torch.uint8, **kw)
            )
            self.register_buffer(
                "weight_scale", torch.empty(out_features, groups, dtype=torch.bfloat16, **kw)
            )
            self.register_buffer("weight_min", torch.empty(out_features, groups, dtype=torch.bfloat16, **kw))
        self.register_buffer("outlier_idx", torch.empty(n_outliers, dtype=torch.int32, **kw))
        self.register_buffer(
            "outlier_weight", torch.empty(out_features, n_outliers, dtype=outlier_dtype, **kw)
        )
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=outlier_dtype, **kw))
        else:
            self.bias = None
        self._runtime: dict = {}

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int | None,
        outlier_idx: torch.Tensor | list[int],
        symmetric: bool = False,
        codes: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        minimum: torch.Tensor | None = None,
        storage_dtype: torch.dtype | None = None,
        importance: torch.Tensor | None = None,
        clip_search: bool = False,
    ) -> SinkQuantLinear:
        """Quantize `weight` [out, in] by round-to-nearest, keeping `outlier_idx` columns exact.

        An algorithm that chose its own integers (GPTQ) passes `codes`/`scale`/`minimum` for the kept
        columns (int8 codes and float32 scale for 8 bits; uint8 codes, scale and minimum for 4 bits).
        `storage_dtype` holds the outlier columns and bias (default: the weight's dtype); use the dtype of
        the source checkpoint so the kept columns stay bit-identical to it. With `clip_search` (int4),
        each group's range is chosen among shrunk min/max ranges to minimise the error weighted by
        `importance` [in] (e.g. mean x^2 of each input column over the calibration tokens)."""
        out_features, in_features = weight.shape
        idx = torch.as_tensor(outlier_idx, dtype=torch.long).sort().values
        keep = _complement(idx, in_features)
        dtype = storage_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        module = cls(in_features, out_features, bits, group_size, idx.numel(), bias is not None, dtype)
        w_keep = weight.float()[:, keep]
        if bits == 8:
            if codes is None:
                codes, scale = quantize_int8_per_channel(w_keep)
            module.weight.copy_(codes)
            module.weight_scale.copy_(scale)
        else:
            if codes is None and clip_search:
                weights = None if importance is None else importance.float()[keep]
                codes, scale, minimum = quantize_grouped_clipped(
                    w_keep, 4, module.group_size, weights, symmetric=symmetric, param_dtype=torch.bfloat16
                )
            elif codes is None:
                codes, scale, minimum = quantize_grouped(
                    w_keep, 4, module.group_size, symmetric, torch.bfloat16
                )
            module.weight.copy_(pack_bits(codes, 4))
            module.weight_scale.copy_(scale)
            module.weight_min.copy_(minimum)
        module.outlier_idx.copy_(idx.to(torch.int32))
        module.outlier_weight.copy_(weight[:, idx].to(dtype))
        if bias is not None:
            module.bias.copy_(bias.to(dtype))
        return module

    # -- numbers ------------------------------------------------------------------------------------
    def dequantized_kept(self) -> torch.Tensor:
        """float32 [out, in_kept]: the integer part as real numbers."""
        if self.bits == 8:
            return dequantize_int8_per_channel(self.weight, self.weight_scale)
        codes = unpack_bits(self.weight, 4, self.in_kept)
        return dequantize_grouped(codes, self.weight_scale, self.weight_min, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: the effective weight (outlier columns exactly as stored)."""
        full = torch.empty(self.out_features, self.in_features)
        full[:, self._keep_idx()] = self.dequantized_kept()
        full[:, self.outlier_idx.long()] = self.outlier_weight.float()
        return full

    def _keep_idx(self) -> torch.Tensor:
        if "keep" not in self._runtime:
            self._runtime["keep"] = _complement(self.outlier_idx.long(), self.in_features)
        return self._runtime["keep"]

    def _int4_kernel_args(self):
        """Kernel layout, built once: codes padded to whole groups, scales and zeros per group."""
        if "int4" not in self._runtime:
            gs, kept = self.group_size, self.in_kept
            padded = math.ceil(kept / gs) * gs
            codes = unpack_bits(self.weight, 4, kept).to(torch.int32)
            # a constant group (all codes 0, guard scale 1) is its minimum: with scale 0 and zero = min
            # it stays exact, where min + 8 * 1 rounded to the kernel's bf16 would lose the minimum
            constant = F.pad(codes, (0, padded - kept)).view(codes.shape[0], -1, gs).amax(-1) == 0
            if padded != kept:
                codes = F.pad(codes, (0, padded - kept), value=8)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
            scale = self.weight_scale.float().masked_fill(constant, 0.0)
            zero = self.weight_min.float() + 8 * scale  # kernel: w = (q - 8) * scale + zero
            scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._runtime["int4"] = (packed, scales_zeros, padded)
        return self._runtime["int4"]

    def _int8_kernel_args(self):
        """The int8 weight spread back to the layer's full input width, zero codes at the outlier
        columns, padded with zero columns to a multiple of 16 inputs (torch 2.13's AVX2 kernel reads K
        in blocks of 16: K = 104, 120, 136 or 1000 segfaulted or gave wrong rows here), and bf16 scales.
        A zero code contributes exactly nothing, so the kernel takes the input row as it is: no gather
        and no padding of activations per call. Built once, in memory only (the checkpoint keeps
        [out, in_kept])."""
        if "int8" not in self._runtime:
            padded = math.ceil(self.in_features / 16) * 16
            weight = torch.zeros(self.out_features, padded, dtype=torch.int8, device=self.weight.device)
            weight[:, self._keep_idx()] = self.weight
            self._runtime["int8"] = (weight, self.weight_scale.to(torch.bfloat16), padded)
        return self._runtime["int8"]

    def _kernel_ok(self, act_dtype: torch.dtype = torch.bfloat16) -> bool:
        """int4: the kernel whenever it supports the shape (activations go through bf16 either way).
        int8: only for bf16 activations; on this CPU the fp32 variant is 20-30x slower than a
        dequantizing fp32 matmul, so fp32 models take the fallback (same weights, fp32 numbers).
        Decided once per activation dtype (this runs on every call)."""
        key = ("kernel_ok", act_dtype, _KERNELS["enabled"])
        if key not in self._runtime:
            ok = _KERNELS["enabled"] and kernels_available(self.bits) and self.weight.device.type == "cpu"
            if ok and self.bits == 8:
                ok = act_dtype == torch.bfloat16
            elif ok:
                ok = self.group_size in _INT4_KERNEL_GROUPS and self.out_features % 16 == 0
            self._runtime[key] = ok
        return self._runtime[key]

    def _int4_gather_args(self):
        """One index that takes, from an input row with a 0 appended, the kept columns in the kernel's
        order, then the padding to whole groups (the appended 0: a padded position meets its group's
        zero point, so its activation must be exactly 0), then the outlier columns. One index_select per
        call instead of one per part plus a pad."""
        if "gather" not in self._runtime:
            padded = self._int4_kernel_args()[-1]
            n_pad = padded - self.in_kept
            index = torch.cat(
                [
                    self._keep_idx(),
                    torch.full((n_pad,), self.in_features, dtype=torch.long),
                    self.outlier_idx.long(),
                ]
            )
            identity = n_pad == 0 and self.n_outliers == 0
            self._runtime["gather"] = (None if identity else index.to(self.weight.device), padded, n_pad > 0)
        return self._runtime["gather"]

    def _fused(self):
        """A callable x2 [rows, in] (contiguous, float32 or bf16) -> [rows, out] in x2's dtype: the fused
        integer kernel with this layer's layout bound (built once), or None where it does not apply (not
        on CPU, switched off, not built here)."""
        if not _KERNELS["fused"] or self.weight.device.type != "cpu":
            return None
        if "fused" not in self._runtime:
            from .. import kernels as cpu_kernels

            module = cpu_kernels.fused_kernels()
            run = None if module is None else cpu_kernels.bind_layer(module, *self._fused_numbers())
            self._runtime["fused"] = run
        return self._runtime["fused"]

    def _fused_numbers(self) -> tuple:
        """What `cpu_kernels.bind_layer` takes after the extension: bits, codes (unpacked for int4),
        scale, minimum, kept column indices, group size, outlier indices and weights, bias."""
        four = self.bits == 4
        return (
            self.bits,
            unpack_bits(self.weight, 4, self.in_kept) if four else self.weight,
            self.weight_scale,
            self.weight_min if four else None,
            self._keep_idx(),
            self.group_size,
            self.outlier_idx,
            self.outlier_weight,
            self.bias,
        )

    def _many_rows(self):
        """A callable x2 [rows, in] (bf16) -> [rows, out] bf16 for calls with more than FUSED_MAX_ROWS
        rows (prefill): the fused kernel's build dequantizes the weight into one dense [out, in] matrix
        per call (outlier columns 0), in bf16 where the CPU has bf16 dot products and float32
        elsewhere, then one BLAS matmul and the outlier part. None where the fused kernel does not apply."""
        fused = self._fused()
        if fused is None:
            return None
        if "many_rows" not in self._runtime:
            bf16 = _fast_bf16_matmul()
            dtype = torch.bfloat16 if bf16 else torch.float32
            outlier_idx = self.outlier_idx.long()
            add_dense = self._add_dense_part if (self.n_outliers or self.bias is not None) else None
            n_outliers = self.n_outliers

            shape = (self.out_features, self.in_features)

            def run(x2: torch.Tensor) -> torch.Tensor:
                if x2.requires_grad:  # autograd keeps the weight for backward: it must not be reused
                    weight = fused.dequantized(bf16)
                else:
                    weight = _scratch(shape, dtype)
                    fused.dequantize_into(weight)
                y = F.linear(x2.to(dtype), weight)
                if add_dense is not None:
                    y = add_dense(y, x2.index_select(1, outlier_idx) if n_outliers else None)
                return y.to(x2.dtype)

            self._runtime["many_rows"] = run
        return self._runtime["many_rows"]

    def _kernel_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """The integer kernel, plus the dense part; the result in bf16 (bf16 inputs) or float32."""
        rows = x2.shape[0]
        if x2.dtype == torch.bfloat16 and not torch.compiler.is_compiling():
            own = self._fused() if rows <= FUSED_MAX_ROWS else None
            if own is None and rows >= DENSE_MIN_ROWS:
                own = self._many_rows()
            if own is not None:
                return own(x2.contiguous())
        if self.bits == 8:  # bf16 inputs only (see _kernel_ok)
            weight, scale, padded = self._int8_kernel_args()
            act = x2 if padded == self.in_features else F.pad(x2, (0, padded - self.in_features))
            y = torch.ops.aten._weight_int8pack_mm(act.contiguous(), weight, scale)
            if not self.n_outliers and self.bias is None:
                return y
            return self._add_dense_part(y, self._outlier_inputs(x2))
        index, padded, append_zero = self._int4_gather_args()
        src = x2.to(torch.bfloat16)  # the int4 kernel takes bf16 activations
        if append_zero:
            src = torch.cat((src, self._zeros(src.shape[0])), dim=1)
        gathered = src if index is None else src.index_select(1, index)
        packed, scales_zeros, _ = self._int4_kernel_args()
        act = gathered[:, :padded].contiguous()  # a view already when there is one row (decode)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(act, packed, self.group_size, scales_zeros)
        if not self.n_outliers and self.bias is None:
            return y
        # outlier inputs at their own precision: bf16 models have them in bf16 already; fp32 ones must
        # not lose digits of a massive activation to a bf16 round trip (nor the output to a bf16 sum)
        if x2.dtype == torch.bfloat16:
            return self._add_dense_part(y, gathered[:, padded:])
        return self._add_dense_part(y.to(x2.dtype), self._outlier_inputs(x2))

    def _zeros(self, rows: int) -> torch.Tensor:
        key = ("zeros", rows)
        if key not in self._runtime:
            self._runtime[key] = torch.zeros(rows, 1, dtype=torch.bfloat16, device=self.weight.device)
        return self._runtime[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = ("forward", x.dtype, _KERNELS["enabled"], _KERNELS["fused"])
        run = self._runtime.get(key)
        if run is None:
            run = self._runtime[key] = self._forward_for(x.dtype)
        return run(x)

    def _forward_for(self, dtype: torch.dtype):
        """The forward for one activation dtype, decided once. bf16 with a kernel (the decode path)
        gets a closure with every layout and decision bound in advance: at batch 1 a SmolLM2-sized
        matmul takes 20-100 us, so the Python around it (dict lookups, branches, attribute reads,
        ~1 us each) is worth removing; it runs the same ops as `_kernel_forward`."""
        if dtype == torch.bfloat16 and self._kernel_ok(dtype):
            return self._bf16_kernel_closure()
        return self._general_forward

    def _bf16_kernel_closure(self):
        in_f, out_f = self.in_features, self.out_features
        add_dense = self._dense_closure(torch.bfloat16)
        fused, many = self._fused(), self._many_rows()
        compiling = torch.compiler.is_compiling  # sinkquant's kernels are opaque to torch.compile
        if self.bits == 8:
            weight, scale, padded = self._int8_kernel_args()
            int8_mm = torch.ops.aten._weight_int8pack_mm
            outlier_idx = self.outlier_idx.long()
            pad = padded - in_f

            def run8(x: torch.Tensor) -> torch.Tensor:
                x2 = x.reshape(-1, in_f)
                if fused is not None and not compiling():
                    if x2.shape[0] <= FUSED_MAX_ROWS:
                        return fused(x2 if x2.is_contiguous() else x2.contiguous()).view(*x.shape[:-1], out_f)
                    if x2.shape[0] >= DENSE_MIN_ROWS:
                        return many(x2).view(*x.shape[:-1], out_f)
                act = F.pad(x2, (0, pad)) if pad else x2
                y = int8_mm(act.contiguous(), weight, scale)
                if add_dense is not None:
                    y = add_dense(y, x2.index_select(1, outlier_idx))
                return y.view(*x.shape[:-1], out_f)

            return run8
        index, padded, append_zero = self._int4_gather_args()
        packed, scales_zeros, _ = self._int4_kernel_args()
        group = self.group_size
        int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        zero = torch.zeros(1, 1, dtype=torch.bfloat16, device=self.weight.device)

        def run4(x: torch.Tensor) -> torch.Tensor:
            x2 = x.reshape(-1, in_f)
            if fused is not None and not compiling():
                if x2.shape[0] <= FUSED_MAX_ROWS:
                    return fused(x2 if x2.is_contiguous() else x2.contiguous()).view(*x.shape[:-1], out_f)
                if x2.shape[0] >= DENSE_MIN_ROWS:
                    return many(x2).view(*x.shape[:-1], out_f)
            if append_zero:
                x2 = torch.cat((x2, zero.expand(x2.shape[0], 1)), dim=1)
            gathered = x2 if index is None else x2.index_select(1, index)
            act = gathered[:, :padded]
            y = int4_mm(act if act.is_contiguous() else act.contiguous(), packed, group, scales_zeros)
            if add_dense is not None:
                y = add_dense(y, gathered[:, padded:])
            return y.view(*x.shape[:-1], out_f)

        return run4

    def _dense_closure(self, dtype: torch.dtype):
        """`_add_dense_part` with its weights and decisions bound for outputs of `dtype`; None when
        there is nothing to add (no outlier columns, no bias)."""
        if not self.n_outliers and self.bias is None:
            return None
        weight_t, bias = self._dense_args(dtype)
        if weight_t is None or weight_t.dtype != dtype:
            return self._add_dense_part
        if bias is None:
            return lambda y, outliers: y.addmm_(outliers, weight_t)
        return lambda y, outliers: y.addmm_(outliers, weight_t).add_(bias)

    def _general_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._kernel_ok(x.dtype):
            y = self._kernel_forward(x2)
        else:
            xk = x2.index_select(1, self._keep_idx()) if self.n_outliers else x2
            if self.bits == 4 or x.dtype == torch.bfloat16:  # what the kernel would see
                y = F.linear(xk.to(torch.bfloat16).float(), self.dequantized_kept())
            else:
                y = F.linear(xk, self.dequantized_kept().to(x.dtype))
            if self.n_outliers or self.bias is not None:
                y = self._add_dense_part(y, self._outlier_inputs(x2))
        return y.to(x.dtype).reshape(*shape, self.out_features)

    def _outlier_inputs(self, x2: torch.Tensor) -> torch.Tensor | None:
        return x2.index_select(1, self.outlier_idx.long()) if self.n_outliers else None

    def _dense_args(self, dtype: torch.dtype):
        """The outlier columns as [n_outliers, out] (transposed, contiguous) and the bias, built once
        per dtype. CPU BLAS has no fast bf16 path for a matmul this thin: a bf16 addmm took 3-6 us for
        5 columns x 192-576 outputs but 0.5 ms for 40 x 4096, where float32 takes 27 us. So bf16 inputs
        use a bf16 copy only while n_outliers x out <= _SMALL_DENSE, float32 above."""
        small = dtype == torch.bfloat16 and self.n_outliers * self.out_features <= _SMALL_DENSE
        dtype = dtype if small else torch.float32
        key = ("dense", dtype)
        if key not in self._runtime:
            weight_t = self.outlier_weight.to(dtype).t().contiguous() if self.n_outliers else None
            bias = self.bias.to(dtype) if self.bias is not None else None
            self._runtime[key] = (weight_t, bias)
        return self._runtime[key]

    def _add_dense_part(self, y: torch.Tensor, outliers: torch.Tensor | None) -> torch.Tensor:
        """y + outliers @ W_outlier^T + bias, added into y in place (y is a fresh product; a bf16 y
        stays bf16, sparing two casts of the whole output per call)."""
        weight_t, bias = self._dense_args(y.dtype)
        if weight_t is None:
            return y.add_(bias)
        if weight_t.dtype == y.dtype:
            y.addmm_(outliers.to(y.dtype), weight_t)
            return y if bias is None else y.add_(bias)
        x_out = outliers.float()
        dense = torch.mm(x_out, weight_t) if bias is None else torch.addmm(bias, x_out, weight_t)
        return y.add_(dense)

    def _apply(self, fn, recurse=True):
        self._runtime = {}  # kernel layouts follow the buffers (device or dtype changes)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._runtime = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size == self.in_kept else f"group {self.group_size}"
        return (
            f"in={self.in_features}, out={self.out_features}, int{self.bits} {group}, "
            f"outlier columns={self.n_outliers}, bias={self.bias is not None}"
        )

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx.long()] = False
    return torch.nonzero(mask).flatten()
