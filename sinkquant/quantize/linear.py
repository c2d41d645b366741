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

The forward paths (which kernel serves a call, by input rows and activation dtype) are `dispatch`'s;
`use_kernels`, `use_fused_kernel`, `kernels_available`, `forget_rotated_input`, `FUSED_MAX_ROWS` and
`DENSE_MIN_ROWS` are importable from here too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..format import FEATURES, BufferSpecs, LayerSpec
from ..format.features.rotation import InputRotation
from ..format.primitives import complement_indices
from ..format.schemes import SCHEMES, PytorchKernel, Stored, WeightScheme
from .dispatch import (
    DENSE_MIN_ROWS,
    FUSED_MAX_ROWS,
    KERNELS,
    Layouts,
    bind_forward,
    forget_rotated_input,
    fused_kernel,
    kernel_ok,
    kernels_available,
    many_rows,
    use_fused_kernel,
    use_kernels,
)

__all__ = [
    "DENSE_MIN_ROWS",
    "FUSED_MAX_ROWS",
    "SinkQuantLinear",
    "forget_rotated_input",
    "kernels_available",
    "use_fused_kernel",
    "use_kernels",
]


class SinkQuantLinear(nn.Module):
    """A linear layer whose kept input columns are integers (the weight scheme of `bits`) and whose
    outlier input columns and bias stay at full precision."""

    def __init__(self, spec: LayerSpec, device: torch.device | str | None = None) -> None:
        """An empty layer of `spec`'s shapes (`from_float` or a loader fills its buffers)."""
        super().__init__()
        self.in_features, self.out_features, self.bits = spec.in_features, spec.out_features, spec.bits
        self.n_outliers, self.in_kept = spec.outliers, spec.kept
        self.group_size = SCHEMES[spec.bits].group_size(spec.kept, spec.group_size)
        # the layer in the checkpoint's format (`quantization_config.layers`); a group of the whole
        # row is written as None (per channel)
        whole_row = self.group_size == spec.kept
        self.spec = replace(spec, group_size=None) if whole_row and spec.group_size is not None else spec
        self.outlier_dtype = getattr(torch, spec.dtype)
        # the buffers as the format lays them out (the scheme's as the features change them, the
        # outlier columns, then each feature's own), the bias after the outlier columns
        for name, (shape, dtype) in spec.shapes().items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
            if name == "outlier_weight":
                if spec.bias:
                    self.register_buffer(
                        "bias", torch.empty(spec.out_features, dtype=self.outlier_dtype, device=device)
                    )
                else:
                    self.bias = None
        if "weight_min" not in self._buffers:
            self.weight_min = None  # a scheme or feature without minima (int8, symmetric int4)
        self._layouts = Layouts(self)

    @property
    def scheme(self) -> WeightScheme:
        return SCHEMES[self.spec.bits]

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
        # each feature's state as its algorithm made it (the layer's spec field follows from it)
        states = {
            name: state for name, state in (("rotation", rotation), ("grid", levels)) if state is not None
        }
        spec = LayerSpec(
            in_features, out_features, bits, group_size, idx.numel(), bias is not None,
            str(dtype).replace("torch.", ""), symmetric, log_scales,
            **{name: FEATURES[name].spec_value(state) for name, state in states.items()},
        )  # fmt: skip
        module = cls(spec)
        stored = _integer_part(module, weight, keep, codes, scale, minimum, importance, clip_search, states)
        _write_buffers(module, stored, weight, bias, idx, states)
        return module

    # -- numbers ------------------------------------------------------------------------------------
    def dequantized_kept(self) -> torch.Tensor:
        """float32 [out, in_kept]: the integer part as real numbers."""
        return self.scheme.dequantize(self._stored(), self.in_kept, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: the effective weight in the input's own basis (outlier columns exactly as
        stored; a rotated layer's kept columns W' Rᵀ)."""
        full = torch.empty(self.out_features, self.in_features)
        kept, transform = self.dequantized_kept(), self._layouts.input_transform
        full[:, self._layouts.keep] = kept if transform is None else transform.apply_transposed(kept)
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
        keep, levels = self._layouts.keep, self._buffers.get("weight_levels")
        return (*scheme_part, keep, self.group_size, self.outlier_idx, self.outlier_weight, self.bias, levels)

    # -- kernels (the forward paths' views of this layer: dispatch.py) ----------------------------------
    _kernel_ok = kernel_ok
    _fused = fused_kernel
    _many_rows = many_rows

    def _pytorch_kernel(self) -> PytorchKernel:
        return self._layouts.pytorch_kernel

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, KERNELS["enabled"], KERNELS["fused"])
        run = self._layouts.forwards.get(key)
        if run is None:
            run = self._layouts.forwards[key] = bind_forward(self, x.dtype)
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
        self._layouts = Layouts(self)

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


# -- construction: `SinkQuantLinear.from_float`'s parts ------------------------------------------------
def _integer_part(
    module: SinkQuantLinear, weight: torch.Tensor, keep: torch.Tensor, codes: torch.Tensor | None,
    scale: torch.Tensor | None, minimum: torch.Tensor | None, importance: torch.Tensor | None,
    clip_search: bool, states: dict[str, Any],
) -> Stored:  # fmt: skip
    """The integer part of `module` (empty, built by `from_float`) for the `keep` columns of `weight`:
    round-to-nearest, or the `codes`/`scale`/`minimum` chosen elsewhere, refused where this layer's
    storage cannot hold them (each feature's `check_rtn` / `check_chosen`)."""
    spec, features = module.spec, module.spec.features()
    if codes is None:
        for feature in features:
            feature.check_rtn(spec)
        if states and importance is not None:
            raise ValueError("importance is per input column; a rotated layer mixes the columns")
        kept_weight = weight.float()[:, keep]
        for feature in features:
            kept_weight = feature.transform_kept(states.get(feature.field), kept_weight)
        return module.scheme.quantize(
            kept_weight,
            module.group_size,
            symmetric=spec.symmetric,
            importance=None if importance is None else importance.float()[keep],
            clip_search=clip_search,
            log_scales=spec.log_scales,
        )
    # parameters chosen elsewhere (GPTQ): they must be ones this layer's storage can hold
    stored = module.scheme.store(codes, scale, minimum)
    for feature in features:
        feature.check_chosen(spec, module.scheme, stored)
    return stored


def _write_buffers(
    module: SinkQuantLinear, stored: Stored, weight: torch.Tensor, bias: torch.Tensor | None,
    idx: torch.Tensor, states: dict[str, Any],
) -> None:  # fmt: skip
    """Fill the buffers of `module` (empty, built by `from_float`): the scheme's from `stored`, the
    outlier columns `idx` of `weight`, the bias and each feature's own (the rotation's signs, the
    grid's levels) from its state."""
    spec, dtype = module.spec, module.outlier_dtype
    buffers = module.scheme.buffers(
        stored, module.in_kept, module.group_size, spec.symmetric, spec.log_scales
    )
    for name, tensor in buffers.items():
        getattr(module, name).copy_(tensor)
    module.outlier_idx.copy_(idx.to(torch.int32))
    module.outlier_weight.copy_(weight[:, idx].to(dtype))
    for feature in spec.features():
        feature.write(module, states.get(feature.field))
    if bias is not None:
        module.bias.copy_(bias.to(dtype))
