"""The GGUF tensor types this writer produces: each packs float32 rows into the bytes llama.cpp reads.

Every packer returns the packed array (in the shape `gguf.GGUFWriter.add_tensor(..., raw_dtype=...)`
takes) and the float32 weights those bytes decode to, so callers can measure and test the rounding
without a decoder of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

BLOCK = 32  # elements per block of Q8_0 and Q4_0 (ggml's QK8_0, QK4_0)


@dataclass(frozen=True)
class Packed:
    """`data`: what goes into the file; `intended`: float32 [rows, cols], what `data` decodes to."""

    data: np.ndarray
    intended: np.ndarray


@dataclass(frozen=True)
class GGUFType:
    """One tensor type: its ggml enum, the file type it names for the whole file, and its packer."""

    name: str
    ggml: GGMLQuantizationType
    file_type: LlamaFileType
    pack: Callable[[np.ndarray], Packed]

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def bits(self) -> float:
        """Bits per weight, scales included."""
        block, size = GGML_QUANT_SIZES[self.ggml]
        return 8 * size / block

    def fits(self, cols: int) -> bool:
        """Whether rows of `cols` elements split into whole blocks."""
        return cols % self.block_size == 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml]
        return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _pack_f32(x: np.ndarray) -> Packed:
    data = np.ascontiguousarray(x, dtype=np.float32)
    return Packed(data, data)


def _pack_f16(x: np.ndarray) -> Packed:
    data = np.ascontiguousarray(x, dtype=np.float32).astype(np.float16)
    return Packed(data, data.astype(np.float32))


def _pack_bf16(x: np.ndarray) -> Packed:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    # round to nearest even on the 16 bits dropped, as ggml_compute_fp32_to_bf16 does; NaN stays a quiet NaN
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    top = np.where(nan, (bits >> 16) | 64, rounded).astype(np.uint16)
    intended = (top.astype(np.uint32) << 16).view(np.float32)
    return Packed(top.view(np.uint8).reshape(*x.shape[:-1], -1), intended)


def _blocks(x: np.ndarray) -> np.ndarray:
    """[rows, cols] -> [rows * cols / 32, 32] float32."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, BLOCK)


def _scale(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fp16 scale as stored, and 1/scale (0 for an all-zero block, whose codes then are 0)."""
    d16 = d.astype(np.float16)
    d32 = d16.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d32 == 0, np.float32(0), np.float32(1) / d32).astype(np.float32)
    return d16, inv


def _pack_q8_0(x: np.ndarray) -> Packed:
    blocks = _blocks(x)
    d16, inv = _scale(np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127))
    # codes are rounded against the fp16 scale the file holds (not the fp32 one ggml's reference uses):
    # that is the scale the decoder multiplies by, so the decoded error is the smaller one
    q = np.clip(np.rint(blocks * inv), -127, 127).astype(np.int8)
    data = np.concatenate([d16.view(np.uint8), q.view(np.uint8)], axis=1)
    intended = d16.astype(np.float32) * q.astype(np.float32)
    return Packed(data.reshape(*x.shape[:-1], -1), intended.reshape(x.shape))


def _pack_q4_0(x: np.ndarray) -> Packed:
    blocks = _blocks(x)
    # the element of largest magnitude, with its sign, maps to code 0 (-8 d) exactly; the other end then
    # reaches only +7 d, which is why the scale keeps the sign
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
    d16, inv = _scale(peak / np.float32(-8))
    q = np.clip(np.rint(blocks * inv) + 8, 0, 15).astype(np.uint8)
    # byte j holds element j in its low nibble and element j + 16 in its high nibble (dequantize_row_q4_0)
    nibbles = q[:, : BLOCK // 2] | (q[:, BLOCK // 2 :] << np.uint8(4))
    data = np.concatenate([d16.view(np.uint8), nibbles], axis=1)
    intended = d16.astype(np.float32) * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
    return Packed(data.reshape(*x.shape[:-1], -1), intended.reshape(x.shape))


GGUF_TYPES: dict[str, GGUFType] = {
    "F32": GGUFType("F32", GGMLQuantizationType.F32, LlamaFileType.ALL_F32, _pack_f32),
    "F16": GGUFType("F16", GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, _pack_f16),
    "BF16": GGUFType("BF16", GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, _pack_bf16),
    "Q8_0": GGUFType("Q8_0", GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, _pack_q8_0),
    "Q4_0": GGUFType("Q4_0", GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0, _pack_q4_0),
}


def gguf_type(name: str) -> GGUFType:
    """The registry entry for `name` (case-insensitive); InputError listing the supported ones."""
    from ..errors import InputError

    entry = GGUF_TYPES.get(name.upper())
    if entry is None:
        raise InputError(f"unknown GGUF type {name!r}: use one of {', '.join(GGUF_TYPES)}")
    return entry
