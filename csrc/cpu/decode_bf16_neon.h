// decode_bf16.h's direct bf16 products on Arm (FEAT_BF16 `bfdot`), with the same signatures and the
// same contract, so the decode kernel's direct path (no packing of K or V) runs unchanged.
//
// Same plan as the AVX-512 version, at a quarter of the width:
//   scores: per key, `bfdot` of the key's row with each query row, 8 bf16 (4 pairs) per step into
//           4 partial sums, reduced to the score with one `faddp` tree per key;
//   P . V:  per key pair, the two V rows are interleaved in registers (`zip1`/`zip2` of 16-bit
//           lanes) and multiplied with each row's broadcast (p_2i, p_2i+1) pair.
// K and V are read once per key for all the rows of the pass, front to back, which is what the
// hardware prefetchers of Neoverse and Apple cores follow; the caller's paced software prefetch
// (`prefetch_lines<2>`, into L2) covers only the jumps, as on x86. Nothing here has been timed on
// Arm hardware (the project has none): the constants are x86's, and the rows-per-pass budget
// (decode_bf16.h's kPvAccVectors) counts 64-byte vectors, so a pass here keeps 4x fewer floats
// in registers than its accumulators' count suggests (the compiler keeps the rest in L1).
#pragma once

#include <arm_neon.h>

#include "cpu/decode_direct.h"  // the shared constants, dispatchers and the paced prefetch (Pacer)
#include "cpu/vec_bf16.h"

namespace sparse_attn_cpu {

inline bfloat16x8_t load_bf16x8(const uint16_t* p) { return vreinterpretq_bf16_u16(vld1q_u16(p)); }

// s[r][0 : round_up(nk, 16)) = out_mul * (q_r . k_j), r < RG. q rows as bf16 words (DC * 16 words
// each); krow(j) is key j's row (bf16, contiguous, DC * 32 elements). Keys past nk repeat key
// nk - 1. `ahead(j)` is called once per key pair j, j + 1 (8 times per 16 keys, as the AVX-512 version).
template <int RG, int DC, typename Rows, typename Ahead>
inline void qk_direct(int64_t nk, const uint32_t* const* q, Rows krow, float* const* s, float out_mul,
                      Ahead&& ahead) {
  constexpr int NV = 4 * DC;  // 8-element vectors per row
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    for (int m = 0; m < 8; ++m) {
      ahead(j0 + 2 * m);
      for (int h = 0; h < 2; ++h) {
        const int64_t j = j0 + 2 * m + h, jr = std::min(j, nk - 1);
        const uint16_t* k = krow(jr);
        float32x4_t acc[RG];
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) acc[r] = vdupq_n_f32(0.f);
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) {
          const bfloat16x8_t kv = load_bf16x8(k + 8 * c);
#pragma GCC unroll 4
          for (int r = 0; r < RG; ++r)
            acc[r] = vbfdotq_f32(acc[r], vreinterpretq_bf16_u32(vld1q_u32(q[r] + 4 * c)), kv);
        }
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) s[r][j] = vaddvq_f32(acc[r]) * out_mul;
      }
    }
  }
}

// o_r[d0 : d0 + 32 NC) = corr_r * o_r + sum_i (p_r,2i p_r,2i+1) . (v_2i, v_2i+1)[d0 : d0 + 32 NC),
// r < RG, over the np = ceil(nk / 2) key pairs; p rows as bf16 pairs (word i = keys 2i, 2i + 1);
// vrow(j) key j's V row; an odd nk's missing key reads `zero`. `ahead(2 i)` once per key pair. With
// nsub > 1 the keys are nsub sub-segments, u ending at key pair pair_end[u] (the last at np), and
// the accumulators are rescaled by corr[u * corr_stride + r] as sub-segment u starts.
template <int RG, int NC, typename Rows, typename Ahead>
inline void pv_direct(int64_t nk, const uint32_t* const* p, Rows vrow, const uint16_t* zero, int64_t d0,
                      float* const* o, const float* corr, Ahead&& ahead, int64_t nsub = 1,
                      const int64_t* pair_end = nullptr, int64_t corr_stride = 0) {
  constexpr int NA = 8 * NC;  // float32x4 accumulators per row: 32 NC columns
  float32x4_t acc[RG][NA];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NA; ++v) acc[r][v] = vmulq_n_f32(vld1q_f32(o[r] + d0 + 4 * v), corr[r]);
  const int64_t np = (nk + 1) / 2;
  for (int64_t u = 0, i = 0; u < nsub; ++u) {
    if (u > 0) {
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) {
        const float c = corr[u * corr_stride + r];
#pragma GCC unroll 8
        for (int v = 0; v < NA; ++v) acc[r][v] = vmulq_n_f32(acc[r][v], c);
      }
    }
    for (const int64_t end = u + 1 < nsub ? pair_end[u] : np; i < end; ++i) {
      ahead(2 * i);
      const uint16_t* va = vrow(2 * i) + d0;
      const uint16_t* vb = (2 * i + 1 < nk ? vrow(2 * i + 1) : zero) + d0;
      bfloat16x8_t pv[RG];
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) pv[r] = vreinterpretq_bf16_u32(vdupq_n_u32(p[r][i]));
#pragma GCC unroll 8
      for (int c = 0; c < 4 * NC; ++c) {  // 8 columns per step
        const uint16x8_t x = vld1q_u16(va + 8 * c), y = vld1q_u16(vb + 8 * c);
        const bfloat16x8_t lo = vreinterpretq_bf16_u16(vzip1q_u16(x, y));
        const bfloat16x8_t hi = vreinterpretq_bf16_u16(vzip2q_u16(x, y));
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r)
          acc[r][2 * c] = vbfdotq_f32(acc[r][2 * c], pv[r], lo),
          acc[r][2 * c + 1] = vbfdotq_f32(acc[r][2 * c + 1], pv[r], hi);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NA; ++v) vst1q_f32(o[r] + d0 + 4 * v, acc[r][v]);
}

}  // namespace sparse_attn_cpu
