"""compressed-tensors: the on-disk format llm-compressor writes and vLLM (and transformers) serve.

What this module writes, per quantized linear layer `name`, from the format's description (compressed-
tensors 0.17, `pack-quantized` and `int-quantized`) and checked against its own decompressor in the tests:

* `pack-quantized` (W4A16, weight-only): signed codes q in [-2^(b-1), 2^(b-1) - 1], dequantized as
  (q - zero_point) * scale per group of `group_size` consecutive input columns.
      name.weight_packed      int32 [out, ceil(in / 8)]: q + 8 packed eight to an int32, lowest bits first
      name.weight_scale       [out, in / group_size] in the serving dtype
      name.weight_zero_point  int32 [ceil(out / 8), in / group_size]: asymmetric only, zero_point + 8
                              packed eight to an int32 along the *output* dimension
      name.weight_shape       int64 [2]: (out, in)
* `int-quantized` (W8A8: int8 weights per output channel, int8 activations per token, dynamic):
      name.weight             int8 [out, in]
      name.weight_scale       float32 [out, 1]

No format here holds single input columns at full precision, so sinkquant's outlier columns are folded:
the layer's effective weight (integer part dequantized, outlier columns exact) is quantized again on the
format's grid. Where the kept columns' old grid fits the new one (int8, whose per-channel scale only
grows when an outlier column needs it) their codes come back unchanged. vLLM fuses q/k/v and gate/up
into one layer and refuses shards of different precision, so modules left dense (`ignore`) are widened
to their whole fused group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import InputError

#: the compressed-tensors release whose format this writes (config "version")
FORMAT_RELEASE = "0.17.0"
#: the projections vLLM fuses into one layer (its `packed_modules_mapping` for Llama-like models):
#: they must be stored at one precision
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class WeightArgs:
    """One config group's weight quantization, as compressed-tensors' `QuantizationArgs` names it."""

    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    #: the largest |code| written, symmetric grids only (None: the format's full range). Not part of
    #: the format's config: the codes are still int8 on disk, only fewer levels are used
    #: (`NARROW_INT8_LIMIT`).
    code_limit: int | None = None

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"

    def to_dict(self) -> dict:
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size,
            "block_structure": None,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
            "observer_kwargs": {},
        }


#: int8 weight codes in [-64, 64]: x86 CPUs without VNNI (AVX2, and AVX-512 without VNNI) multiply int8
#: in oneDNN, which vLLM's CPU W8A8 uses, with vpmaddubsw: unsigned 8-bit activations (the signed
#: ones shifted by 128) times signed 8-bit weights, summed in pairs into int16, which saturates once
#: 255 * |w| * 2 exceeds 32,767. Codes within 64 never saturate, so the product is exact there; full-
#: range codes make vLLM compute another model than the file holds (eval/results/bench/onednn_int8_avx2.md).
NARROW_INT8_LIMIT = 64


INT8_DYNAMIC_TOKEN = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "strategy": "token",
    "group_size": None,
    "block_structure": None,
    "dynamic": True,
    "actorder": None,
    "observer": None,
    "observer_kwargs": {},
}


# -- the integer grid --------------------------------------------------------------------------------
def quantize_weight(
    weight: torch.Tensor, args: WeightArgs, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight [out, in] float -> (codes int8 [out, in] signed, scale [out, groups] in `scale_dtype`,
    zero point int8 [out, groups] signed, or None when symmetric). Min/max per group; the codes are
    rounded with the scale as stored, so dequantizing the file gives exactly what was measured."""
    out_f, in_f = weight.shape
    group = in_f if args.group_size is None else args.group_size
    if in_f % group:
        raise InputError(f"group size {group} does not divide the input width {in_f}")
    w = weight.float().reshape(out_f, in_f // group, group)
    q_min, q_max = -(1 << (args.bits - 1)), (1 << (args.bits - 1)) - 1
    lo = w.amin(-1).clamp(max=0.0)
    hi = w.amax(-1).clamp(min=0.0)
    if args.code_limit is not None:
        if not args.symmetric:
            raise InputError("a narrowed code range needs a symmetric grid")
        q_min, q_max = -args.code_limit, args.code_limit
        scale = torch.maximum(-lo, hi) / args.code_limit
    elif args.symmetric:
        scale = torch.maximum(-lo, hi) / ((q_max - q_min) / 2)
    else:
        scale = (hi - lo) / (q_max - q_min)
    scale = scale.clamp(min=torch.finfo(torch.float16).tiny).to(scale_dtype)
    s = scale.float()[..., None]
    if args.symmetric:
        zero = None
        codes = torch.round(w / s).clamp(q_min, q_max)
    else:
        zero = torch.round(q_min - lo / scale.float()).clamp(q_min, q_max)
        codes = (torch.round(w / s) + zero[..., None]).clamp(q_min, q_max)
        zero = zero.to(torch.int8)
    return codes.reshape(out_f, in_f).to(torch.int8), scale, zero


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """codes int [out, in], scale [out, groups] (, zero [out, groups]) -> float32 [out, in]."""
    out_f, in_f = codes.shape
    groups = scale.shape[1]
    c = codes.float().reshape(out_f, groups, in_f // groups)
    if zero is not None:
        c = c - zero.float()[..., None]
    return (c * scale.float()[..., None]).reshape(out_f, in_f)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed codes int8 -> int32, 32 // bits to a word along `dim`, lowest bits first, each stored
    as code + 2^(bits-1) (the format's unsigned offset); the last word is padded with zeros."""
    per_word = 32 // bits
    values = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    if dim == 0:
        values = values.t()
    rows, cols = values.shape
    pad = -cols % per_word
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (values.reshape(rows, -1, per_word) << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # as two's complement
    return words.t().contiguous() if dim == 0 else words


def unpack_int32(words: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 words -> signed int8 codes, `length` of them along `dim`."""
    per_word = 32 // bits
    w = words.t() if dim == 0 else words
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (w.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    codes = (values.reshape(w.shape[0], -1)[:, :length] - (1 << (bits - 1))).to(torch.int8)
    return codes.t().contiguous() if dim == 0 else codes


# -- one layer ---------------------------------------------------------------------------------------
def pack_quantized_tensors(
    weight: torch.Tensor, args: WeightArgs, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The `pack-quantized` tensors of one layer (names without the module prefix)."""
    codes, scale, zero = quantize_weight(weight, args, scale_dtype)
    tensors = {
        "weight_packed": pack_int32(codes, args.bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64),
    }
    if zero is not None:
        tensors["weight_zero_point"] = pack_int32(zero, args.bits, dim=0)
    return tensors


def int_quantized_tensors(
    weight: torch.Tensor,
    args: WeightArgs = WeightArgs(8, None, True),
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The `int-quantized` tensors of one layer: signed codes in int8 (int4 ones too: W4A8 stores one
    code per byte, as vLLM's reader expects) and the scales; symmetric only, as vLLM serves it."""
    codes, scale, _ = quantize_weight(weight, args, scale_dtype)
    return {"weight": codes, "weight_scale": scale}


def packed_as_int_quantized(tensors: dict[str, torch.Tensor], args: WeightArgs) -> dict[str, torch.Tensor]:
    """Symmetric `pack-quantized` tensors rewritten as `int-quantized` (the same codes, one per byte)."""
    in_f = int(tensors["weight_shape"][1])
    return {
        "weight": unpack_int32(tensors["weight_packed"], args.bits, in_f),
        "weight_scale": tensors["weight_scale"],
    }


def read_pack_quantized(tensors: dict[str, torch.Tensor], args: WeightArgs) -> torch.Tensor:
    """Dequantize one layer's `pack-quantized` tensors (this module's reader of the format)."""
    out_f, in_f = (int(v) for v in tensors["weight_shape"])
    codes = unpack_int32(tensors["weight_packed"], args.bits, in_f)
    zero = tensors.get("weight_zero_point")
    if zero is not None:
        zero = unpack_int32(zero, args.bits, out_f, dim=0)
    return dequantize_weight(codes, tensors["weight_scale"], zero)


def read_int_quantized(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return dequantize_weight(tensors["weight"], tensors["weight_scale"])


def fold_int8(
    codes: torch.Tensor,
    scale: torch.Tensor,
    keep: torch.Tensor,
    outlier_idx: torch.Tensor,
    outlier_weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """A native int8 layer (codes [out, kept], scale [out]) as `int-quantized` tensors: each row keeps
    its codes and scale where its outlier columns fit that row's grid (|round(w / scale)| <= 127), so
    only the outlier columns are rounded; a row whose outlier columns do not fit is quantized again
    from its effective weight with the larger scale it needs."""
    out_f = codes.shape[0]
    in_f = keep.numel() + outlier_idx.numel()
    s = scale.float()
    folded = torch.round(outlier_weight.float() / s[:, None])
    fits = folded.abs().amax(1) <= 127 if outlier_idx.numel() else torch.ones(out_f, dtype=torch.bool)
    full = torch.empty(out_f, in_f, dtype=torch.int8)
    full[:, keep] = codes.to(torch.int8)
    full[:, outlier_idx.long()] = folded.clamp(-127, 127).to(torch.int8)
    new_scale = s.clone()
    if not bool(fits.all()):
        rows = torch.nonzero(~fits).flatten()
        effective = torch.empty(rows.numel(), in_f)
        effective[:, keep] = codes[rows].float() * s[rows, None]
        effective[:, outlier_idx.long()] = outlier_weight[rows].float()
        again, again_scale, _ = quantize_weight(effective, WeightArgs(8, None, True), torch.float32)
        full[rows], new_scale[rows] = again, again_scale[:, 0]
    return {"weight": full, "weight_scale": new_scale[:, None].contiguous()}


def fold_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    native_group: int,
    keep: torch.Tensor,
    effective: torch.Tensor,
    args: WeightArgs,
    scale_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """A native int4 layer (codes [out, kept] in [0, 15], scale / minimum [out, native groups]) as
    `pack-quantized` tensors of `args`. Every (row, group) is quantized again from the effective weight,
    except where the native grid can be written as it is: a symmetric export of a symmetric layer
    (minimum = -8 scale), a group whose kept columns all come from one native group, and outlier columns
    (the group's other columns) that fit that grid unclipped. There the kept codes and the scale are the
    native ones and only the outlier columns are rounded."""
    tensors = pack_quantized_tensors(effective, args, scale_dtype)
    if not (args.symmetric and bool((minimum.float() == -8 * scale.float()).all())):
        return tensors
    out_f, in_f = effective.shape
    group = in_f if args.group_size is None else args.group_size
    fresh_codes = unpack_int32(tensors["weight_packed"], args.bits, in_f)
    new_scale = tensors["weight_scale"].float()
    source_group = torch.full((in_f,), -1, dtype=torch.long)
    source_group[keep] = torch.arange(keep.numel()) // native_group
    by_group = source_group.view(-1, group)
    kept_here = by_group >= 0
    first = torch.where(kept_here, by_group, by_group.amax(1, keepdim=True)).amin(1)
    single = (kept_here.any(1)) & ((by_group == first[:, None]) | ~kept_here).all(1)
    native_scale = scale.float()[:, first.clamp(min=0)]  # [out, export groups]
    if native_scale.to(scale_dtype).float().ne(native_scale).any():
        return tensors  # the native scales do not survive the export's scale dtype
    on_native = torch.round(effective.view(out_f, -1, group) / native_scale[..., None])
    native_codes = on_native.clone()
    kept_codes = codes.float() - 8
    full_native = torch.empty(out_f, in_f)
    full_native[:, keep] = kept_codes
    is_kept = source_group >= 0
    native_codes = torch.where(is_kept.view(1, -1, group), full_native.view(out_f, -1, group), native_codes)
    fits = ((native_codes >= -8) & (native_codes <= 7)).all(-1) & single[None, :]
    chosen = torch.where(fits[..., None], native_codes, fresh_codes.view(out_f, -1, group).float())
    new_scale = torch.where(fits, native_scale, new_scale)
    tensors["weight_packed"] = pack_int32(chosen.reshape(out_f, in_f).to(torch.int8), args.bits)
    tensors["weight_scale"] = new_scale.to(scale_dtype)
    return tensors


# -- the model's config ------------------------------------------------------------------------------
def export_group_size(requested: int | None, widths: set[int]) -> int | None:
    """The group size to write: `requested` where it divides every input width (vLLM's kernels and
    compressed-tensors need whole groups), else the largest of 64 and 32 below it that does (the
    sizes Marlin, vLLM's GPU W4A16 kernel, accepts besides 128); None (per channel) when `requested`
    is None."""
    if requested is None:
        return None
    if all(w % requested == 0 for w in widths):
        return requested
    for size in (64, 32):
        if size < requested and all(w % size == 0 for w in widths):
            return size
    raise InputError(
        f"neither {requested} nor a smaller group of 64 or 32 divides the input widths "
        f"{sorted(widths)}; pass --group-size with a divisor of all of them"
    )


def widen_to_fused(names: set[str], quantized: list[str]) -> set[str]:
    """`names` plus every module vLLM fuses with one of them (same parent, same fused group)."""
    wide = set(names)
    by_parent: dict[tuple[str, str], list[str]] = {}
    for name in quantized:
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf in group:
                by_parent.setdefault((parent, group[0]), []).append(name)
    for members in by_parent.values():
        if wide & set(members):
            wide |= set(members)
    return wide


def dense_modules(patterns: list[str], quantized: list[str]) -> set[str]:
    """The quantized modules that `patterns` (regular expressions searched in the module name) keep
    dense, widened to their fused groups."""
    chosen = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise InputError(f"--dense {pattern!r} is not a regular expression ({exc})") from exc
        hits = {n for n in quantized if regex.search(n)}
        if not hits:
            raise InputError(f"--dense {pattern!r} matches no quantized module (e.g. {quantized[0]})")
        chosen |= hits
    return widen_to_fused(chosen, quantized)


def quantization_config(
    args: WeightArgs, activations: str, ignore: list[str], targets: list[str] | None = None
) -> dict:
    """config.json's `quantization_config` for one scheme over `targets` (default: every Linear)."""
    fmt = "int-quantized" if activations == "int8" else "pack-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "version": FORMAT_RELEASE,
        "config_groups": {
            "group_0": {
                "targets": targets or ["Linear"],
                "weights": args.to_dict(),
                "input_activations": dict(INT8_DYNAMIC_TOKEN) if activations == "int8" else None,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def bits_per_weight(args: WeightArgs, scale_bits: int, activations: str = "none") -> float:
    """Storage bits per weight of the integer part: codes, scales and (asymmetric) zero points. The
    `int-quantized` layout of int8 activations stores each code in a byte, int4 ones included."""
    code_bits = 8 if activations == "int8" else args.bits
    if args.group_size is None:
        return float(code_bits)
    extra = scale_bits + (0 if args.symmetric else args.bits)
    return code_bits + extra / args.group_size


def relative_error(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new - old|| / ||old|| (Frobenius): how far folding moved one layer's effective weight."""
    return float((new - old).norm() / old.norm().clamp(min=torch.finfo(torch.float32).tiny))
