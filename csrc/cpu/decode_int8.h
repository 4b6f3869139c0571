// Decode over an int8 KV cache with integer dot products (AVX-512 VNNI `vpdpwssd`), straight from
// the cache's int8 rows, for bfloat16 / float16 queries.
//
// Why: the float32 path (decode_f32.h) converts every code to a float and multiplies with FMAs;
// on a 2-core Zen 4 that made an int8 cache slower than a bf16 one (25.7 vs 22.0 ms at 128K keys,
// Hq 32, Hkv 8, D 128), compute-bound at 39% of the copy rate. Here the products stay integer:
//   scores:  q is quantized per row to int16 (s_q = max|q| / 32767); per key, the key's codes
//            are sign-extended to int16 (one vpmovsxbw per 32) and `vpdpwssd` multiplies them
//            with the row's int16 q, 32 products per instruction, summed exactly in int32
//            (|q16 . code| <= 32767 * 127 * 256 < 2^31 for head dims up to 256); 16 keys' partial
//            vectors are reduced by score_tree.h's tree, in integers; the score
//            is then s_q * scale * log2 e * s_k * (q16 . code), the key's scale s_k applied as
//            the scores are stored;
//   P . V:   after the softmax, each row's probabilities times the V rows' scales, p'_j = p_j s_v[j],
//            are quantized per segment to int16 (p'_max / 32767); per key pair, the two V rows'
//            codes are byte-interleaved and sign-extended (one vpunpck*bw + one vpmovsxbw per 32
//            columns) and `vpdpwssd` adds p'_2i v_2i + p'_2i+1 v_2i+1 into int32 accumulators,
//            exact over a segment (<= kSeg keys: 2 * 32767 * 127 per pair, 64 pairs < 2^31), then
//            added to the float32 output once per segment: o = corr o + (p'_max / 32767) acc.
// What it costs in accuracy: q and p' are rounded to 16 bits against their row's / segment's
// largest value (relative error <= 2^-16 of that value), where the bf16 path rounds q and p to 8
// bits each; float32 queries keep the float path (the contract's float32 bound, 1e-5, leaves no
// room for a 16-bit q). A non-finite q row or p' (a NaN / infinite scale) makes its multiplier
// NaN, so the row comes out NaN as on the float path.
// Requires D and Dv in {32, 64, 128, 256} (decode_direct.h's chunks); callers use the float path
// otherwise. On Arm, decode_int8_neon.h gives the same functions with `sdot` / `smlal` (dotprod).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/decode_direct.h"
#include "cpu/score_tree.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(SPARSE_ATTN_NO_INT8_DOT)
#define SPARSE_ATTN_INT8_DOT 1
#include <immintrin.h>
#endif

namespace sparse_attn_cpu {

// codes[0 : n) = round(x / s) with s = max|x| / 32767 (s = 1 for an all-zero row); returns s, or
// NaN if x holds a NaN or an infinity (the row is then NaN downstream; the codes are 0)
inline float quantize_q16(const float* x, int64_t n, int16_t* codes) {
  float amax = 0.f, probe = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i])), probe += x[i] * 0.f;
  if (probe != probe) {
    for (int64_t i = 0; i < n; ++i) codes[i] = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float s = amax > 0.f ? amax / 32767.f : 1.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<int16_t>(std::nearbyint(std::min(32767.f, std::max(-32767.f, x[i] * inv))));
  return s;
}

// codes[0 : round_up(n, 2)) = round(p'_j / s) with p'_j = p_j sv_j >= 0 (probabilities times the V
// rows' scales) and s = max p' / 32767; the pad word is 0. Returns s (0 when every p' is 0), or NaN
// if some p' is a NaN or an infinity (the codes are then meaningless: the caller's row is NaN).
inline float quantize_p16_scalar(const float* p, const float* sv, int64_t n, int16_t* codes) {
  float amax = 0.f, probe = 0.f;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, p[j] * sv[j]), probe += p[j] * sv[j] * 0.f;
  const bool bad = probe != probe;
  const float inv = bad || amax <= 0.f ? 0.f : 32767.f / amax;
  for (int64_t j = 0; j < n; ++j) codes[j] = bad ? 0 : static_cast<int16_t>(static_cast<int32_t>(p[j] * sv[j] * inv + 0.5f));
  if (n & 1) codes[n] = 0;
  return bad ? std::numeric_limits<float>::quiet_NaN() : amax / 32767.f;
}

#ifdef SPARSE_ATTN_INT8_DOT

// acc += pairwise products of a and b's int16 words (vpdpwssd). (As inline assembly the P . V
// products ran 2x slower in a stand-alone harness: the compiler no longer scheduled around them.)
__attribute__((always_inline)) inline void dpwssd(__m512i& acc, __m512i a, __m512i b) { acc = _mm512_dpwssd_epi32(acc, a, b); }

// dpwssd for an accumulator held across a loop, as 16 int32 lanes. GCC 12: `__m512i` is a vector
// of 8 int64, the instruction's builtin takes 16 int32, and a loop-carried `__m512i` accumulator
// passed through that change of vector mode was not given one register: pv_int8_span's key loop
// copied every accumulator to another register and back at every key pair (two of the 16 via the
// stack), 80 instructions against 51 held as 16 int32 lanes. Clang takes the intrinsic.
#if defined(__clang__)
using I32Acc = __m512i;
__attribute__((always_inline)) inline void dpwssd_acc(I32Acc& acc, __m512i a, __m512i b) { acc = _mm512_dpwssd_epi32(acc, a, b); }
__attribute__((always_inline)) inline __m512i acc_bits(I32Acc acc) { return acc; }
#else
using I32Acc = __v16si;
__attribute__((always_inline)) inline void dpwssd_acc(I32Acc& acc, __m512i a, __m512i b) {
  acc = __builtin_ia32_vpdpwssd_v16si(acc, (__v16si)a, (__v16si)b);
}
__attribute__((always_inline)) inline __m512i acc_bits(I32Acc acc) { return (__m512i)acc; }
#endif

// s[r][0 : round_up(nk, 16)) = mul[r] * ks[j] * (q_r . code_j), r < RG: q rows as int16 (DC * 32
// each), k[j] key j's int8 codes (DC * 32), ks[j] its scale (the keys' scales applied here, not in
// a pass of their own). Keys past nk repeat key nk - 1, with scale 0. `ahead(j)` once per key pair j, j + 1.
template <int RG, int DC, typename Rows, typename Ahead>
inline void qk_int8(int64_t nk, const int16_t* const* q, Rows k, float* const* s, const float* mul, const float* ks,
                    Ahead&& ahead) {
  __m512i qv[RG][DC];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < DC; ++c) qv[r][c] = _mm512_loadu_si512(q[r] + 32 * c);
  __m512i red[RG][8];  // per key pair, its score_pair vector
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    for (int m = 0; m < 8; ++m) {
      const int64_t ja = std::min(j0 + 2 * m, nk - 1), jb = std::min(j0 + 2 * m + 1, nk - 1);
      ahead(j0 + 2 * m);
      const int8_t* ka = k[ja];
      const int8_t* kb = k[jb];
      __m512i a[RG], b[RG];
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) a[r] = _mm512_setzero_si512(), b[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int c = 0; c < DC; ++c) {
        const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ka + 32 * c)));
        const __m512i y = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + 32 * c)));
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) dpwssd(a[r], qv[r][c], x), dpwssd(b[r], qv[r][c], y);
      }
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) red[r][m] = score_pair(a[r], b[r]);  // score_tree.h
    }
    const __m512 kscale =
        _mm512_maskz_loadu_ps(nk - j0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nk - j0)) - 1), ks + j0);
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r)
      _mm512_storeu_ps(s[r] + j0, _mm512_mul_ps(_mm512_cvtepi32_ps(score_16(red[r])),
                                                _mm512_mul_ps(_mm512_set1_ps(mul[r]), kscale)));
  }
}

// out[0 : 32) = cr * out + mr * sums: the int32 sums of one chunk's interleaved key pairs, lo holding
// columns 0-7 and 16-23, hi 8-15 and 24-31 (the order of vpunpck*bw's lanes)
__attribute__((always_inline)) inline void add_pair_sums(float* out, __m512i lo, __m512i hi, __m512 cr, __m512 mr) {
  const __m512 f0 = _mm512_cvtepi32_ps(_mm512_shuffle_i32x4(lo, hi, 0x44));  // columns 0-15
  const __m512 f1 = _mm512_cvtepi32_ps(_mm512_shuffle_i32x4(lo, hi, 0xEE));  // columns 16-31
  _mm512_storeu_ps(out, _mm512_fmadd_ps(f0, mr, _mm512_mul_ps(_mm512_loadu_ps(out), cr)));
  _mm512_storeu_ps(out + 16, _mm512_fmadd_ps(f1, mr, _mm512_mul_ps(_mm512_loadu_ps(out + 16), cr)));
}

// acc[r][0 : 2 NC) += key pair i's products over NC chunks of 32 columns: p[r][i] holds row r's two
// int16 p' of the pair, va / vb the two keys' V codes from the chunks' first column
template <int RG, int NC>
__attribute__((always_inline)) inline void pv_pair(I32Acc (&acc)[RG][2 * NC], const uint32_t* const* p, int64_t i,
                                                   const int8_t* va, const int8_t* vb) {
  __m512i pv[RG];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) pv[r] = _mm512_set1_epi32(static_cast<int>(p[r][i]));
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(va + 32 * c));
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + 32 * c));
    // words (v_2i[d], v_2i+1[d]): lo holds columns 0-7 and 16-23 of the 32, hi 8-15 and 24-31
    const __m512i lo = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(x, y));
    const __m512i hi = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(x, y));
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) dpwssd_acc(acc[r][2 * c], pv[r], lo), dpwssd_acc(acc[r][2 * c + 1], pv[r], hi);
  }
}

// One sub-segment of pv_int8 below: key pairs [i, end), accumulated in int32 from zero, then
// o_r = corr_r * o_r + mul_r * sums. A function of its own, not inlined: inlined into the segment
// loop, GCC 12 kept two of the 16 accumulators on the stack and copied the others between
// registers at every key pair (2-core Zen 4, int8 decode at 4096 keys, 1 thread: ~4-6% of the
// whole call faster this way). The stand-alone loop still copied them, until they became I32Acc
// (above): now they stay in registers, with or without the Pacer's prefetches in the loop.
template <int RG, int NC, typename Rows, typename Ahead>
__attribute__((noinline)) void pv_int8_span(int64_t i, const int64_t end, int64_t nk, const uint32_t* const* p, Rows v,
                                            int64_t d0, float* const* o, const float* corr, const float* mul,
                                            Ahead& ahead) {
  I32Acc acc[RG][2 * NC];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < 2 * NC; ++c) acc[r][c] = I32Acc(_mm512_setzero_si512());
  for (; i < end; ++i) {
    ahead(2 * i);
    const int8_t* va = v[2 * i] + d0;
    const int8_t* vb = v[std::min(2 * i + 1, nk - 1)] + d0;
    pv_pair<RG, NC>(acc, p, i, va, vb);
  }
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) {
    const __m512 cr = _mm512_set1_ps(corr[r]), mr = _mm512_set1_ps(mul[r]);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) add_pair_sums(o[r] + d0 + 32 * c, acc_bits(acc[r][2 * c]), acc_bits(acc[r][2 * c + 1]), cr, mr);
  }
}

// pv_int8_span for all RG rows and NC chunks in one pass over the keys, where RG x 2 NC accumulators
// do not fit in registers (4 rows x 128 columns: 32): blocks of kPvBlockPairs key pairs, each read
// for NCB chunks at a time (RG x 2 NCB accumulators in registers, the others parked in `sums`), so
// a block's V codes come from memory once and stay in L1 for the other chunks. Against passes of
// fewer rows over the whole span: every V vector is interleaved and extended once for all RG rows,
// not once per pass, and the rows stream from memory in one pass (the second pass read them from L2
// while no request went out). The int32 sums are exact, so the order changes no bit of the result.
// `ahead(2 i)` once per pair i.
#define SPARSE_ATTN_INT8_PV_BLOCKED 1
constexpr int64_t kPvBlockPairs = 16;  // key pairs per block (16 measured better than 32)

template <int RG, int NC, int NCB, typename Rows, typename Ahead>
__attribute__((noinline)) void pv_int8_span_blocked(int64_t i, const int64_t end, int64_t nk, const uint32_t* const* p,
                                                    Rows v, float* const* o, const float* corr, const float* mul,
                                                    Ahead& ahead) {
  static_assert(NC % NCB == 0 && RG * 2 * NCB <= 16, "RG x 2 NCB accumulators in registers");
  alignas(64) int32_t sums[RG][2 * NC][16];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < 2 * NC; ++c) _mm512_store_si512(sums[r][c], _mm512_setzero_si512());
  for (int64_t ib = i; ib < end; ib += kPvBlockPairs) {
    const int64_t ie = std::min(end, ib + kPvBlockPairs);
#pragma GCC unroll 1
    for (int g = 0; g < NC; g += NCB) {
      I32Acc acc[RG][2 * NCB];
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < 2 * NCB; ++c) acc[r][c] = I32Acc(_mm512_load_si512(sums[r][2 * g + c]));
      for (int64_t t = ib; t < ie; ++t) {
        if (g == 0) ahead(2 * t);
        const int8_t* va = v[2 * t] + 32 * g;
        const int8_t* vb = v[std::min(2 * t + 1, nk - 1)] + 32 * g;
        pv_pair<RG, NCB>(acc, p, t, va, vb);
      }
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < 2 * NCB; ++c) _mm512_store_si512(sums[r][2 * g + c], acc_bits(acc[r][c]));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) {
    const __m512 cr = _mm512_set1_ps(corr[r]), mr = _mm512_set1_ps(mul[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c)
      add_pair_sums(o[r] + 32 * c, _mm512_load_si512(sums[r][2 * c]), _mm512_load_si512(sums[r][2 * c + 1]), cr, mr);
  }
}

// pv_int8 below over all RG rows and NC chunks at once (pv_int8_span_blocked)
template <int RG, int NC, int NCB, typename Rows, typename Ahead>
inline void pv_int8_blocked(int64_t nk, const uint32_t* const* p, Rows v, float* const* o, const float* corr,
                            const float* mul, Ahead&& ahead, int64_t nsub, const int64_t* pair_end, int64_t stride) {
  const int64_t np = (nk + 1) / 2;
  for (int64_t u = 0, i = 0; u < nsub; ++u) {
    const int64_t end = u + 1 < nsub ? pair_end[u] : np;
    pv_int8_span_blocked<RG, NC, NCB>(i, end, nk, p, v, o, corr + u * stride, mul + u * stride, ahead);
    i = end;
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
  for (int64_t u = 0, i = 0; u < nsub; ++u) {
    const int64_t end = u + 1 < nsub ? pair_end[u] : np;
    pv_int8_span<RG, NC>(i, end, nk, p, v, d0, o, corr + u * stride, mul + u * stride, ahead);
    i = end;
  }
}

// quantize_p16_scalar, 16 keys per step (a maximum and a probe that a NaN cannot escape: the
// max instruction drops a NaN operand, x * 0 does not)
inline float quantize_p16(const float* p, const float* sv, int64_t n, int16_t* codes) {
  __m512 mx = _mm512_setzero_ps(), probe = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), _mm512_maskz_loadu_ps(m, sv + j));
    mx = _mm512_max_ps(mx, x), probe = _mm512_fmadd_ps(x, zero, probe);
  }
  const float amax = _mm512_reduce_max_ps(mx), pr = _mm512_reduce_add_ps(probe);
  const bool bad = pr != pr;
  const __m512 inv = _mm512_set1_ps(bad || amax <= 0.f ? 0.f : 32767.f / amax), half = _mm512_set1_ps(0.5f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + j), _mm512_maskz_loadu_ps(m, sv + j));
    _mm512_mask_cvtepi32_storeu_epi16(codes + j, m, _mm512_cvttps_epi32(_mm512_fmadd_ps(x, inv, half)));
  }
  if (n & 1) codes[n] = 0;
  return bad ? std::numeric_limits<float>::quiet_NaN() : amax / 32767.f;
}

#endif  // SPARSE_ATTN_INT8_DOT

// whether pv_int8_blocked serves Dv columns (4 rows x Dv columns need more than the 16 accumulators
// of one pass: Dv 128 and 256); false where it is not built (Arm keeps its passes)
inline bool pv_int8_blocks(int64_t dv) {
#ifdef SPARSE_ATTN_INT8_PV_BLOCKED
  return pv_one_pass_dim(dv);
#else
  (void)dv;
  return false;
#endif
}

}  // namespace sparse_attn_cpu

#if defined(__aarch64__)
#include "cpu/decode_int8_neon.h"  // SPARSE_ATTN_INT8_DOT on Arm: the same functions with `sdot` (dotprod)
#endif
