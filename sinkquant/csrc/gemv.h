// sinkquant's fused int4 / int8 matrix-vector product (decode) and dense dequantization (prefill) of
// one layer's weights, for AVX2 + FMA or AVX-512 (whichever flags the build passes). Header-only: the
// class and its templates are compiled once, in extension.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "bf16.h"

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
// an int4 run widened to W int32 lanes, each holding code j (low nibble) and code j + W (high nibble)
static inline __m512i widen_run(const uint8_t* w, int64_t c) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
}
static inline __m512i low_codes(__m512i q) { return _mm512_and_si512(q, _mm512_set1_epi32(15)); }
static inline __m512i high_codes(__m512i q) { return _mm512_srli_epi32(q, 4); }
// a layer's 16 levels (a non-uniform int4 grid), loaded once per call: one register holds all 16
struct Levels {
  vec all;
};
static inline Levels load_levels(const float* levels) { return {_mm512_loadu_ps(levels)}; }
static inline vec lookup16(__m512i idx, const Levels& t) { return _mm512_permutexvar_ps(idx, t.all); }
template <int BITS>
static inline void run_codes(const uint8_t* w, int64_t c, vec& lo, vec& hi) {
  if (BITS == 4) {
    const __m512i q = widen_run(w, c);
    lo = _mm512_cvtepi32_ps(low_codes(q));
    hi = _mm512_cvtepi32_ps(high_codes(q));
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
// an int4 run widened to W int32 lanes, each holding code j (low nibble) and code j + W (high nibble)
static inline __m256i widen_run(const uint8_t* w, int64_t c) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c / 2)));
}
static inline __m256i low_codes(__m256i q) { return _mm256_and_si256(q, _mm256_set1_epi32(15)); }
static inline __m256i high_codes(__m256i q) { return _mm256_srli_epi32(q, 4); }
// a layer's 16 levels (a non-uniform int4 grid), loaded once per call: two registers of 8, the code's
// bit 3 picks one
struct Levels {
  vec first, second;
};
static inline Levels load_levels(const float* levels) { return {_mm256_loadu_ps(levels), _mm256_loadu_ps(levels + 8)}; }
static inline vec lookup16(__m256i idx, const Levels& t) {
  const __m256 a = _mm256_permutevar8x32_ps(t.first, idx), b = _mm256_permutevar8x32_ps(t.second, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
template <int BITS>
static inline void run_codes(const uint8_t* w, int64_t c, vec& lo, vec& hi) {
  if (BITS == 4) {
    const __m256i q = widen_run(w, c);
    lo = _mm256_cvtepi32_ps(low_codes(q));
    hi = _mm256_cvtepi32_ps(high_codes(q));
  } else {
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c))));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c + 8))));
  }
}
#endif

// A run's codes as the values they stand for before scale and minimum: the codes themselves, or with
// `LUT` (int4 only) the layer's levels at them
template <int BITS, bool LUT>
static inline void run_values(const uint8_t* w, int64_t c, const Levels& levels, vec& lo, vec& hi) {
  if (LUT) {
    const auto q = widen_run(w, c);
    lo = lookup16(low_codes(q), levels);
    hi = lookup16(high_codes(q), levels);
  } else {
    run_codes<BITS>(w, c, lo, hi);
  }
}

// lane sums of code[j] * x[j] over `len` codes (a multiple of 2W) of two rows: shared x loads, four chains
template <int BITS, bool LUT>
static inline void dot2(const uint8_t* w0, const uint8_t* w1, const float* x, int64_t len, const Levels& levels,
                        vec& d0, vec& d1) {
  vec a0 = vzero(), a1 = vzero(), b0 = vzero(), b1 = vzero();
  for (int64_t c = 0; c < len; c += 2 * W) {
    const vec x0 = vload(x + c), x1 = vload(x + c + W);
    vec p0, p1, q0, q1;
    run_values<BITS, LUT>(w0, c, levels, p0, p1);
    run_values<BITS, LUT>(w1, c, levels, q0, q1);
    a0 = vfma(p0, x0, a0);
    a1 = vfma(p1, x1, a1);
    b0 = vfma(q0, x0, b0);
    b1 = vfma(q1, x1, b1);
  }
  d0 = vadd(a0, a1);
  d1 = vadd(b0, b1);
}

template <int BITS, bool LUT>
static inline vec dot1(const uint8_t* w, const float* x, int64_t len, const Levels& levels) {
  vec a0 = vzero(), a1 = vzero();
  for (int64_t c = 0; c < len; c += 2 * W) {
    vec p0, p1;
    run_values<BITS, LUT>(w, c, levels, p0, p1);
    a0 = vfma(p0, vload(x + c), a0);
    a1 = vfma(p1, vload(x + c + W), a1);
  }
  return vadd(a0, a1);
}

// One layer's integer weights in the fused layout, bound once; forward(x [rows, in]) -> [rows, out] in
// x's dtype (float32 or bfloat16), accumulated in float32. A class, so a call converts one argument.
// bits 4: `packed` uint8 [out, groups * stride / 2], scale and minimum float32 [out, groups];
// bits 8: `packed` the int8 codes as uint8 bytes [out, stride] (one group: the whole kept row, padded
// with zero codes), scale float32 [out, 1], minimum unused (symmetric). `levels`: float32 [16] for int4
// on a non-uniform grid (a code stands for levels[code] * scale + minimum), empty for the uniform one.
struct GemvLayer {
  torch::Tensor packed, scale, minimum, keep, outlier_idx, outlier_weight, bias, levels;
  int64_t bits, group, stride, parallel_codes, prefetch_rows;
  // the kept columns as runs of consecutive input columns (first kept index, length): where a dense
  // dequantization writes them
  std::vector<std::pair<int64_t, int64_t>> kept_runs;

  GemvLayer(int64_t bits_, torch::Tensor packed_, torch::Tensor scale_, torch::Tensor minimum_,
            torch::Tensor keep_, int64_t group_, int64_t stride_, torch::Tensor outlier_idx_,
            torch::Tensor outlier_weight_, torch::Tensor bias_, int64_t parallel_codes_,
            int64_t prefetch_rows_, torch::Tensor levels_)
      : packed(packed_.contiguous()), scale(scale_.contiguous()), minimum(minimum_.contiguous()),
        keep(keep_.contiguous()), outlier_idx(outlier_idx_.contiguous()),
        outlier_weight(outlier_weight_.contiguous()), bias(bias_.contiguous()), levels(levels_.contiguous()),
        bits(bits_), group(group_),
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
    TORCH_CHECK(levels.numel() == 0 || (bits == 4 && levels.scalar_type() == torch::kFloat32 && levels.numel() == 16),
                "GemvLayer: levels must be float32 [16] (int4) or empty");
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

  template <int BITS, bool LUT, typename T>
  void rows_out(const float* xk, const float* xsum, const float* xo, T* yr) const {
    const int64_t n_out = packed.size(0), groups = scale.size(1), n_o = outlier_idx.size(0);
    const int64_t row_bytes = packed.size(1), group_bytes = stride * BITS / 8;
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float* s = scale.data_ptr<float>();
    const float* m = BITS == 4 ? minimum.data_ptr<float>() : nullptr;
    const float* wo = n_o ? outlier_weight.data_ptr<float>() : nullptr;
    const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
    const Levels lv = LUT ? load_levels(levels.data_ptr<float>()) : Levels{};
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
          dot2<BITS, LUT>(w0 + g * group_bytes, w0 + row_bytes + g * group_bytes, xk + g * stride, stride, lv, d0,
                          d1);
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
          v = vfma(dot1<BITS, LUT>(wr + g * group_bytes, xk + g * stride, stride, lv), vset(s[n * groups + g]), v);
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
    if (bits == 8) rows_out<8, false>(xk, xsum, xo, yr);
    else if (levels.numel()) rows_out<4, true>(xk, xsum, xo, yr);
    else rows_out<4, false>(xk, xsum, xo, yr);
  }

  // The weight as real numbers, [out, in] float32 or bfloat16 (round to nearest even), the outlier
  // columns 0: for calls with many rows (prefill), where one BLAS matmul over a dense weight beats
  // reading the codes once per row, and the input goes in as it is (no gather: selecting the kept
  // columns of a many-row input costs more than dequantizing the weight). Same numbers as the codes,
  // scales and minima hold (bf16: rounded once).
  torch::Tensor dequantized(bool to_bf16) const {
    const int64_t in_f = keep.size(0) + outlier_idx.size(0);
    auto out = torch::empty({packed.size(0), in_f}, to_bf16 ? torch::kBFloat16 : torch::kFloat32);
    dequantize_into(out);
    return out;
  }

  // The same into `out`: a buffer reused across calls, since a fresh weight-sized tensor per call spends
  // most of its time in page faults
  void dequantize_into(torch::Tensor out) const {
    TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == packed.size(0) &&
                out.size(1) == keep.size(0) + outlier_idx.size(0) &&
                (out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16),
                "GemvLayer: out must be a contiguous float32 or bfloat16 [out, in]");
    const bool to_bf16 = out.scalar_type() == torch::kBFloat16;
    if (bits == 8) fill_dequantized<8, false>(out, to_bf16);
    else if (levels.numel()) fill_dequantized<4, true>(out, to_bf16);
    else fill_dequantized<4, false>(out, to_bf16);
  }

  template <int BITS, bool LUT>
  void fill_dequantized(torch::Tensor& out, bool to_bf16) const {
    const int64_t n_out = packed.size(0), groups = scale.size(1), kept = keep.size(0);
    const int64_t in_f = out.size(1), n_o = outlier_idx.size(0);
    const int64_t row_bytes = packed.size(1), group_bytes = stride * BITS / 8;
    const uint8_t* w = packed.data_ptr<uint8_t>();
    const float* s = scale.data_ptr<float>();
    const float* m = BITS == 4 ? minimum.data_ptr<float>() : nullptr;
    const int64_t* kp = keep.data_ptr<int64_t>();
    const int64_t* op = outlier_idx.data_ptr<int64_t>();
    const Levels lv = LUT ? load_levels(levels.data_ptr<float>()) : Levels{};
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
            run_values<BITS, LUT>(wg, c, lv, lo, hi);
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
