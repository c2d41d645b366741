// The KV cache's dequantization: packed codes unpacked and dequantized in one call. Header-only, compiled
// in extension.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "bf16.h"

// Packed codes [rows, bytes] (2, 4 or 8 bits, lowest bits first) -> [rows, n] float32 or bfloat16:
// code * scale[group] + minimum[group], the float32 multiply and add rounded one at a time as torch
// does them (the extension is compiled with -ffp-contract=off), so the numbers equal
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
      else to_bf16_span(row.data(), out_h + r * n, n);
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

inline torch::Tensor unpack_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor minimum,
                                       int64_t bits, int64_t n, int64_t group, bool to_bf16) {
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
