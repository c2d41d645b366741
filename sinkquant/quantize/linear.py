"""`SinkQuantLinear`: an integer weight plus a few full-precision input columns.

    y = x[:, kept] @ dequant(Wq)^T  +  x[:, outlier_idx] @ W_outlier^T  (+ bias)

The kept columns are stored by a weight scheme (`schemes.SCHEMES`, by bits: int8 per output channel,
or int4 in groups along the input). The outlier columns are the input channels where calibration saw
the largest activations; their rounding error would be multiplied by those activations, so they stay
exactly as they were.

Buffers (the checkpoint keys, written by `from_float` and read back by `weights.empty_from_spec`):
    weight, weight_scale (, weight_min)   the scheme's storage (see `schemes`; with log scales
                                          weight_scale_code and weight_scale_top for weight_scale)
    outlier_idx     int32 [n_outliers]
    outlier_weight  [out, n_outliers] in the original weight dtype
    bias            [out] (if the layer has one)
    input_signs     uint8 [ceil(in_kept / 8)] (with an input rotation: `rotation`'s signs, packed)

With an input rotation (`rotation.InputRotation`, blocks of `rotation_block`), the integer part holds
W' = W R for the kept columns and the forward rotates those inputs first: y = (x_kept R) W'ᵀ + ...;
`dequantized_weight` gives W = W' Rᵀ, the weight in the input's own basis.

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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ..format import BufferSpecs, LayerSpec
from .primitives import complement_indices, snap_log_scale
from .rotation import InputRotation, pack_signs, unpack_signs
from .schemes import SCHEMES, PytorchKernel, Stored, WeightScheme, scheme_for

_KERNELS = {"enabled": True, "fused": True}
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
    before = _KERNELS["enabled"]
    _KERNELS["enabled"] = enabled
    try:
        yield
    finally:
        _KERNELS["enabled"] = before


@contextlib.contextmanager
def use_fused_kernel(enabled: bool) -> Iterator[None]:
    """Switch sinkquant's own kernel off (PyTorch's integer kernels then serve every call) or on."""
    before = _KERNELS["fused"]
    _KERNELS["fused"] = enabled
    try:
        yield
    finally:
        _KERNELS["fused"] = before


class _DensePart:
    """y + x[:, outlier_idx] @ W_outlier^T + bias for outputs y of one dtype, added into y in place (y
    is a fresh product; a bf16 y stays bf16, sparing two casts of the whole output per call). A bf16
    output uses bf16 copies of the outlier columns while they are small (`_SMALL_DENSE`); every other
    case float32 copies, summed apart in float32 where y is not float32."""

    __slots__ = ("outlier_idx", "weight_t", "bias")

    def __init__(self, layer: SinkQuantLinear, dtype: torch.dtype) -> None:
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


class _Layouts:
    """What the forward paths build from one layer's buffers, each on first use. The layer replaces it
    as a whole wherever the buffers may change (`_apply`, `_load_from_state_dict`, `reset_layouts`),
    so every layout follows the buffers' device and dtype."""

    def __init__(self, layer: SinkQuantLinear) -> None:
        self.layer = layer
        self.dense: dict[torch.dtype, _DensePart] = {}  # by output dtype
        self.forwards: dict[tuple[torch.dtype, bool, bool], Forward] = {}  # by (dtype, kernels, fused)

    @cached_property
    def keep(self) -> torch.Tensor:
        """The kept input columns, ascending (long)."""
        return complement_indices(self.layer.outlier_idx.long(), self.layer.in_features)

    @cached_property
    def rotation(self) -> InputRotation | None:
        """The kept inputs' rotation, None for a layer without one."""
        layer = self.layer
        if layer.rotation_block is None:
            return None
        return InputRotation(unpack_signs(layer.input_signs.cpu(), layer.in_kept), layer.rotation_block)

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
        dense = self.layer._dense_part(dtype)
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


class SinkQuantLinear(nn.Module):
    """A linear layer whose kept input columns are integers (the weight scheme of `bits`) and whose
    outlier input columns and bias stay at full precision."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        n_outliers: int,
        bias: bool,
        outlier_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        symmetric: bool = False,
        log_scales: bool = False,
        rotation_block: int | None = None,
        nonuniform: bool = False,
    ) -> None:
        super().__init__()
        scheme = scheme_for(bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.n_outliers = n_outliers
        # int4: a symmetric grid stores no minima (each is -8 * its scale); int8 is always symmetric
        self.symmetric = symmetric
        # int4: each group's scale one byte on a log grid (see `schemes`)
        self.log_scales = log_scales
        kept = in_features - n_outliers
        self.in_kept = kept
        self.group_size = scheme.group_size(kept, group_size)
        # the kept inputs' rotation (rotation.py): its block size; int4 on the layer's own levels (grid.py)
        self.rotation_block, self.nonuniform = rotation_block, nonuniform
        self.outlier_dtype = outlier_dtype
        self._has_bias = bias
        # the buffers as the format lays them out (the scheme's as the features change them, the
        # outlier columns, then each feature's own), the bias after the outlier columns
        for name, (shape, dtype) in self.spec.shapes().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
            if name == "outlier_weight":
                if bias:
                    self.register_buffer(
                        "bias", torch.empty(out_features, dtype=outlier_dtype, device=device)
                    )
                else:
                    self.bias = None
        if "weight_min" not in self._buffers:
            self.weight_min = None  # a scheme or grid without minima (int8, symmetric int4)
        self._layouts = _Layouts(self)

    @classmethod
    def from_spec(cls, spec: LayerSpec, device: torch.device | str | None = None) -> SinkQuantLinear:
        """An empty layer of `spec`'s shapes (a loader fills its buffers)."""
        return cls(
            spec.in_features, spec.out_features, spec.bits, spec.group_size, spec.outliers, spec.bias,
            getattr(torch, spec.dtype), device=device, symmetric=spec.symmetric, log_scales=spec.log_scales,
            rotation_block=spec.rotation, nonuniform=spec.grid is not None,
        )  # fmt: skip

    @property
    def spec(self) -> LayerSpec:
        """The layer in the checkpoint's format (`quantization_config.layers`)."""
        return LayerSpec(
            self.in_features, self.out_features, self.bits,
            None if self.group_size == self.in_kept else self.group_size, self.n_outliers,
            self._has_bias, str(self.outlier_dtype).replace("torch.", ""), self.symmetric,
            self.log_scales, self.rotation_block, "lloyd" if self.nonuniform else None,
        )  # fmt: skip

    @property
    def scheme(self) -> WeightScheme:
        return SCHEMES[self.bits]

    def _storage(self) -> BufferSpecs:
        return self.spec.scheme_storage()

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
        log_scales: bool = False,
        rotation: InputRotation | None = None,
        levels: torch.Tensor | None = None,
    ) -> SinkQuantLinear:
        """Quantize `weight` [out, in] by round-to-nearest, keeping `outlier_idx` columns exact.

        An algorithm that chose its own integers (GPTQ) passes `codes`/`scale`/`minimum` for the kept
        columns (int8 codes and float32 scale for 8 bits; uint8 codes, scale and minimum for 4 bits).
        `storage_dtype` holds the outlier columns and bias (default: the weight's dtype); use the dtype of
        the source checkpoint so the kept columns stay bit-identical to it. With `clip_search` (int4),
        each group's range is chosen among shrunk min/max ranges to minimise the error weighted by
        `importance` [in] (e.g. mean x^2 of each input column over the calibration tokens). With
        `log_scales` (int4), scales passed in must lie on the log grid already (GPTQ's do when it
        quantized with log scales); they are stored one byte each. With `rotation` (over the kept
        columns), the layer stores the kept columns of W R: `weight` is in the input's own basis, and
        codes passed in are those of W R (GPTQ's on the rotated weight). With `levels` (int4, float32
        [16], grid.py), the codes passed in index those levels instead of the uniform grid."""
        out_features, in_features = weight.shape
        idx = torch.as_tensor(outlier_idx, dtype=torch.long).sort().values
        keep = complement_indices(idx, in_features)
        dtype = storage_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        module = cls(
            in_features,
            out_features,
            bits,
            group_size,
            idx.numel(),
            bias is not None,
            dtype,
            symmetric=symmetric,
            log_scales=log_scales,
            rotation_block=None if rotation is None else rotation.block,
            nonuniform=levels is not None,
        )
        if levels is not None and codes is None:
            raise ValueError("a non-uniform grid takes the codes chosen on it (GPTQ with grid 'lloyd')")
        if rotation is not None and len(rotation) != keep.numel():
            raise ValueError(f"the rotation spans {len(rotation)} columns; the layer keeps {keep.numel()}")
        if codes is None:
            if rotation is not None and importance is not None:
                raise ValueError("importance is per input column; a rotated layer mixes the columns")
            kept_weight = weight.float()[:, keep]
            stored = module.scheme.quantize(
                kept_weight if rotation is None else rotation.apply(kept_weight),
                module.group_size,
                symmetric=symmetric,
                importance=None if importance is None else importance.float()[keep],
                clip_search=clip_search,
                log_scales=log_scales,
            )
        else:  # parameters chosen elsewhere (GPTQ): they must be ones this layer's storage can hold
            stored = module.scheme.store(codes, scale, minimum)
            if symmetric and stored.minimum is not None:
                if not torch.equal(stored.minimum, module.scheme.minimum(stored._replace(minimum=None))):
                    raise ValueError(
                        "a symmetric int4 layer's minima must be -8 * its scales (it stores none)"
                    )
            if log_scales and not torch.equal(snap_log_scale(stored.scale), stored.scale):
                raise ValueError(
                    "a log-scale layer takes scales on the log grid (quantize with log_scales=True)"
                )
        buffers = module.scheme.buffers(stored, module.in_kept, module.group_size, symmetric, log_scales)
        for name, tensor in buffers.items():
            getattr(module, name).copy_(tensor)
        module.outlier_idx.copy_(idx.to(torch.int32))
        module.outlier_weight.copy_(weight[:, idx].to(dtype))
        if rotation is not None:
            module.input_signs.copy_(pack_signs(rotation.signs))
        if levels is not None:
            module.weight_levels.copy_(levels)
        if bias is not None:
            module.bias.copy_(bias.to(dtype))
        return module

    # -- numbers ------------------------------------------------------------------------------------
    def dequantized_kept(self) -> torch.Tensor:
        """float32 [out, in_kept]: the integer part as real numbers."""
        return self.scheme.dequantize(self._stored(), self.in_kept, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: the effective weight in the input's own basis (outlier columns exactly as
        stored; a rotated layer's kept columns W' Rᵀ)."""
        full = torch.empty(self.out_features, self.in_features)
        kept, rotation = self.dequantized_kept(), self._layouts.rotation
        full[:, self._layouts.keep] = kept if rotation is None else rotation.apply_transposed(kept)
        full[:, self.outlier_idx.long()] = self.outlier_weight.float()
        return full

    def group_minimum(self) -> torch.Tensor | None:
        """int4: each group's minimum [out, groups] bf16 (a symmetric layer's from its scales); int8: None."""
        return self.scheme.minimum(self._stored())

    def group_scale(self) -> torch.Tensor:
        """Each group's scale as the kernels use it (int4: [out, groups] bf16, decoded from its byte
        in a layer with log scales; int8: [out] float32)."""
        return self._stored().scale

    def _stored(self) -> Stored:
        return self.scheme.read(self._buffers)

    def _fused_numbers(self) -> tuple:
        """What `kernels.bind_layer` takes after the extension: bits, codes (unpacked for int4),
        scale, minimum, kept column indices, group size, outlier indices and weights, bias, levels."""
        scheme_part = self.scheme.fused_args(self._stored(), self.in_kept)
        keep, levels = self._layouts.keep, self.weight_levels if self.nonuniform else None
        return (*scheme_part, keep, self.group_size, self.outlier_idx, self.outlier_weight, self.bias, levels)

    # -- kernels ------------------------------------------------------------------------------------
    def _kernel_ok(self, act_dtype: torch.dtype = torch.bfloat16) -> bool:
        """Whether PyTorch's integer kernel serves activations of `act_dtype`: kernels on, on CPU, in
        this torch build, and at this scheme's dtypes and shapes."""
        scheme = self.scheme
        return (
            _KERNELS["enabled"]
            and not self.nonuniform  # the kernels' grid is the uniform one
            and self.weight.device.type == "cpu"
            and scheme.kernel_available()
            and scheme.kernel_applies(act_dtype, self.out_features, self.group_size)
        )

    def _pytorch_kernel(self) -> PytorchKernel:
        return self._layouts.pytorch_kernel

    def _fused(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A callable x2 [rows, in] (contiguous, float32 or bf16) -> [rows, out] in x2's dtype: the fused
        kernel with this layer's layout bound, or None where it does not apply (not on CPU, switched
        off, not built here)."""
        if not _KERNELS["fused"] or self.weight.device.type != "cpu":
            return None
        return self._layouts.fused

    def _many_rows(self) -> Forward | None:
        """The dense-buffer path for prefill-sized calls, or None where the fused kernel does not apply."""
        return None if self._fused() is None else self._layouts.many_rows

    def _dense_part(self, dtype: torch.dtype) -> _DensePart | None:
        """The outlier-column and bias part for outputs of `dtype`; None when there is none."""
        if not self.n_outliers and self.bias is None:
            return None
        part = self._layouts.dense.get(dtype)
        if part is None:
            part = self._layouts.dense[dtype] = _DensePart(self, dtype)
        return part

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, _KERNELS["enabled"], _KERNELS["fused"])
        run = self._layouts.forwards.get(key)
        if run is None:
            run = self._layouts.forwards[key] = _bind_forward(self, x.dtype)
        return run(x)

    # -- module plumbing ----------------------------------------------------------------------------
    def restore_storage_dtypes(self) -> None:
        """Put the scheme's buffers back in the dtypes its storage declares (a loader that casts every
        float tensor to one dtype changes the scales; the casts are exact both ways)."""
        for name, (_, dtype) in self._storage().items():
            buffer = getattr(self, name)
            buffer.data = buffer.data.to(dtype)
        self.reset_layouts()

    def reset_layouts(self) -> None:
        """Drop what was built from the buffers; `to()` and `load_state_dict` do this themselves, code that
        replaces a buffer's `.data` calls it."""
        self._layouts = _Layouts(self)

    def _apply(self, fn, recurse=True):
        self.reset_layouts()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset_layouts()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.spec.scheme_text()}, "
            f"outlier columns={self.n_outliers}, bias={self.bias is not None}"
        )

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


# -- forward paths: each built once per layer and activation dtype, then called per forward ------------
def _bind_forward(layer: SinkQuantLinear, dtype: torch.dtype) -> Forward:
    """The forward for activations of `dtype`, every layout and decision bound once: at batch 1 a
    layer's matmul takes tens of microseconds, so Python work per call (lookups, branches, attribute
    reads) is kept out of it. The dispatch by rows is the module docstring's."""
    in_f, out_f = layer.in_features, layer.out_features
    fused = many = None
    if layer._kernel_ok(dtype):
        middle = _kernel_path(layer, dtype)
        if dtype == torch.bfloat16:
            fused, many = layer._fused(), layer._many_rows()
    else:
        middle = _dequantized_path(layer, dtype)
        # levels of a non-uniform grid: no PyTorch kernel takes them, the fused kernel does
        if layer.nonuniform and _KERNELS["enabled"] and dtype == torch.bfloat16:
            fused, many = layer._fused(), layer._many_rows()
    compiling = torch.compiler.is_compiling  # sinkquant's kernels are opaque to torch.compile
    rotate = _rotate_inputs(layer)
    # the middle sizes' PyTorch kernel does not take a grid's levels: the fused kernel serves them
    fused_max = DENSE_MIN_ROWS - 1 if layer.nonuniform else FUSED_MAX_ROWS

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, in_f)
        if rotate is not None:
            x2 = rotate(x, x2)
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


def _rotate_inputs(layer: SinkQuantLinear) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """x2 [rows, in] -> a new [rows, in] with the kept columns rotated (the outlier columns as they are),
    for every path below to take as its input; None for a layer without a rotation. The same input,
    unchanged since (its version counter), rotated the same way by the layer called just before, is
    taken from `_LAST_ROTATED` instead of rotated again."""
    rotation = layer._layouts.rotation
    if rotation is None:
        return None
    keep = layer._layouts.keep.to(layer.outlier_idx.device)
    same_rotation = (layer.rotation_block, layer.in_features, bytes(layer.input_signs.cpu().numpy()),
                     bytes(layer.outlier_idx.cpu().numpy()))  # fmt: skip

    def rotate_kept(x2: torch.Tensor) -> torch.Tensor:
        return x2.index_copy(1, keep, rotation.apply(x2.index_select(1, keep)))

    rotate = rotate_kept if layer.n_outliers else rotation.apply

    def run(x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x: the layer's input as passed (what the next linear is called with too), x2 its 2-D view."""
        # autograd: each call builds its own graph; an inference tensor (torch.inference_mode, as vLLM
        # runs) has no version counter to tell whether it changed in place since
        if torch.is_grad_enabled() or x.is_inference():
            return rotate(x2)
        last = getattr(_LAST_ROTATED, "entry", None)
        if last is not None and last[0] == same_rotation and last[1] is x and last[2] == x._version:
            return last[3]
        rotated = rotate(x2)
        _LAST_ROTATED.entry = (same_rotation, x, x._version, rotated)
        return rotated

    return run


def _kernel_path(layer: SinkQuantLinear, dtype: torch.dtype) -> Forward:
    """x2 [rows, in] -> [rows, out] in `dtype` by PyTorch's integer kernel plus the dense part. The
    kernel's bf16 output is cast to `dtype` before the outlier part is added, so a float32 model
    does not sum a massive activation's contribution in bf16."""
    kernel, dense = layer._layouts.pytorch_kernel, layer._dense_part(dtype)

    def run(x2: torch.Tensor) -> torch.Tensor:
        y, outliers = kernel(x2)
        if y.dtype != dtype:
            y = y.to(dtype)
        return y if dense is None else dense(y, x2, outliers)

    return run


def _dequantized_path(layer: SinkQuantLinear, dtype: torch.dtype) -> Forward:
    """x2 [rows, in] -> [rows, out] in `dtype` by a matmul of the dequantized weight, with the
    activations at the precision the scheme's kernel would give them."""
    keep = layer._layouts.keep if layer.n_outliers else None
    to_bf16 = layer.scheme.fallback_rounds_to_bf16(dtype)
    dense = layer._dense_part(torch.float32 if to_bf16 else dtype)

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
