// Logit soft-capping (Gemma 2; the contract's `softcap`): a score s becomes c * tanh(s / c) before
// the softmax. The kernels hold scores in base 2 (q pre-scaled by scale * log2 e), so they pass
// c = softcap * log2 e: c * tanh(s2 / c) is then the capped score in the same base-2 units.
// The backward needs the cap's derivative, 1 - tanh^2, per score.
//
// tanh per lane, the same arithmetic for vectors and scalar tails: where |y| < 0.3125 the odd
// Taylor polynomial to y^15 (truncation < 1e-9 relative), elsewhere (1 - e) / (1 + e) with
// e = 2^(-2 |y| log2 e) from the softmax's exp2 (e < 0.54 there, so 1 - e loses at most a bit).
// Measured against std::tanh: a few float32 ulp. A NaN score stays NaN.
#pragma once

#include <cstdint>

#include "cpu/vec.h"

namespace sparse_attn_cpu {

namespace softcap_detail {

constexpr float kTwoLog2e = 2.8853900817779268f;  // 2 log2 e: e^{-2a} = 2^{-2a log2 e}

template <typename T>
inline T splat(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  else return vsplat(x);
#endif
}

inline float exp2_lanes(float x) { return exp2_scalar(x); }
#ifdef SPARSE_ATTN_VECTOR_TYPES
inline vfloat exp2_lanes(vfloat x) { return vexp2(x); }
#endif

template <typename T>
inline T tanh_lanes(T y) {
  const T zero = splat<T>(0.f);
  const T a = y < zero ? -y : y;
  const T a2 = a * a;
  // tanh a = a (1 - a^2/3 + 2a^4/15 - 17a^6/315 + 62a^8/2835 - 1382a^10/155925 + 21844a^12/6081075
  //             - 929569a^14/638512875)
  T p = splat<T>(-1.4558343870513183e-3f);
  p = p * a2 + splat<T>(3.5921280365724810e-3f);
  p = p * a2 + splat<T>(-8.8632355299021966e-3f);
  p = p * a2 + splat<T>(2.1869488536155203e-2f);
  p = p * a2 + splat<T>(-5.3968253968253968e-2f);
  p = p * a2 + splat<T>(1.3333333333333333e-1f);
  p = p * a2 + splat<T>(-3.3333333333333333e-1f);
  const T small = a + a * (p * a2);
  const T e = exp2_lanes(a * splat<T>(-kTwoLog2e));
  const T one = splat<T>(1.f);
  const T big = (one - e) / (one + e);
  const T r = a < splat<T>(0.3125f) ? small : big;
  return y < zero ? -r : r;
}

}  // namespace softcap_detail

// x[0:n] <- c * tanh(x / c)
inline void softcap_row(float* x, int64_t n, float c) {
  using softcap_detail::tanh_lanes;
  const float inv = 1.f / c;
  int64_t i = 0;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  const vfloat vc = vsplat(c), vinv = vsplat(inv);
  for (; i + kVec <= n; i += kVec) vstore(x + i, vc * tanh_lanes(vload(x + i) * vinv));
#endif
  for (; i < n; ++i) x[i] = c * tanh_lanes(x[i] * inv);
}

// the same, and d[0:n] <- 1 - tanh^2(x / c): the derivative of the capped score by the raw one
inline void softcap_row_grad(float* x, float* d, int64_t n, float c) {
  using softcap_detail::tanh_lanes;
  const float inv = 1.f / c;
  int64_t i = 0;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  const vfloat vc = vsplat(c), vinv = vsplat(inv), one = vsplat(1.f);
  for (; i + kVec <= n; i += kVec) {
    const vfloat t = tanh_lanes(vload(x + i) * vinv);
    vstore(x + i, vc * t);
    vstore(d + i, one - t * t);
  }
#endif
  for (; i < n; ++i) {
    const float t = tanh_lanes(x[i] * inv);
    x[i] = c * t;
    d[i] = 1.f - t * t;
  }
}

}  // namespace sparse_attn_cpu
