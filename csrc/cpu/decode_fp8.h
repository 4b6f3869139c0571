// Decode over an fp8 (e4m3fn) KV cache with the bfloat16 products of decode_bf16.h (AVX-512 BF16):
// every e4m3 value is exactly a bfloat16 (4 significant bits, exponents 2^-9 .. 2^8), so the codes
// are turned into bf16 words in registers and multiplied as a bf16 cache's rows are, with the
// row scales applied outside the products as for int8 (decode_quant.h: to the scores, and to P
// before P is rounded to bf16).
//
// The conversion is a table lookup: the 7-bit magnitude indexes 128 bf16 words held in four
// registers (two `vpermi2w` of 64 words each, one chosen by bit 6), then the sign bit is moved
// into place; 7 instructions per 32 codes, where the float path spent 8 per 8 (decode_f32.h,
// quant_rows.h). Subnormal codes come out as normal bf16 numbers (no flush-to-zero question);
// the NaN codes (0x7f, 0xff) read as +-480, as on the float path (a cache stores NaN codes only
// where the row's scale is NaN too).
// bfloat16 queries only (the products take q as bf16, as the bf16 cache's path does); float32 /
// float16 queries keep the float path.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/decode_bf16.h"
#include "cpu/quant_rows.h"

#if defined(SPARSE_ATTN_BF16_DOT) && !defined(__aarch64__)
#define SPARSE_ATTN_FP8_DOT 1

namespace sparse_attn_cpu {

// e4m3fn code (magnitude bits 0-6) -> bf16 bits, exact
inline uint16_t fp8_magnitude_bf16(int m) {
  const float f = fp8_bits_to_float(static_cast<uint8_t>(m));
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);  // exact: at most 4 significant bits
}

// bf16 words of 32 fp8 codes (`Words` for qk_direct / pv_direct)
struct Fp8Words {
  __m512i t[4];  // bf16 of magnitudes 0-31, 32-63, 64-95, 96-127
  Fp8Words() {
    alignas(64) uint16_t w[128];
    for (int m = 0; m < 128; ++m) w[m] = fp8_magnitude_bf16(m);
    for (int i = 0; i < 4; ++i) t[i] = _mm512_load_si512(w + 32 * i);
  }
  __attribute__((always_inline)) __m512i operator()(const uint8_t* p) const {
    const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i lo = _mm512_permutex2var_epi16(t[0], c, t[1]);  // index bits 0-5
    const __m512i hi = _mm512_permutex2var_epi16(t[2], c, t[3]);
    const __m512i mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(c, _mm512_set1_epi16(0x40)), lo, hi);
    return _mm512_or_si512(mag, _mm512_and_si512(_mm512_slli_epi16(c, 8), _mm512_set1_epi16(int16_t(0x8000))));
  }
};

}  // namespace sparse_attn_cpu

#endif  // SPARSE_ATTN_FP8_DOT
