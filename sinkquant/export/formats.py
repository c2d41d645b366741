"""The export formats (`EXPORT_FORMATS`, the registry): for each, how a layer's effective weight becomes
its tensors on disk, how they read back, and the `quantization_config` that goes into config.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..format.primitives import unpack_bits
from . import compressed_tensors as ct


@dataclass(frozen=True)
class ExportFormat:
    """One target format: how a layer's effective weight becomes tensors, and how they read back."""

    name: str
    write: Callable[[nn.Module, ct.WeightArgs, torch.dtype, str], dict[str, torch.Tensor]]
    quantize: Callable[[torch.Tensor, ct.WeightArgs, torch.dtype, str], dict[str, torch.Tensor]]
    read: Callable[[dict[str, torch.Tensor], ct.WeightArgs, str], torch.Tensor]
    config: Callable[[ct.WeightArgs, str, list[str]], dict]


def _ct_write(module, args, scale_dtype, activations):
    """A native layer (`SinkQuantLinear`) as compressed-tensors tensors, its grid kept where it can be."""
    keep = module._layouts.keep
    if module.bits == 8:
        tensors = ct.fold_int8(
            module.weight, module.group_scale(), keep, module.outlier_idx, module.outlier_weight
        )
        return tensors if activations == "int8" else _int8_as_packed(tensors)
    codes = unpack_bits(module.weight, 4, module.in_kept)
    packed = ct.fold_int4(
        codes,
        module.group_scale(),
        module.group_minimum(),
        module.group_size,
        keep,
        module.dequantized_weight(),
        args,
        scale_dtype,
    )
    return ct.packed_as_int_quantized(packed, args) if activations == "int8" else packed


def _int8_as_packed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 per channel as `pack-quantized` 8-bit (weight-only W8A16, which GPUs serve)."""
    codes = tensors["weight"]
    return {
        "weight_packed": ct.pack_int32(codes, 8),
        "weight_scale": tensors["weight_scale"],
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }


def _ct_quantize(weight, args, scale_dtype, activations):
    """A weight the export changed (smoothing): quantized afresh on the format's grid."""
    if activations == "int8":
        return ct.int_quantized_tensors(weight, args, scale_dtype if args.bits == 4 else torch.float32)
    return ct.pack_quantized_tensors(weight, args, scale_dtype)


def _ct_read(tensors, args, activations):
    return ct.read_int_quantized(tensors) if activations == "int8" else ct.read_pack_quantized(tensors, args)


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "compressed-tensors": ExportFormat(
        "compressed-tensors", _ct_write, _ct_quantize, _ct_read, ct.quantization_config
    ),
}


def keys_by_module(keys: list[str], modules: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """The tensor names of each module in `modules` (its direct tensors: `name.weight`, ...) and the
    names outside them, in one pass over the names."""
    by_module: dict[str, list[str]] = {name: [] for name in modules}
    outside = []
    for key in keys:
        owner = key.rsplit(".", 1)[0]
        (by_module[owner] if owner in by_module else outside).append(key)
    return by_module, outside
