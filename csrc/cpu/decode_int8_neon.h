// decode_int8.h's integer products on Arm with the dot-product extension (`sdot`, FEAT_DotProd,
// part of the NEON baseline armv8.2-a+fp16+dotprod): the same three functions (qk_int8, pv_int8,
// quantize_p16), the same signatures and the same integers. q and P are int16 as on x86 (q rounded
// per row to +-32767 by decode_int8.h's quantize_q16, P per sub-segment to 0..32767), the int8
// codes are used as stored, and every sum over a sub-segment is exact in int32, so the scores and
// the P . V sums are the x86 path's integers (only the float32 steps after them may round in
// another order).
//
//   scores:  `sdot` multiplies int8 by int8 only, so each int16 q is split once per call into two
//            int8 halves: q = 256 hi + lo + 128, hi = q >> 8 in [-128, 127], lo = (q & 255) - 128
//            in [-128, 127] (exact for every int16, so quantize_q16 needs no Arm variant and its
//            +-32767 range stays). Per key and 16 elements: one `sdot` of the key's codes with each
//            row's hi, one with its lo, and one, shared by the rows, with a vector of ones (the
//            key's code sum, for the +128); q . code = 256 (hi . code) + (lo . code) + 128 sum(code),
//            each part well inside int32 (|256 hi . code| <= 2^30 for D <= 256). Per 16 elements and
//            row that is 2 instructions for 16 products; widening the codes to int16 and `smlal`
//            instead would be 4 `smlal` per row plus 2 `sxtl` per key. Two keys per step share the
//            q loads; 4 keys' sums are reduced to one vector by two levels of `addp`.
//   P . V:   `smlal` (int16 x int16 -> int32, 4 products): each key's V codes widened to int16 once
//            (2 `sxtl` per 16 columns, shared by the rows), then per row 4 `smlal` by the row's p
//            (a lane of the broadcast pair). The alternative, `sdot` over 4-key byte transposes of V
//            with P split in two int8 halves as q is, counts per key, row and 16 columns 2 `sdot`
//            (against 4 `smlal`) plus 2 shared `zip` (against 2 `sxtl`), but needs 8 accumulators
//            per row and 16 columns (hi and lo) where `smlal` needs 4, so 4 rows no longer fit the
//            32 registers (4 rows x 8 + the transposes) and the rows would take two passes over the
//            transposes; and P's 16 bits would need the ones-vector sum again. Without Arm hardware
//            to time it (the project has none; emulation says nothing about speed) the simpler
//            `smlal` form is kept; it costs, per key, row and 16 columns, 4 `smlal` where the float
//            path costs 4 `fmla` plus 10 shared conversions (sxtl x 2, sxtl x 4, scvtf x 4) per key.
//            Loop order: per 16-column block, all the sub-segment's keys, so the RG x 4 int32
//            accumulators stay in registers (RG <= 4: 16 of the 32); the V rows of the sub-segment
//            (<= 256 keys x Dv bytes) are read from memory by the first block and from L1 by the
//            others. `ahead(2 i)` is called in the first block only (once per key pair, the count the
//            caller's Pacer expects).
// With I8MM (`smmla`, 2x8 by 8x2 int8 blocks) two query rows' hi or lo halves could multiply two
// keys per instruction, 32 products against `sdot`'s 16; not written: the half-split scores already
// cost 2 instructions per 16 products per row, decode is meant to be bandwidth-bound, and nothing
// can be timed here.
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/decode_direct.h"

#if defined(__ARM_FEATURE_DOTPROD) && !defined(SPARSE_ATTN_NO_INT8_DOT)
#define SPARSE_ATTN_INT8_DOT 1

namespace sparse_attn_cpu {

// s[r][0 : round_up(nk, 16)) = mul[r] * ks[j] * (q_r . code_j), r < RG: q rows as int16 (DC * 32
// each), k[j] key j's int8 codes (DC * 32), ks[j] its scale (read up to round_up(nk, 16): the
// caller's scale buffer has the room). Keys past nk repeat key nk - 1. `ahead(j)` once per key pair j, j + 1.
template <int RG, int DC, typename Rows, typename Ahead>
inline void qk_int8(int64_t nk, const int16_t* const* q, Rows k, float* const* s, const float* mul, const float* ks,
                    Ahead&& ahead) {
  constexpr int D = 32 * DC, NV = D / 16;  // 16-code vectors per row
  alignas(16) int8_t qh[RG][D], ql[RG][D];  // q = 256 hi + lo + 128
  for (int r = 0; r < RG; ++r)
    for (int d = 0; d < D; ++d) {
      const int v = q[r][d];
      qh[r][d] = static_cast<int8_t>(v >> 8);
      ql[r][d] = static_cast<int8_t>((v & 255) - 128);
    }
  const int8x16_t ones = vdupq_n_s8(1);
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    for (int g = 0; g < 4; ++g) {  // 4 keys: two pairs
      int32x4_t w[2][RG];          // per pair: (key a's two half sums, key b's two)
      for (int h = 0; h < 2; ++h) {
        ahead(j0 + 4 * g + 2 * h);
        const int64_t ja = std::min(j0 + 4 * g + 2 * h, nk - 1), jb = std::min(j0 + 4 * g + 2 * h + 1, nk - 1);
        const int8_t* ka = k[ja];
        const int8_t* kb = k[jb];
        int32x4_t ah[RG], al[RG], bh[RG], bl[RG];
        int32x4_t sa = vdupq_n_s32(0), sb = vdupq_n_s32(0);
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r)
          ah[r] = vdupq_n_s32(0), al[r] = vdupq_n_s32(0), bh[r] = vdupq_n_s32(0), bl[r] = vdupq_n_s32(0);
#pragma GCC unroll 16
        for (int c = 0; c < NV; ++c) {
          const int8x16_t x = vld1q_s8(ka + 16 * c), y = vld1q_s8(kb + 16 * c);
          sa = vdotq_s32(sa, x, ones), sb = vdotq_s32(sb, y, ones);
#pragma GCC unroll 4
          for (int r = 0; r < RG; ++r) {
            const int8x16_t hv = vld1q_s8(qh[r] + 16 * c), lv = vld1q_s8(ql[r] + 16 * c);
            ah[r] = vdotq_s32(ah[r], hv, x), al[r] = vdotq_s32(al[r], lv, x);
            bh[r] = vdotq_s32(bh[r], hv, y), bl[r] = vdotq_s32(bl[r], lv, y);
          }
        }
        sa = vshlq_n_s32(sa, 7), sb = vshlq_n_s32(sb, 7);
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r)
          w[h][r] = vpaddq_s32(vmlaq_n_s32(vaddq_s32(al[r], sa), ah[r], 256),
                               vmlaq_n_s32(vaddq_s32(bl[r], sb), bh[r], 256));
      }
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r)  // lanes: keys 4g .. 4g + 3
        vst1q_f32(s[r] + j0 + 4 * g,
                  vmulq_f32(vmulq_n_f32(vcvtq_f32_s32(vpaddq_s32(w[0][r], w[1][r])), mul[r]),
                            vld1q_f32(ks + j0 + 4 * g)));
    }
  }
}

// o_r[d0 : d0 + 32 NC) = corr_r * o_r + mul_r * sum_i (p_r,2i p_r,2i+1) . (v_2i, v_2i+1)[d0 : ...],
// r < RG, over the ceil(nk / 2) key pairs: p rows as int16 pairs (word i = keys 2i, 2i + 1; an odd
// nk's last pair has p = 0 for the missing key, whose V row is then read as key nk - 1's), v[j]
// key j's int8 codes. The keys are nsub sub-segments of at most kSeg keys (u ending at key pair
// pair_end[u], the last at the end), each with its own corr / mul (at u * stride + r): the int32
// sums are exact within one, and added to the float32 output as it ends. `ahead(2 i)` once per pair i.
template <int RG, int NC, typename Rows, typename Ahead>
inline void pv_int8(int64_t nk, const uint32_t* const* p, Rows v, int64_t d0, float* const* o, const float* corr,
                    const float* mul, Ahead&& ahead, int64_t nsub, const int64_t* pair_end, int64_t stride) {
  const int64_t np = (nk + 1) / 2;
  for (int64_t u = 0, i0 = 0; u < nsub; ++u) {
    const int64_t end = u + 1 < nsub ? pair_end[u] : np;
    for (int cb = 0; cb < 2 * NC; ++cb) {  // 16 columns per block
      const int64_t col = d0 + 16 * cb;
      int32x4_t acc[RG][4];
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r)
        for (int t = 0; t < 4; ++t) acc[r][t] = vdupq_n_s32(0);
      for (int64_t i = i0; i < end; ++i) {
        if (cb == 0) ahead(2 * i);
        const int8x16_t x = vld1q_s8(v[2 * i] + col), y = vld1q_s8(v[std::min(2 * i + 1, nk - 1)] + col);
        const int16x8_t xl = vmovl_s8(vget_low_s8(x)), xh = vmovl_high_s8(x);
        const int16x8_t yl = vmovl_s8(vget_low_s8(y)), yh = vmovl_high_s8(y);
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) {
          const int16x4_t pr = vreinterpret_s16_u32(vdup_n_u32(p[r][i]));  // lane 0: key 2i, lane 1: 2i + 1
          acc[r][0] = vmlal_lane_s16(acc[r][0], vget_low_s16(xl), pr, 0);
          acc[r][1] = vmlal_high_lane_s16(acc[r][1], xl, pr, 0);
          acc[r][2] = vmlal_lane_s16(acc[r][2], vget_low_s16(xh), pr, 0);
          acc[r][3] = vmlal_high_lane_s16(acc[r][3], xh, pr, 0);
          acc[r][0] = vmlal_lane_s16(acc[r][0], vget_low_s16(yl), pr, 1);
          acc[r][1] = vmlal_high_lane_s16(acc[r][1], yl, pr, 1);
          acc[r][2] = vmlal_lane_s16(acc[r][2], vget_low_s16(yh), pr, 1);
          acc[r][3] = vmlal_high_lane_s16(acc[r][3], yh, pr, 1);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) {
        const float cr = corr[u * stride + r], mr = mul[u * stride + r];
        float* out = o[r] + col;
        for (int t = 0; t < 4; ++t)
          vst1q_f32(out + 4 * t, vfmaq_n_f32(vmulq_n_f32(vld1q_f32(out + 4 * t), cr), vcvtq_f32_s32(acc[r][t]), mr));
      }
    }
    i0 = end;
  }
}

// codes[0 : round_up(n, 2)) = round(p'_j / s), p'_j = p_j sv_j, s = max p' / 32767 (decode_int8.h's
// quantize_p16_scalar, 4 keys per step; x p' x inv + 0.5 fused, truncated, as the AVX-512 version).
// Returns s (0 when every p' is 0), or NaN if some p' is a NaN or an infinity (the codes are then 0).
inline float quantize_p16(const float* p, const float* sv, int64_t n, int16_t* codes) {
  float32x4_t mx = vdupq_n_f32(0.f), probe = vdupq_n_f32(0.f);
  const float32x4_t zero = vdupq_n_f32(0.f);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float32x4_t x = vmulq_f32(vld1q_f32(p + j), vld1q_f32(sv + j));
    mx = vmaxq_f32(mx, x), probe = vfmaq_f32(probe, x, zero);
  }
  float amax = vmaxvq_f32(mx), pr = vaddvq_f32(probe);
  for (; j < n; ++j) {
    const float x = p[j] * sv[j];
    amax = std::max(amax, x), pr += x * 0.f;
  }
  const bool bad = pr != pr;
  const float inv = bad || !(amax > 0.f) ? 0.f : 32767.f / amax;
  const float32x4_t vinv = vdupq_n_f32(inv), half = vdupq_n_f32(0.5f);
  for (j = 0; j + 4 <= n; j += 4) {
    const float32x4_t x = vmulq_f32(vld1q_f32(p + j), vld1q_f32(sv + j));
    vst1_s16(codes + j, vmovn_s32(vcvtq_s32_f32(vfmaq_f32(half, x, vinv))));
  }
  for (; j < n; ++j) codes[j] = bad ? 0 : static_cast<int16_t>(static_cast<int32_t>(std::fma(p[j] * sv[j], inv, 0.5f)));
  if (n & 1) codes[n] = 0;
  return bad ? std::numeric_limits<float>::quiet_NaN() : amax / 32767.f;
}

}  // namespace sparse_attn_cpu

#endif  // __ARM_FEATURE_DOTPROD
