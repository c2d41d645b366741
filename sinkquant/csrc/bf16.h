// float32 -> bfloat16, shared by the dense dequantization (gemv.h) and the KV path (kv_dequant.h).
#pragma once

#include <cstdint>
#include <cstring>

// bfloat16 bits of each float32, rounded to nearest even (finite values), as torch's .to(torch.bfloat16)
inline void to_bf16_span(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    uint32_t b;
    std::memcpy(&b, src + k, 4);
    dst[k] = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  }
}
