"""sinkquant's own fused int4 / int8 matrix-vector kernel for CPUs with AVX2 + FMA, and the Python side
of its calls (the C++ is in sinkquant/csrc, built on first use by `build.py`).

Why: at batch 1 (decode), PyTorch's integer CPU kernels are compute-bound on AVX2, and a
`SinkQuantLinear` pays more ops around them per call (zero-pad, gather of the kept columns, a thin addmm
for the outlier columns), so the layer was slower than a bf16 `F.linear`. `GemvLayer` does all of it in
one call: it gathers the kept inputs into group-padded float32 rows with their per-group sums, then for
each output row sums `scale * Σ code·x (+ minimum * Σ x for int4)` over the groups (float32 FMA, two
rows at a time), adds the outlier columns and the bias, and writes the output in the input's dtype
(float32 or bf16); an int4 layer on a non-uniform grid (`format/features/grid.py`) sums `levels[code]·x` instead
of `code·x`, each code looked up in a register holding the layer's 16 levels. A layer's tensors are
bound into one `GemvLayer` object once, so a call converts a
single argument. Numbers: float32 accumulation of the exact codes, scales and minima (what
`SinkQuantLinear.dequantized_kept` holds) against the activations as given.

Layouts (built once per layer in memory; the checkpoint format does not change):
- int4 (`int4_layout`): the codes of each group padded with zero codes to `stride` (the group size
  rounded up to a run: 16 codes for AVX2, 32 for AVX-512), and each run packed in half as many bytes,
  byte j = code[j] | code[j + run / 2] << 4, so one load widened to run / 2 int32 lanes gives codes j
  (low nibbles) and j + run / 2 (high nibbles).
- int8 (`int8_layout`): each row's kept codes padded with zero codes to a whole run, as bytes.

The same extension serves two more calls that were many small torch ops: `GemvLayer.dequantize_into`
writes a layer's dense weight (bf16 or float32, outlier columns 0) for calls with many input rows
(prefill: one BLAS matmul instead of reading the codes once per row), and `unpack_dequantize` unpacks
and dequantizes a packed KV-cache tensor with the torch ops' numbers bit for bit.

The extension is built for AVX-512 where the CPU has it (16 float lanes) and AVX2 + FMA otherwise (8
lanes), from the same sources. Where it cannot be built (said once per machine, see `build.py`) or the
CPU lacks AVX2 (said once per process), `fused_kernels()` returns None and `SinkQuantLinear` keeps
PyTorch's kernels. `SINKQUANT_FUSED_KERNEL=0` switches it off, `=avx2` picks the AVX2 build on an
AVX-512 CPU.
"""

from __future__ import annotations

import os
import warnings

import torch

from .build import load_extension

#: codes per call below which the kernel runs on one thread (waking a second one costs more than it saves)
PARALLEL_CODES = 65536
#: rows ahead whose codes are prefetched while a row pair is summed: without it one core's loop keeps
#: too few DRAM reads in flight to use the memory bandwidth; 16 did better than 0 and 32 on large layers
#: (eval/bench/bench_kernels.py)
PREFETCH_ROWS = 16
_BUILT: dict[str, object] = {}


def best_isa() -> str | None:
    """The instruction set the fused kernel is built for on this CPU ("avx512", "avx2"), or None.
    `SINKQUANT_FUSED_KERNEL=0` switches the kernel off, `=avx2` keeps an AVX-512 CPU on the AVX2 build."""
    choice = os.environ.get("SINKQUANT_FUSED_KERNEL", "1").lower()
    if choice == "0":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and choice != "avx2":
        return "avx512"
    return "avx2" if capability in ("AVX2", "AVX512") else None


def fused_kernels(isa: str | None = None):
    """The compiled extension for `isa` (default: `best_isa()`), with the `GemvLayer` class,
    `unpack_dequantize` and `CODES_PER_RUN`, or None where it cannot run here."""
    isa = isa or best_isa()
    if isa is None:
        if "none" not in _BUILT and os.environ.get("SINKQUANT_FUSED_KERNEL", "1") != "0":
            warnings.warn(
                "sinkquant: the fused integer kernel needs AVX2 "
                f"(this CPU: {torch.backends.cpu.get_cpu_capability()}); using PyTorch's kernels",
                stacklevel=2,
            )
        _BUILT["none"] = None
        return None
    if isa not in _BUILT:
        _BUILT[isa] = load_extension(isa)
    return _BUILT[isa]


def bind_layer(
    module,
    bits: int,
    codes: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor | None,
    keep: torch.Tensor,
    group_size: int,
    outlier_idx: torch.Tensor,
    outlier_weight: torch.Tensor,
    bias: torch.Tensor | None,
    levels: torch.Tensor | None = None,
):
    """One layer's numbers in the kernel's layout, bound into a `GemvLayer` of the extension `module`.
    codes: int8 [out, kept] (bits 8, scale [out]) or uint8 [out, kept] (bits 4, scale and minimum
    [out, groups]); `levels` float32 [16]: int4 codes index them (a non-uniform grid)."""
    run = int(module.CODES_PER_RUN)
    if bits == 4:
        packed, stride = int4_layout(codes, group_size, run)
        scale, minimum, group = scale.float(), minimum.float(), group_size
    else:
        packed, stride = int8_layout(codes, run)
        scale, minimum, group = scale.float().view(-1, 1), torch.empty(0), stride
    return module.GemvLayer(
        bits,
        packed,
        scale.contiguous(),
        minimum.contiguous(),
        keep.long().contiguous(),
        group,
        stride,
        outlier_idx.long().contiguous(),
        outlier_weight.float().contiguous(),
        bias.float().contiguous() if bias is not None else torch.empty(0),
        PARALLEL_CODES,
        PREFETCH_ROWS,
        levels.float().contiguous() if levels is not None else torch.empty(0),
    )


def int4_layout(codes: torch.Tensor, group_size: int, run: int = 16) -> tuple[torch.Tensor, int]:
    """codes uint8 [out, kept] (kept columns in order, groups of `group_size`, the last may be shorter)
    -> (packed uint8 [out, groups * stride / 2], stride): each group padded with zero codes to `stride`
    (the group size rounded up to a whole `run`), each run of codes packed in run / 2 bytes, byte j =
    code[j] | code[j + run / 2] << 4."""
    out, kept = codes.shape
    groups = -(-kept // group_size)
    stride = -(-group_size // run) * run
    full = torch.zeros(out, groups * stride, dtype=torch.uint8, device=codes.device)
    columns = torch.arange(kept, device=codes.device)
    full[:, (columns // group_size) * stride + columns % group_size] = codes.to(torch.uint8)
    runs = full.view(out, groups * stride // run, 2, run // 2)
    packed = (runs[:, :, 0, :] | (runs[:, :, 1, :] << 4)).reshape(out, groups * stride // 2).contiguous()
    return packed, stride


def int8_layout(codes: torch.Tensor, run: int = 16) -> tuple[torch.Tensor, int]:
    """codes int8 [out, kept] -> (bytes uint8 [out, stride], stride): each row padded with zero codes to
    a whole number of runs (a zero code adds nothing), reinterpreted as bytes for the kernel."""
    out, kept = codes.shape
    stride = max(run, -(-kept // run) * run)
    padded = torch.zeros(out, stride, dtype=torch.int8, device=codes.device)
    padded[:, :kept] = codes
    return padded.view(torch.uint8), stride
