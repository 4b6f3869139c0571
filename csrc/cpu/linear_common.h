// What the chunked linear-attention forward (linear.cpp) and backward (linear_bwd.cpp) share.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/vec.h"

namespace sparse_attn_cpu {
namespace linear_detail {

constexpr double kLog2e = 1.4426950408889634;

// kt[d * ldt + t] = rows[t][d] for t < n, d < D: the chunk's keys transposed (the B operand of
// Q K^T and the A rows of K^T V). Blocks of kVec x kVec go through registers: kVec / 2-pair
// interleaves ("perfect shuffle") repeated log2(kVec) times transpose a block; a scalar loop
// otherwise (a scalar transpose was ~1/3 of the kernel's non-matmul time).
inline void transpose_rows(const float* const* rows, int64_t n, int64_t D, float* kt, int64_t ldt) {
  int64_t t0 = 0, dv = 0;
#if defined(SPARSE_ATTN_VECTOR_TYPES) && defined(__GNUC__) && !defined(__clang__)
  constexpr int kHalf = kVec / 2;
  vint mlo, mhi;
  for (int j = 0; j < kHalf; ++j) {
    mlo[2 * j] = j, mlo[2 * j + 1] = kVec + j;
    mhi[2 * j] = kHalf + j, mhi[2 * j + 1] = kVec + kHalf + j;
  }
  dv = D / kVec * kVec;
  for (; t0 + kVec <= n; t0 += kVec) {
    for (int64_t d0 = 0; d0 < dv; d0 += kVec) {
      vfloat x[kVec], y[kVec];
      for (int i = 0; i < kVec; ++i) x[i] = vload(rows[t0 + i] + d0);
      for (int round = 1; round < kVec; round *= 2) {
        for (int i = 0; i < kHalf; ++i) {
          y[2 * i] = __builtin_shuffle(x[i], x[i + kHalf], mlo);
          y[2 * i + 1] = __builtin_shuffle(x[i], x[i + kHalf], mhi);
        }
        for (int i = 0; i < kVec; ++i) x[i] = y[i];
      }
      for (int i = 0; i < kVec; ++i) vstore(kt + (d0 + i) * ldt + t0, x[i]);
    }
  }
#endif
  for (int64_t t = 0; t < n; ++t) {  // rows left over, and columns left over of the block rows
    const int64_t dstart = t < t0 ? dv : 0;
    for (int64_t d = dstart; d < D; ++d) kt[d * ldt + t] = rows[t][d];
  }
}

// A chunk's decays from its cl log-decays g[t * gs]: bc_t = sum of g over [0, t] (double),
// ro_t = scale exp(bc_t), ew_t = exp(sum of g over (t, last]) (summed directly, not a difference
// of cumulative sums); returns exp(bc_last).
inline float chunk_decays(const float* g, int64_t gs, int64_t cl, float scale, double* bc, float* ro, float* ew) {
  double acc = 0.0;
  for (int64_t t = 0; t < cl; ++t) {
    acc += static_cast<double>(g[t * gs]);
    bc[t] = acc;
    ro[t] = scale * static_cast<float>(std::exp(acc));
  }
  double rev = 0.0;
  for (int64_t t = cl - 1; t >= 0; --t) {
    ew[t] = static_cast<float>(std::exp(rev));
    rev += static_cast<double>(g[t * gs]);
  }
  return static_cast<float>(std::exp(bc[cl - 1]));
}

}  // namespace linear_detail
}  // namespace sparse_attn_cpu
