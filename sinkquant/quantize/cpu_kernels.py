"""sinkquant's own fused int4 matrix-vector kernel for CPUs with AVX2 + FMA, built on first use.

Why: at batch 1 (decode), PyTorch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) is compute-bound
on AVX2 (about 7.6 GB/s of weights on a 4096 x 4096 layer here) and a `SinkQuantLinear` pays three
more ops around it per call (zero-pad, gather of the kept columns, a thin addmm for the outlier
columns): about 25 us at SmolLM2's shapes, where the kernel itself takes 28 us, so the layer was
slower than a bf16 `F.linear`. `Int4Gemv` does all of it in one call: it gathers the kept inputs
into group-padded float32 rows with their per-group sums, then for each output row sums
`scale * Σ code·x + minimum * Σ x` over the groups (float32 FMA, two rows at a time) and adds the
outlier columns and the bias, and writes the output in the input's dtype (float32 or bf16). A
layer's tensors are bound into one `Int4Gemv` object once, so a call converts a single argument.
Numbers: float32 accumulation of the exact codes, scales and minima (what
`SinkQuantLinear.dequantized_kept` holds) against the activations as given.

Layout (`int4_layout`, built once per layer in memory; the checkpoint format does not change): the
codes of each group padded with zero codes to `stride` (the group size rounded up to 16), and each
run of 16 codes packed as 8 bytes, byte j = code[j] | code[j + 8] << 4, so one 8-byte load widened to
8 int32 lanes gives codes j (low nibbles) and j + 8 (high nibbles).

The extension is compiled with `torch.utils.cpp_extension.load_inline` (a C++ compiler and ninja;
about 30 s once, then cached by torch under ~/.cache/torch_extensions). Where it cannot be built or
the CPU lacks AVX2, `fused_int4()` returns None once with a warning and `SinkQuantLinear` keeps
PyTorch's kernel. `SINKQUANT_FUSED_KERNEL=0` switches it off.
"""

from __future__ import annotations

import os
import warnings

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

// sum_j code[j] * x[j] over `len` codes (a multiple of 16) of two rows: shared x loads, four FMA chains
static inline void dot2(const uint8_t* w0, const uint8_t* w1, const float* x, int64_t len, float& d0, float& d1) {
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  for (int64_t c = 0; c < len; c += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w0 + c / 2)));
    const __m256i r = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w1 + c / 2)));
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low4)), x0, a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), x1, a1);
    b0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(r, low4)), x0, b0);
    b1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 4)), x1, b1);
  }
  d0 = hsum256(_mm256_add_ps(a0, a1));
  d1 = hsum256(_mm256_add_ps(b0, b1));
}

static inline float dot1(const uint8_t* w, const float* x, int64_t len) {
  const __m256i low4 = _mm256_set1_epi32(15);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t c = 0; c < len; c += 16) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c / 2)));
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, low4)), _mm256_loadu_ps(x + c), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), _mm256_loadu_ps(x + c + 8), a1);
  }
  return hsum256(_mm256_add_ps(a0, a1));
}

// One layer's int4 weights in the fused layout, bound once; forward(x [rows, in]) -> [rows, out] in x's
// dtype (float32 or bfloat16), accumulated in float32. A class, so a call converts one tensor argument.
struct Int4Gemv {
  torch::Tensor packed, scale, minimum, keep, outlier_idx, outlier_weight, bias;
  int64_t group, stride;

  Int4Gemv(torch::Tensor packed_, torch::Tensor scale_, torch::Tensor minimum_, torch::Tensor keep_,
           int64_t group_, int64_t stride_, torch::Tensor outlier_idx_, torch::Tensor outlier_weight_,
           torch::Tensor bias_)
      : packed(packed_.contiguous()), scale(scale_.contiguous()), minimum(minimum_.contiguous()),
        keep(keep_.contiguous()), outlier_idx(outlier_idx_.contiguous()),
        outlier_weight(outlier_weight_.contiguous()), bias(bias_.contiguous()), group(group_), stride(stride_) {
    TORCH_CHECK(packed.dim() == 2 && scale.dim() == 2 && minimum.sizes() == scale.sizes(),
                "Int4Gemv: packed [out, bytes], scale/minimum [out, groups]");
    TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && scale.scalar_type() == torch::kFloat32 &&
                minimum.scalar_type() == torch::kFloat32 && keep.scalar_type() == torch::kInt64 &&
                outlier_idx.scalar_type() == torch::kInt64, "Int4Gemv: unexpected dtypes");
    TORCH_CHECK(stride % 16 == 0 && group <= stride, "Int4Gemv: stride must be a multiple of 16 >= group");
    TORCH_CHECK(packed.size(1) == scale.size(1) * stride / 2 && scale.size(0) == packed.size(0),
                "Int4Gemv: layout mismatch");
    const int64_t n_o = outlier_idx.size(0);
    TORCH_CHECK(n_o == 0 || (outlier_weight.scalar_type() == torch::kFloat32 &&
                outlier_weight.size(0) == packed.size(0) && outlier_weight.size(1) == n_o),
                "Int4Gemv: outlier_weight must be float32 [out, n_outliers]");
    TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == packed.size(0)),
                "Int4Gemv: bias must be float32 [out] or empty");
  }

  template <typename T>
  void gather(const T* xr, float* xk, float* xsum, float* xo) const {
    const int64_t kept = keep.size(0), groups = scale.size(1), n_o = outlier_idx.size(0);
    const int64_t* kp = keep.data_ptr<int64_t>();
    const int64_t* op = outlier_idx.data_ptr<int64_t>();
    std::fill(xk, xk + groups * stride, 0.f);
    std::fill(xsum, xsum + groups, 0.f);
    for (int64_t k = 0; k < kept; ++k) {
      const int64_t g = k / group;
      const float v = static_cast<float>(xr[kp[k]]);
      xk[g * stride + (k - g * group)] = v;
      xsum[g] += v;
    }
    for (int64_t o = 0; o < n_o; ++o) xo[o] = static_cast<float>(xr[op[o]]);
  }

  template <typename T>
  void rows_out(const float* xk, const float* xsum, const float* xo, T* yr) const {
    const int64_t n_out = packed.size(0), groups = scale.size(1), n_o = outlier_idx.size(0);
    const int64_t row_bytes = packed.size(1);
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float* s = scale.data_ptr<float>();
    const float* m = minimum.data_ptr<float>();
    const float* wo = n_o ? outlier_weight.data_ptr<float>() : nullptr;
    const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
    // below ~64k codes a second thread costs more to wake than it saves
    const int64_t grain = n_out * row_bytes * 2 < 65536 ? n_out : 16;
    at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
      int64_t n = begin;
      for (; n + 1 < end; n += 2) {
        const uint8_t* w0 = w + n * row_bytes;
        float acc0 = 0.f, acc1 = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          float d0, d1;
          dot2(w0 + g * (stride / 2), w0 + row_bytes + g * (stride / 2), xk + g * stride, stride, d0, d1);
          acc0 += s[n * groups + g] * d0 + m[n * groups + g] * xsum[g];
          acc1 += s[(n + 1) * groups + g] * d1 + m[(n + 1) * groups + g] * xsum[g];
        }
        for (int64_t o = 0; o < n_o; ++o) {
          acc0 += wo[n * n_o + o] * xo[o];
          acc1 += wo[(n + 1) * n_o + o] * xo[o];
        }
        if (b) { acc0 += b[n]; acc1 += b[n + 1]; }
        yr[n] = static_cast<T>(acc0);
        yr[n + 1] = static_cast<T>(acc1);
      }
      for (; n < end; ++n) {
        const uint8_t* wr = w + n * row_bytes;
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g)
          acc += s[n * groups + g] * dot1(wr + g * (stride / 2), xk + g * stride, stride) + m[n * groups + g] * xsum[g];
        for (int64_t o = 0; o < n_o; ++o) acc += wo[n * n_o + o] * xo[o];
        if (b) acc += b[n];
        yr[n] = static_cast<T>(acc);
      }
    });
  }

  torch::Tensor forward(torch::Tensor x) const {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "Int4Gemv: x must be contiguous [rows, in]");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
                "Int4Gemv: x must be float32 or bfloat16");
    const int64_t rows = x.size(0), in_f = x.size(1), n_out = packed.size(0), groups = scale.size(1);
    auto y = torch::empty({rows, n_out}, x.options());
    std::vector<float> xk(groups * stride), xsum(groups), xo(outlier_idx.size(0) + 1);
    for (int64_t r = 0; r < rows; ++r) {
      if (x.scalar_type() == torch::kBFloat16) {
        gather(x.data_ptr<at::BFloat16>() + r * in_f, xk.data(), xsum.data(), xo.data());
        rows_out(xk.data(), xsum.data(), xo.data(), y.data_ptr<at::BFloat16>() + r * n_out);
      } else {
        gather(x.data_ptr<float>() + r * in_f, xk.data(), xsum.data(), xo.data());
        rows_out(xk.data(), xsum.data(), xo.data(), y.data_ptr<float>() + r * n_out);
      }
    }
    return y;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  pybind11::class_<Int4Gemv>(mod, "Int4Gemv")
      .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t,
                          torch::Tensor, torch::Tensor, torch::Tensor>())
      .def("__call__", &Int4Gemv::forward);
}
"""

_STATE: dict = {"built": False, "module": None}


def fused_int4():
    """The compiled extension (with the `Int4Gemv` class), or None where it cannot run here (said once)."""
    if not _STATE["built"]:
        _STATE["built"] = True
        _STATE["module"] = _build()
    return _STATE["module"]


def _build():
    if os.environ.get("SINKQUANT_FUSED_KERNEL", "1") == "0":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        warnings.warn(
            f"sinkquant: the fused int4 kernel needs AVX2 (this CPU: {capability}); using PyTorch's",
            stacklevel=3,
        )
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name="sinkquant_cpu_int4_v2",
            cpp_sources=_SOURCE,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a build error: PyTorch's kernel still works
        reason = " ".join(str(exc).split())[:200]
        warnings.warn(
            f"sinkquant: could not build the fused int4 kernel ({reason}); using PyTorch's", stacklevel=3
        )
        return None


def int4_layout(codes: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """codes uint8 [out, kept] (kept columns in order, groups of `group_size`, the last may be shorter)
    -> (packed uint8 [out, groups * stride / 2], stride): see the module docstring."""
    out, kept = codes.shape
    groups = -(-kept // group_size)
    stride = -(-group_size // 16) * 16
    full = torch.zeros(out, groups * stride, dtype=torch.uint8, device=codes.device)
    columns = torch.arange(kept, device=codes.device)
    full[:, (columns // group_size) * stride + columns % group_size] = codes.to(torch.uint8)
    runs = full.view(out, groups * stride // 16, 2, 8)
    packed = (runs[:, :, 0, :] | (runs[:, :, 1, :] << 4)).reshape(out, groups * stride // 2).contiguous()
    return packed, stride
