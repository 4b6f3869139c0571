// Scalar float helpers shared by the CPU kernels (vec.h for prefill/training, decode.cpp):
// bit casts, the exp2 of the softmax, and IEEE half -> float. Header-only, no intrinsics.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace sparse_attn_scalar {

inline float bits_to_float(uint32_t w) {
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  return w;
}

// 2^x for the softmax's x <= 0, ~2 ulp; 0 below -127 (and for -inf). Cephes exp2f: round to the
// nearest integer n, 2^f on [-0.5, 0.5] by a degree-6 polynomial, 2^n from the exponent bits.
// `exp2_poly` is a template so the vector-typed kernels evaluate the same polynomial per lane.
constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: x + kMagic - kMagic rounds x to an integer
template <typename T>
inline T exp2_poly(T f) {
  return (((((1.535336188319500e-4f * f + 1.339887440266574e-3f) * f + 9.618437357674640e-3f) * f +
            5.550332471162809e-2f) * f + 2.402264791363012e-1f) * f + 6.931472028550421e-1f) * f + 1.0f;
}
inline float exp2_scalar(float x) {
  x = std::min(std::max(x, -127.0f), 127.0f);
  const float t = x + kMagic;
  const float n = t - kMagic;
  const int32_t e = static_cast<int32_t>(float_to_bits(t) - float_to_bits(kMagic)) + 127;
  return exp2_poly(x - n) * bits_to_float(static_cast<uint32_t>(e) << 23);
}

// IEEE half bits -> float, exact for normals, subnormals, inf and NaN; branch-free so loops of it
// vectorise (the method of c10 / FP16 without F16C).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;  // rebias 15 -> 127
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;       // m * 2^-24
  return bits_to_float(sign | (two_w < (1u << 27) ? float_to_bits(subnormal) : float_to_bits(normal)));
}

}  // namespace sparse_attn_scalar
