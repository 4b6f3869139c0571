// Quantized K/V rows (contract, "Quantized KV caches"; sparse_attn/cache/quant.py): int8 and
// float8 e4m3 codes with one float32 scale per row (token x kv head).
//
// * Element tags 3 (int8) and 4 (fp8 e4m3fn, raw bytes) for vec.h's Elem / v8::convert, so the
//   decode kernel's float32 products (decode_f32.h) read codes as they read bf16: 8 at a time,
//   converted in registers. The row's scale is applied outside the products (to the scores for K,
//   to the probabilities for V: decode_quant.h), so the products see the codes only.
//   Why float products and not AVX2 integer dot products (vpmaddubsw / vpdpbusd): those need q
//   in integers too, and rounding q adds an error the contract does not allow (a kernel matches
//   the float64 evaluation over the dequantized K/V within the float32 bound).
// * quantize_row: one row, the contract's definition (round-half-even of x / s, clamped; fp8 by
//   c10's conversion, the bits torch's `.to(torch.float8_e4m3fn)` gives).
#pragma once

#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/vec.h"

namespace sparse_attn_cpu {

constexpr int kInt8 = 3, kFp8 = 4;  // Elem tags beside 0 float32, 1 bfloat16, 2 float16

// e4m3fn bits -> float: exponent field e > 0 rebiased (7 -> 127: + 120 << 23) under the mantissa
// m << 20, giving 2^(e-7) (1 + m/8); e = 0 (subnormals) m * 2^-9. No float32 denormal is made or
// read on the way, so flush-to-zero / denormals-are-zero modes (torch.set_flush_denormal) change
// nothing. The NaN codes (0x7f / 0xff) read as 480: a cache stores NaN only where x / s is NaN,
// and then s is NaN as well.
inline float fp8_bits_to_float(uint8_t b) {
  const float mag = (b & 0x78) ? bits_to_float((uint32_t(b & 0x7f) << 20) + (120u << 23)) : float(b & 7) * 0x1p-9f;
  return (b & 0x80) ? -mag : mag;
}

template <>
struct Elem<kInt8> {
  using T = int8_t;
  static float get(const T* p, int64_t i) { return static_cast<float>(p[i]); }
};
template <>
struct Elem<kFp8> {
  using T = uint8_t;
  static float get(const T* p, int64_t i) { return fp8_bits_to_float(p[i]); }
};

namespace v8 {
template <>
inline f8 convert<kInt8>(const int8_t* p) {
#if defined(__AVX2__) && defined(SPARSE_ATTN_VECTOR_TYPES)
  return (f8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return load(t);
#endif
}
template <>
inline f8 convert<kFp8>(const uint8_t* p) {
#if defined(__F16C__) && defined(__AVX2__) && defined(SPARSE_ATTN_VECTOR_TYPES)
  // e4m3fn -> fp16 by a shift (exponent field e and mantissa m land in fp16's fields: 2^(e-15)
  // (1 + m/8), subnormals m/8 2^-14 as fp16 subnormals, which vcvtph2ps converts exactly whatever
  // MXCSR's DAZ says), then x 2^8 (exact, normal floats): 8 instructions per 8 values
  const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(0x3f80)),
                                 _mm_and_si128(_mm_slli_epi16(w, 8), _mm_set1_epi16(int16_t(0x8000))));
  return (f8)_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
#elif defined(__AVX2__) && defined(SPARSE_ATTN_VECTOR_TYPES)
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x7f)), 20);
  const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(mag, _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(7))),
                                   _mm256_set1_ps(0x1p-9f));
  const __m256i is_sub = _mm256_cmpeq_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x78)), _mm256_setzero_si256());
  const __m256 mag_f = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(is_sub));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x80)), 24);
  return (f8)_mm256_or_ps(mag_f, _mm256_castsi256_ps(sign));
#else
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = fp8_bits_to_float(p[i]);
  return load(t);
#endif
}
}  // namespace v8

// One row of n values x (dtype DT) -> codes (int8, or e4m3fn bits with fp8) and its scale
// s = max|x| / qmax (1 for an all-zero row; NaN where the row holds a NaN, as torch's amax gives,
// and then every code 0). `tmp`: n floats of scratch.
template <int DT>
inline float quantize_row(const typename Elem<DT>::T* x, int64_t n, bool fp8, void* codes, float* tmp) {
  float amax = 0.f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float a = Elem<DT>::get(x, i);
    tmp[i] = a;
    nan |= a != a;
    amax = std::max(amax, std::fabs(a));
  }
  const float qmax = fp8 ? 448.f : 127.f;
  const float s = nan ? std::numeric_limits<float>::quiet_NaN() : amax == 0.f ? 1.f : amax / qmax;
  if (fp8) {
    uint8_t* c = static_cast<uint8_t*>(codes);
    for (int64_t i = 0; i < n; ++i) {
      const float y = std::min(qmax, std::max(-qmax, tmp[i] / s));  // NaN stays NaN
      c[i] = c10::Float8_e4m3fn(y).x;
    }
  } else {
    int8_t* c = static_cast<int8_t*>(codes);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float y = std::nearbyint(tmp[i] / s);  // round half to even, as torch.round
      c[i] = static_cast<int8_t>(y == y ? std::min(qmax, std::max(-qmax, y)) : 0.f);
    }
  }
  return s;
}

}  // namespace sparse_attn_cpu
