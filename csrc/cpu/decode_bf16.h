// bfloat16 products for decode's few query rows, straight from the K/V rows (AVX-512 BF16).
//
// Decode has R = G x Sq query rows (4 to 16 typically) and reads each key once. The matrix-product
// form of vec_bf16.h first pair-packs the keys (a 16 x 16 word transpose of K, an interleave of V
// rows, both stored and read back); with so few rows that packing costs as much as the products.
// Here the rows are used as they sit in the cache:
//   scores:  per key, vdpbf16ps of the key's row chunks with each query row's chunks, giving 16
//            partial sums per (row, key); 16 keys' partial vectors are then reduced to one vector
//            of 16 scores by score_tree.h's 4-level tree (the first level per key pair);
//   P . V:   per pair of keys, the two V rows are interleaved in registers (one vpermt2w per 16
//            words) and multiplied with each row's broadcast (p_2i, p_2i+1) pair into accumulators
//            that stay in registers across the segment: 16 vectors, so a pass covers 2 rows x 128
//            columns or 4 rows x 64. Whole V rows (2 rows per pass, the other rows' passes reading
//            the segment back from L1/L2) rather than half rows for all 4 rows at once: the first
//            pass then streams the segment's V front to back, which the hardware prefetchers
//            follow; half rows (two 64-byte lines of every 256 bytes, the other two in the next
//            pass) they followed badly. Measured at Sk = 131072, G = 4, D = 128, 2 threads, 40
//            alternating calls in one process: 17.9 -> 21.4 GB/s median (paired ratio 1.20); one
//            thread 9.7 -> 10.5.
// Both loops take a hook called once per key pair, which the caller uses to prefetch the next
// segment's rows into L2 at an even pace (Pacer, decode_direct.h). Measured on one Zen 4 core, Sk =
// 131072, D = 128: 9.9 GB/s without, 13.3 GB/s with a prefetch in the first passes only (the
// hardware prefetchers alone do not keep the K and V streams ahead of the products).
// Requires D and Dv multiples of 32 (one 64-byte vector per 32 elements); callers use the packed
// path otherwise.
#pragma once

#include "cpu/decode_direct.h"  // kDirectRows, the dispatchers, Pacer
#include "cpu/vec_bf16.h"

#ifdef SPARSE_ATTN_BF16_DOT

#if defined(__aarch64__)
#include "cpu/decode_bf16_neon.h"  // the same two functions with Arm's bfdot
#else
#include "cpu/score_tree.h"

namespace sparse_attn_cpu {

// The 32 bf16 words of a row's chunk as the products read them: a bf16 row as it is. (Another
// storage passes its own: decode_fp8.h's converts fp8 codes in registers.)
struct Bf16Words {
  __attribute__((always_inline)) __m512i operator()(const uint16_t* p) const { return _mm512_loadu_si512(p); }
};

// s[r][0 : round_up(nk, 16)) = out_mul * (q_r . k_j), r < RG. q rows as bf16 words (DC * 16 words
// each); krow(j) is key j's row (DC * 32 elements, read 32 at a time by `words`). Keys past nk
// repeat key nk - 1 (finite scores the caller masks). `ahead(j)` is called once per key pair (j, j + 1).
template <int RG, int DC, typename Rows, typename Ahead, typename Words = Bf16Words>
inline void qk_direct(int64_t nk, const uint32_t* const* q, Rows krow, float* const* s, float out_mul,
                      Ahead&& ahead, Words words = {}) {
  __m512bh qv[RG][DC];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < DC; ++c) qv[r][c] = as_bh(_mm512_loadu_si512(q[r] + 16 * c));
  __m512 red[RG][8];  // per key pair, its score_pair vector
  const __m512 mul = _mm512_set1_ps(out_mul);
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    for (int m = 0; m < 8; ++m) {
      const int64_t ja = std::min(j0 + 2 * m, nk - 1), jb = std::min(j0 + 2 * m + 1, nk - 1);
      ahead(j0 + 2 * m);
      const auto* ka = krow(ja);
      const auto* kb = krow(jb);
      __m512 a[RG], b[RG];
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) a[r] = _mm512_setzero_ps(), b[r] = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int c = 0; c < DC; ++c) {
        const __m512bh x = as_bh(words(ka + 32 * c)), y = as_bh(words(kb + 32 * c));
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r) a[r] = _mm512_dpbf16_ps(a[r], qv[r][c], x), b[r] = _mm512_dpbf16_ps(b[r], qv[r][c], y);
      }
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) red[r][m] = score_pair(a[r], b[r]);  // score_tree.h
    }
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) _mm512_storeu_ps(s[r] + j0, _mm512_mul_ps(score_16(red[r]), mul));
  }
}

// word indices interleaving two rows' words 0-15 (lo; hi = lo + 16 for words 16-31): (x0, y0, x1, y1, ...)
__attribute__((always_inline)) inline __m512i pair_lo_idx() {
  return _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3,
                          34, 2, 33, 1, 32, 0);
}

// acc[r][0 : 2 NC) += key pair i's products over NC chunks of 32 columns: p[r][i] row r's bf16 pair,
// va / vb the two keys' V rows from the chunks' first column (read by `words`)
template <int RG, int NC, typename E, typename Words>
__attribute__((always_inline)) inline void pv_pair_bf16(__m512 (&acc)[RG][2 * NC], const uint32_t* const* p, int64_t i,
                                                        const E* va, const E* vb, __m512i lo_idx, __m512i hi_idx,
                                                        const Words& words) {
  __m512bh pv[RG];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r) pv[r] = as_bh(_mm512_set1_epi32(static_cast<int>(p[r][i])));
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    const __m512i x = words(va + 32 * c), y = words(vb + 32 * c);
    const __m512bh lo = as_bh(_mm512_permutex2var_epi16(x, lo_idx, y)), hi = as_bh(_mm512_permutex2var_epi16(x, hi_idx, y));
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r)
      acc[r][2 * c] = _mm512_dpbf16_ps(acc[r][2 * c], pv[r], lo),
      acc[r][2 * c + 1] = _mm512_dpbf16_ps(acc[r][2 * c + 1], pv[r], hi);
  }
}

// o_r[d0 : d0 + 32 NC) = corr_r * o_r + sum_i (p_r,2i p_r,2i+1) . (v_2i, v_2i+1)[d0 : d0 + 32 NC),
// r < RG, over the np = ceil(nk / 2) key pairs; p rows as bf16 pairs (word i = keys 2i, 2i + 1);
// vrow(j) key j's V row (contiguous, read 32 elements at a time by `words`); an odd nk's missing
// key reads `zero` (Dv zeros of the row's element type).
// `ahead(2 i)` is called once per key pair. With nsub > 1 the keys are nsub sub-segments, u ending at
// key pair pair_end[u] (the last at np), and the accumulators are rescaled by corr[u * corr_stride
// + r] in registers as sub-segment u starts: the same float operations as one call per sub-segment.
// Every loop over the 2 NC accumulators of a row is unrolled completely (`unroll 8`, 2 NC <= 8):
// with `unroll 4` the loops before and after the key loop stayed loops over acc[r][v] with a
// variable v, so GCC 12 kept `acc` as an array in memory (no scalar replacement). Without a prefetch
// hook it still moved the stores out of the key loop; with the Pacer's prefetches in the loop
// (`asm volatile` with a memory operand, apparently a barrier to that motion) it stored all 16
// accumulators to the stack after every key pair (docs/caches.md, "Seventh session").
template <int RG, int NC, typename Rows, typename E, typename Ahead, typename Words = Bf16Words>
inline void pv_direct(int64_t nk, const uint32_t* const* p, Rows vrow, const E* zero, int64_t d0,
                      float* const* o, const float* corr, Ahead&& ahead, int64_t nsub = 1,
                      const int64_t* pair_end = nullptr, int64_t corr_stride = 0, Words words = {}) {
  const __m512i lo_idx = pair_lo_idx(), hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  __m512 acc[RG][2 * NC];
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NC; ++v) acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + d0 + 16 * v), _mm512_set1_ps(corr[r]));
  const int64_t np = (nk + 1) / 2;
  for (int64_t u = 0, i = 0; u < nsub; ++u) {
    if (u > 0) {
#pragma GCC unroll 4
      for (int r = 0; r < RG; ++r) {
        const __m512 c = _mm512_set1_ps(corr[u * corr_stride + r]);
#pragma GCC unroll 8
        for (int v = 0; v < 2 * NC; ++v) acc[r][v] = _mm512_mul_ps(acc[r][v], c);
      }
    }
    for (const int64_t end = u + 1 < nsub ? pair_end[u] : np; i < end; ++i) {
      ahead(2 * i);
      pv_pair_bf16<RG, NC>(acc, p, i, vrow(2 * i) + d0, (2 * i + 1 < nk ? vrow(2 * i + 1) : zero) + d0, lo_idx, hi_idx,
                           words);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NC; ++v) _mm512_storeu_ps(o[r] + d0 + 16 * v, acc[r][v]);
}

// pv_direct over all columns [0, Dv = 32 NC) of RG rows in one pass over the keys, where RG x 2 NC
// accumulators do not fit in registers (4 rows x 128 columns: 32): blocks of kPvBlockPairsBf16 key
// pairs, each read for NCB chunks at a time, the other chunks' accumulators parked in the output rows
// themselves (float32, exact). Each accumulator sees the same float operations in the same order as
// in pv_direct (o * corr, the pairs in order, the rescale as a sub-segment starts), so the bits are
// the same; but a block's V rows come from memory once for all rows, and each V vector is turned
// into words and interleaved once, not once per pass of rows (fp8: 7 instructions per 32 codes).
#define SPARSE_ATTN_PV_DIRECT_BLOCKED 1
constexpr int64_t kPvBlockPairsBf16 = 16;

template <int RG, int NC, int NCB, typename Rows, typename E, typename Ahead, typename Words = Bf16Words>
__attribute__((noinline)) void pv_direct_blocked(int64_t nk, const uint32_t* const* p, Rows vrow, const E* zero,
                                                 float* const* o, const float* corr, Ahead&& ahead, int64_t nsub,
                                                 const int64_t* pair_end, int64_t corr_stride, Words words) {
  static_assert(NC % NCB == 0 && RG * 2 * NCB <= 16, "RG x 2 NCB accumulators in registers");
  const __m512i lo_idx = pair_lo_idx(), hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const int64_t np = (nk + 1) / 2;
  for (int64_t u = 0, i = 0; u < nsub; ++u) {
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {  // the rescale as the sub-segment starts (the first: corr[r])
      const __m512 c = _mm512_set1_ps(corr[u * corr_stride + r]);
      for (int v = 0; v < 2 * NC; ++v) _mm512_storeu_ps(o[r] + 16 * v, _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * v), c));
    }
    const int64_t end = u + 1 < nsub ? pair_end[u] : np;
    for (int64_t ib = i; ib < end; ib += kPvBlockPairsBf16) {
      const int64_t ie = std::min(end, ib + kPvBlockPairsBf16);
#pragma GCC unroll 1
      for (int g = 0; g < NC; g += NCB) {
        __m512 acc[RG][2 * NCB];
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
          for (int v = 0; v < 2 * NCB; ++v) acc[r][v] = _mm512_loadu_ps(o[r] + 32 * g + 16 * v);
        for (int64_t t = ib; t < ie; ++t) {
          if (g == 0) ahead(2 * t);
          pv_pair_bf16<RG, NCB>(acc, p, t, vrow(2 * t) + 32 * g, (2 * t + 1 < nk ? vrow(2 * t + 1) : zero) + 32 * g,
                                lo_idx, hi_idx, words);
        }
#pragma GCC unroll 4
        for (int r = 0; r < RG; ++r)
#pragma GCC unroll 8
          for (int v = 0; v < 2 * NCB; ++v) _mm512_storeu_ps(o[r] + 32 * g + 16 * v, acc[r][v]);
      }
    }
    i = end;
  }
}

}  // namespace sparse_attn_cpu
#endif  // x86 / Arm

#endif  // SPARSE_ATTN_BF16_DOT
