"""sinkquant's own fused int4 / int8 matrix-vector kernel for CPUs with AVX2 + FMA, built on first use.

Why: at batch 1 (decode), PyTorch's integer CPU kernels are compute-bound on AVX2
(`_weight_int4pack_mm_for_cpu` read about 7.6 GB/s of weights on a 4096 x 4096 layer here) and a
`SinkQuantLinear` pays more ops around them per call (zero-pad, gather of the kept columns, a thin addmm
for the outlier columns): about 25 us at SmolLM2's shapes, where the int4 kernel itself takes 28 us, so
the layer was slower than a bf16 `F.linear`. `GemvLayer` does all of it in one call: it gathers the kept
inputs into group-padded float32 rows with their per-group sums, then for each output row sums
`scale * Σ code·x (+ minimum * Σ x for int4)` over the groups (float32 FMA, two rows at a time), adds the
outlier columns and the bias, and writes the output in the input's dtype (float32 or bf16). A layer's
tensors are bound into one `GemvLayer` object once, so a call converts a single argument. Numbers:
float32 accumulation of the exact codes, scales and minima (what `SinkQuantLinear.dequantized_kept`
holds) against the activations as given.

Layouts (built once per layer in memory; the checkpoint format does not change):
- int4 (`int4_layout`): the codes of each group padded with zero codes to `stride` (the group size
  rounded up to a run: 16 codes for AVX2, 32 for AVX-512), and each run packed in half as many bytes,
  byte j = code[j] | code[j + run / 2] << 4, so one load widened to run / 2 int32 lanes gives codes j
  (low nibbles) and j + run / 2 (high nibbles).
- int8 (`int8_layout`): each row's kept codes padded with zero codes to a whole run, as bytes.

The same extension serves two more calls that were many small torch ops: `GemvLayer.dequantize_into`
writes a layer's dense weight (bf16 or float32, outlier columns 0) for calls with many input rows
(prefill: one BLAS matmul instead of reading the codes once per row), and `unpack_dequantize` unpacks
and dequantizes a packed KV-cache tensor with the torch ops' numbers bit for bit (the file is compiled
with -ffp-contract=off for that).

The extension is compiled with `torch.utils.cpp_extension.load_inline` (a C++ compiler and ninja;
about 30 s once, then cached by torch under ~/.cache/torch_extensions), for AVX-512 where the CPU has it
(16 float lanes) and AVX2 + FMA otherwise (8 lanes), from one source. Where it cannot be built or the
CPU lacks AVX2, `fused_kernels()` returns None once with a warning and `SinkQuantLinear` keeps PyTorch's
kernels. `SINKQUANT_FUSED_KERNEL=0` switches it off, `=avx2` picks the AVX2 build on an AVX-512 CPU.
"""

from __future__ import annotations

import os
import warnings

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>

// One vector of W float lanes: AVX-512 (W = 16) where the build targets it, else AVX2 (W = 8).
// A "run" is 2W codes: int4 runs sit in W bytes (byte j = code[j] | code[j + W] << 4, so one load widened
// to W int32 lanes gives codes j in the low nibbles and j + W in the high ones), int8 runs in 2W bytes.
#ifdef __AVX512F__
constexpr int W = 16;
using vec = __m512;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vset(float v) { return _mm512_set1_ps(v); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
template <int BITS>
static inline void run_codes(const uint8_t* w, int64_t c, vec& lo, vec& hi) {
  if (BITS == 4) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
  } else {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c + 16))));
  }
}
#else
constexpr int W = 8;
using vec = __m256;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vset(float v) { return _mm256_set1_ps(v); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline float vsum(vec v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}
template <int BITS>
static inline void run_codes(const uint8_t* w, int64_t c, vec& lo, vec& hi) {
  if (BITS == 4) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c / 2)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
  } else {
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c + 8))));
  }
}
#endif

// lane sums of code[j] * x[j] over `len` codes (a multiple of 2W) of two rows: shared x loads, four chains
template <int BITS>
static inline void dot2(const uint8_t* w0, const uint8_t* w1, const float* x, int64_t len, vec& d0, vec& d1) {
  vec a0 = vzero(), a1 = vzero(), b0 = vzero(), b1 = vzero();
  for (int64_t c = 0; c < len; c += 2 * W) {
    const vec x0 = vload(x + c), x1 = vload(x + c + W);
    vec p0, p1, q0, q1;
    run_codes<BITS>(w0, c, p0, p1);
    run_codes<BITS>(w1, c, q0, q1);
    a0 = vfma(p0, x0, a0);
    a1 = vfma(p1, x1, a1);
    b0 = vfma(q0, x0, b0);
    b1 = vfma(q1, x1, b1);
  }
  d0 = vadd(a0, a1);
  d1 = vadd(b0, b1);
}

template <int BITS>
static inline vec dot1(const uint8_t* w, const float* x, int64_t len) {
  vec a0 = vzero(), a1 = vzero();
  for (int64_t c = 0; c < len; c += 2 * W) {
    vec p0, p1;
    run_codes<BITS>(w, c, p0, p1);
    a0 = vfma(p0, vload(x + c), a0);
    a1 = vfma(p1, vload(x + c + W), a1);
  }
  return vadd(a0, a1);
}

// One layer's integer weights in the fused layout, bound once; forward(x [rows, in]) -> [rows, out] in
// x's dtype (float32 or bfloat16), accumulated in float32. A class, so a call converts one argument.
// bits 4: `packed` uint8 [out, groups * stride / 2], scale and minimum float32 [out, groups];
// bits 8: `packed` the int8 codes as uint8 bytes [out, stride] (one group: the whole kept row, padded
// with zero codes), scale float32 [out, 1], minimum unused (symmetric).
struct GemvLayer {
  torch::Tensor packed, scale, minimum, keep, outlier_idx, outlier_weight, bias;
  int64_t bits, group, stride, parallel_codes, prefetch_rows;
  // the kept columns as runs of consecutive input columns (first kept index, length): where a dense
  // dequantization writes them
  std::vector<std::pair<int64_t, int64_t>> kept_runs;

  GemvLayer(int64_t bits_, torch::Tensor packed_, torch::Tensor scale_, torch::Tensor minimum_,
            torch::Tensor keep_, int64_t group_, int64_t stride_, torch::Tensor outlier_idx_,
            torch::Tensor outlier_weight_, torch::Tensor bias_, int64_t parallel_codes_,
            int64_t prefetch_rows_)
      : packed(packed_.contiguous()), scale(scale_.contiguous()), minimum(minimum_.contiguous()),
        keep(keep_.contiguous()), outlier_idx(outlier_idx_.contiguous()),
        outlier_weight(outlier_weight_.contiguous()), bias(bias_.contiguous()), bits(bits_), group(group_),
        stride(stride_), parallel_codes(parallel_codes_), prefetch_rows(prefetch_rows_) {
    TORCH_CHECK(bits == 4 || bits == 8, "GemvLayer: bits must be 4 or 8");
    TORCH_CHECK(packed.dim() == 2 && scale.dim() == 2 && scale.size(0) == packed.size(0),
                "GemvLayer: packed [out, bytes], scale [out, groups]");
    TORCH_CHECK(bits == 8 || minimum.sizes() == scale.sizes(), "GemvLayer: minimum must match scale");
    TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && scale.scalar_type() == torch::kFloat32 &&
                (bits == 8 || minimum.scalar_type() == torch::kFloat32) && keep.scalar_type() == torch::kInt64 &&
                outlier_idx.scalar_type() == torch::kInt64, "GemvLayer: unexpected dtypes");
    TORCH_CHECK(stride % (2 * W) == 0 && group <= stride, "GemvLayer: stride must be a multiple of the run >= group");
    TORCH_CHECK(packed.size(1) == scale.size(1) * stride * bits / 8, "GemvLayer: layout mismatch");
    TORCH_CHECK(keep.numel() <= scale.size(1) * group, "GemvLayer: more kept columns than groups hold");
    const int64_t n_o = outlier_idx.size(0);
    TORCH_CHECK(n_o == 0 || (outlier_weight.scalar_type() == torch::kFloat32 &&
                outlier_weight.size(0) == packed.size(0) && outlier_weight.size(1) == n_o),
                "GemvLayer: outlier_weight must be float32 [out, n_outliers]");
    TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.numel() == packed.size(0)),
                "GemvLayer: bias must be float32 [out] or empty");
    const int64_t* kp = keep.data_ptr<int64_t>();
    for (int64_t k = 0; k < keep.numel(); ++k) {
      if (k == 0 || kp[k] != kp[k - 1] + 1) kept_runs.emplace_back(k, 0);
      kept_runs.back().second += 1;
    }
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

  template <int BITS, typename T>
  void rows_out(const float* xk, const float* xsum, const float* xo, T* yr) const {
    const int64_t n_out = packed.size(0), groups = scale.size(1), n_o = outlier_idx.size(0);
    const int64_t row_bytes = packed.size(1), group_bytes = stride * BITS / 8;
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float* s = scale.data_ptr<float>();
    const float* m = BITS == 4 ? minimum.data_ptr<float>() : nullptr;
    const float* wo = n_o ? outlier_weight.data_ptr<float>() : nullptr;
    const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
    // below `parallel_codes` codes a second thread costs more to wake than it saves
    const int64_t grain = n_out * groups * stride < parallel_codes ? n_out : 16;
    at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
      int64_t n = begin;
      for (; n + 1 < end; n += 2) {
        const uint8_t* w0 = w + n * row_bytes;
        const float* s0 = s + n * groups;
        vec v0 = vzero(), v1 = vzero();  // scale * codes . x, summed over the groups lane by lane
        float acc0 = 0.f, acc1 = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          if (n + prefetch_rows + 1 < n_out) {  // the same group some rows ahead: keep DRAM reads in flight
            const uint8_t* ahead = w0 + prefetch_rows * row_bytes + g * group_bytes;
            for (int64_t l = 0; l < group_bytes; l += 64) {
              _mm_prefetch(reinterpret_cast<const char*>(ahead + l), _MM_HINT_T0);
              _mm_prefetch(reinterpret_cast<const char*>(ahead + row_bytes + l), _MM_HINT_T0);
            }
          }
          vec d0, d1;
          dot2<BITS>(w0 + g * group_bytes, w0 + row_bytes + g * group_bytes, xk + g * stride, stride, d0, d1);
          v0 = vfma(d0, vset(s0[g]), v0);
          v1 = vfma(d1, vset(s0[groups + g]), v1);
          if (BITS == 4) {
            acc0 += m[n * groups + g] * xsum[g];
            acc1 += m[(n + 1) * groups + g] * xsum[g];
          }
        }
        acc0 += vsum(v0);
        acc1 += vsum(v1);
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
        vec v = vzero();
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          v = vfma(dot1<BITS>(wr + g * group_bytes, xk + g * stride, stride), vset(s[n * groups + g]), v);
          if (BITS == 4) acc += m[n * groups + g] * xsum[g];
        }
        acc += vsum(v);
        for (int64_t o = 0; o < n_o; ++o) acc += wo[n * n_o + o] * xo[o];
        if (b) acc += b[n];
        yr[n] = static_cast<T>(acc);
      }
    });
  }

  template <typename T>
  void row(const T* xr, float* xk, float* xsum, float* xo, T* yr) const {
    gather(xr, xk, xsum, xo);
    if (bits == 4) rows_out<4>(xk, xsum, xo, yr); else rows_out<8>(xk, xsum, xo, yr);
  }

  // The weight as real numbers, [out, in] float32 or bfloat16 (round to nearest even), the outlier
  // columns 0: for calls with many rows (prefill), where one BLAS matmul over a dense weight beats
  // reading the codes once per row, and the input goes in as it is (no gather: index_select of the
  // kept columns of a 512 x 576 bf16 input took 0.4 ms, the dequantization 26 us). Same numbers as the
  // codes, scales and minima hold (bf16: rounded once).
  torch::Tensor dequantized(bool to_bf16) const {
    const int64_t in_f = keep.size(0) + outlier_idx.size(0);
    auto out = torch::empty({packed.size(0), in_f}, to_bf16 ? torch::kBFloat16 : torch::kFloat32);
    dequantize_into(out);
    return out;
  }

  // The same into `out` (a reused buffer: a fresh 32 MiB tensor per call spent most of its time in
  // page faults, 10.5 ms for a 4096 x 4096 layer)
  void dequantize_into(torch::Tensor out) const {
    TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == packed.size(0) &&
                out.size(1) == keep.size(0) + outlier_idx.size(0) &&
                (out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16),
                "GemvLayer: out must be a contiguous float32 or bfloat16 [out, in]");
    const bool to_bf16 = out.scalar_type() == torch::kBFloat16;
    if (bits == 4) fill_dequantized<4>(out, to_bf16); else fill_dequantized<8>(out, to_bf16);
  }

  template <int BITS>
  void fill_dequantized(torch::Tensor& out, bool to_bf16) const {
    const int64_t n_out = packed.size(0), groups = scale.size(1), kept = keep.size(0);
    const int64_t in_f = out.size(1), n_o = outlier_idx.size(0);
    const int64_t row_bytes = packed.size(1), group_bytes = stride * BITS / 8;
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float* s = scale.data_ptr<float>();
    const float* m = BITS == 4 ? minimum.data_ptr<float>() : nullptr;
    const int64_t* kp = keep.data_ptr<int64_t>();
    const int64_t* op = outlier_idx.data_ptr<int64_t>();
    float* out_f = to_bf16 ? nullptr : out.data_ptr<float>();
    uint16_t* out_h = to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
    at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(stride), row(kept + 1);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t g = 0; g < groups; ++g) {
          const vec sv = vset(s[n * groups + g]), mv = vset(BITS == 4 ? m[n * groups + g] : 0.f);
          const uint8_t* wg = w + n * row_bytes + g * group_bytes;
          for (int64_t c = 0; c < stride; c += 2 * W) {
            vec lo, hi;
            run_codes<BITS>(wg, c, lo, hi);
            vstore(buf.data() + c, vfma(lo, sv, mv));
            vstore(buf.data() + c + W, vfma(hi, sv, mv));
          }
          const int64_t start = g * group, len = std::min(group, kept - start);
          std::copy(buf.data(), buf.data() + len, row.data() + start);
        }
        for (const auto& r : kept_runs) {
          if (out_f) std::copy(row.data() + r.first, row.data() + r.first + r.second, out_f + n * in_f + kp[r.first]);
          else to_bf16_span(row.data() + r.first, out_h + n * in_f + kp[r.first], r.second);
        }
        for (int64_t o = 0; o < n_o; ++o) {
          if (out_f) out_f[n * in_f + op[o]] = 0.f; else out_h[n * in_f + op[o]] = 0;
        }
      }
    });
  }

  static void to_bf16_span(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {  // round to nearest even (finite values)
      uint32_t b;
      std::memcpy(&b, src + k, 4);
      dst[k] = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    }
  }

  torch::Tensor forward(torch::Tensor x) const {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "GemvLayer: x must be contiguous [rows, in]");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
                "GemvLayer: x must be float32 or bfloat16");
    const int64_t rows = x.size(0), in_f = x.size(1), n_out = packed.size(0), groups = scale.size(1);
    auto y = torch::empty({rows, n_out}, x.options());
    std::vector<float> xk(groups * stride), xsum(groups), xo(outlier_idx.size(0) + 1);
    for (int64_t r = 0; r < rows; ++r) {
      if (x.scalar_type() == torch::kBFloat16)
        row(x.data_ptr<at::BFloat16>() + r * in_f, xk.data(), xsum.data(), xo.data(),
            y.data_ptr<at::BFloat16>() + r * n_out);
      else
        row(x.data_ptr<float>() + r * in_f, xk.data(), xsum.data(), xo.data(), y.data_ptr<float>() + r * n_out);
    }
    return y;
  }
};

// Packed codes [rows, bytes] (2, 4 or 8 bits, lowest bits first) -> [rows, n] float32 or bfloat16:
// code * scale[group] + minimum[group], the float32 multiply and add rounded one at a time as torch
// does them (this file is compiled with -ffp-contract=off), so the numbers equal
// `dequantize_grouped(unpack_bits(...))` bit for bit. One call for what took about ten small torch ops
// per KV-cache tensor per layer and decode step.
template <int BITS, typename P>
static void unpack_dequantize_rows(const uint8_t* codes, const P* scale, const P* minimum, int64_t rows,
                                   int64_t bytes, int64_t groups, int64_t n, int64_t group, float* out_f,
                                   uint16_t* out_h) {
  constexpr int PER_BYTE = 8 / BITS;
  constexpr unsigned MASK = (1u << BITS) - 1u;
  const int64_t grain = rows * n < 65536 ? rows : 16;  // small caches: one thread, no wake-up cost
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* c = codes + r * bytes;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = static_cast<float>(scale[r * groups + g]), m = static_cast<float>(minimum[r * groups + g]);
        const int64_t stop = std::min(n, (g + 1) * group);
        for (int64_t j = g * group; j < stop; ++j) {
          const float code = static_cast<float>((c[j / PER_BYTE] >> (BITS * (j % PER_BYTE))) & MASK);
          const float product = code * s;
          row[j] = product + m;
        }
      }
      if (out_f) std::copy(row.begin(), row.end(), out_f + r * n);
      else GemvLayer::to_bf16_span(row.data(), out_h + r * n, n);
    }
  });
}

template <int BITS>
static void unpack_dequantize_bits(const torch::Tensor& codes, const torch::Tensor& scale,
                                   const torch::Tensor& minimum, int64_t rows, int64_t n, int64_t group,
                                   float* out_f, uint16_t* out_h) {
  const int64_t bytes = codes.size(-1), groups = scale.size(-1);
  if (scale.scalar_type() == torch::kFloat32)
    unpack_dequantize_rows<BITS>(codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), minimum.data_ptr<float>(),
                                 rows, bytes, groups, n, group, out_f, out_h);
  else
    unpack_dequantize_rows<BITS>(codes.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(),
                                 minimum.data_ptr<at::Half>(), rows, bytes, groups, n, group, out_f, out_h);
}

torch::Tensor unpack_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum, int64_t bits,
                                int64_t n, int64_t group, bool to_bf16) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "unpack_dequantize: bits must be 2, 4 or 8");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && scale.scalar_type() == minimum.scalar_type() &&
              (scale.scalar_type() == torch::kFloat32 || scale.scalar_type() == torch::kHalf),
              "unpack_dequantize: uint8 codes, float32 or float16 scale and minimum");
  codes = codes.contiguous();
  scale = scale.contiguous();
  minimum = minimum.contiguous();
  const int64_t bytes = codes.size(-1), groups = scale.size(-1);
  const int64_t rows = bytes ? codes.numel() / bytes : 0;
  TORCH_CHECK(scale.sizes() == minimum.sizes() && scale.numel() == rows * groups &&
              bytes * (8 / bits) >= n && groups * group >= n, "unpack_dequantize: shapes do not match");
  auto sizes = codes.sizes().vec();
  sizes.back() = n;
  auto out = torch::empty(sizes, to_bf16 ? torch::kBFloat16 : torch::kFloat32);
  float* out_f = to_bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* out_h = to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  if (bits == 2) unpack_dequantize_bits<2>(codes, scale, minimum, rows, n, group, out_f, out_h);
  else if (bits == 4) unpack_dequantize_bits<4>(codes, scale, minimum, rows, n, group, out_f, out_h);
  else unpack_dequantize_bits<8>(codes, scale, minimum, rows, n, group, out_f, out_h);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("unpack_dequantize", &unpack_dequantize);
  pybind11::class_<GemvLayer>(mod, "GemvLayer", pybind11::module_local())  // one per ISA build
      .def(pybind11::init<int64_t, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t,
                          torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t>())
      .def("__call__", &GemvLayer::forward)
      .def("dequantized", &GemvLayer::dequantized)
      .def("dequantize_into", &GemvLayer::dequantize_into);
  mod.attr("CODES_PER_RUN") = 2 * W;
}
"""

#: codes per call below which the kernel runs on one thread (waking a second one costs more than it saves)
PARALLEL_CODES = 65536
#: rows ahead whose codes are prefetched while a row pair is summed: without it one core's loop kept too
#: few DRAM reads in flight (a 4096 x 11008 int4 layer read 19 GB/s with 0, 35-36 GB/s with 16, 30-33
#: with 32; PyTorch's kernel 33 GB/s, on a 53 GB/s machine)
PREFETCH_ROWS = 16
_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw"],
}
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
    """The compiled extension for `isa` (default: `best_isa()`), with the `GemvLayer` class and
    `CODES_PER_RUN`, or None where it cannot run here (said once)."""
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
        _BUILT[isa] = _build(isa)
    return _BUILT[isa]


def _build(isa: str):
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"sinkquant_cpu_gemv_v8_{isa}",
            cpp_sources=_SOURCE,
            extra_cflags=["-O3", *_ISA_FLAGS[isa], "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a build error: PyTorch's kernel still works
        reason = " ".join(str(exc).split())[:200]
        warnings.warn(
            f"sinkquant: could not build the fused integer kernel ({reason}); using PyTorch's", stacklevel=3
        )
        return None


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
):
    """One layer's numbers in the kernel's layout, bound into a `GemvLayer` of the extension `module`.
    codes: int8 [out, kept] (bits 8, scale [out]) or uint8 [out, kept] (bits 4, scale and minimum
    [out, groups])."""
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
