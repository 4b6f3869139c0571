// The decode kernel's float32 products on AVX-512 (with BW and VL), in place of decode_f32.h's
// 8-lane loops (kept for every other target):
//   q . K^T: dot products on 16-lane vectors, 16 of them (RT rows x KT keys) reduced together to
//            16 scores by score_tree.h's tree. The 8-lane tiles reduced 8 dot products with a
//            vhaddps tree per 4 keys; a tile of 8 keys x 2 rows here keeps 16 independent
//            accumulators in flight instead of 8, with half the FMA instructions.
//   P . V:   decode_f32.h's stripes on 16-lane vectors: half the loads and FMAs per key.
// Paged f32 cache, Hq 4, Hkv 2, D 64, one Zen 4 core, kernel alone, alternating builds: 4096 keys
// 83.9 -> 78.9 us from the P . V stripes alone; q . K^T 16 lanes ~1-5% (at 1024 and 4096 keys).
//
// Bits: a score is the sum over 16-column chunks in order (one FMA per chunk into a zeroed lane
// vector), then the tree over its 16 lanes; neither depends on the key's place in a tile, the
// tile's shape, the number of rows or whether q is held in registers, so paged and contiguous
// caches, held and loaded q, full and tail tiles all give the same bits. They differ from the
// 8-lane tiles' bits (other targets), within the contract's float32 bounds. A head dim that is not
// a multiple of 16 ends with a masked chunk (zeros beyond D in both q and k). P . V keeps every
// output column's chain of FMAs in key order: the same bits as the 8-lane stripes.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(SPARSE_ATTN_VECTOR_TYPES)
#define SPARSE_ATTN_F32_Z16 1
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/quant_rows.h"
#include "cpu/score_tree.h"
#include "cpu/vec.h"

namespace sparse_attn_decode {
namespace f32z {

using sparse_attn_cpu::Elem;

// 16 elements of dtype DT from p as floats; lanes outside m read as 0 (and are not touched)
template <int DT>
__attribute__((always_inline)) inline __m512 load(const typename Elem<DT>::T* p, __mmask16 m = 0xFFFF) {
  if constexpr (DT == 0) {
    return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (DT == 1 || DT == 2) {
    const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
    if constexpr (DT == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  } else {  // a quantized cache's codes (int8, fp8 e4m3): quant_rows.h's 8-lane conversions, twice
    if (m == 0xFFFF) {
      const __m256 lo = (__m256)sparse_attn_cpu::v8::convert<DT>(p);
      const __m256 hi = (__m256)sparse_attn_cpu::v8::convert<DT>(p + 8);
      return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
    }
    alignas(64) float t[16] = {};
    for (int i = 0; i < 16; ++i)
      if (m >> i & 1) t[i] = Elem<DT>::get(p, i);
    return _mm512_load_ps(t);
  }
}

// keys per tile for RT rows: RT x KT <= 16 accumulators
template <int RT>
constexpr int kKeys = RT == 1 ? 16 : (RT == 2 ? 8 : 4);

// the 16 accumulators (RT x KT used, the rest zero) -> s[r][j + jj] for jj < n
template <int RT, int KT>
__attribute__((always_inline)) inline void store(const __m512 (&acc)[16], float* const* s, int64_t j, int n) {
  __m512 t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) t[i] = sparse_attn_cpu::score_pair(acc[2 * i], acc[2 * i + 1]);
  alignas(64) float out[16];
  _mm512_store_ps(out, sparse_attn_cpu::score_16(t));
  if (n == KT) {
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) std::memcpy(s[r] + j, out + r * KT, KT * sizeof(float));
  } else {
    for (int r = 0; r < RT; ++r)
      for (int jj = 0; jj < n; ++jj) s[r][j + jj] = out[r * KT + jj];
  }
}

// s[r][0 : nk) = q_r . k_j for RT rows of any head dim D (q rows read from memory per chunk);
// ahead(j, n) is called before keys [j, j + n) (the caller's paced prefetch)
template <int DT, int RT, typename Rows, typename Ahead>
inline void qk_rows(int64_t nk, int64_t D, const float* const* q, Rows kr, float* const* s, Ahead&& ahead) {
  constexpr int KT = kKeys<RT>;
  const int64_t D16 = D / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (D - D16)) - 1u);
  for (int64_t j = 0; j < nk; j += KT) {
    const int n = static_cast<int>(nk - j < KT ? nk - j : KT);
    ahead(j, n);
    const typename Elem<DT>::T* kp[KT];
#pragma GCC unroll 16
    for (int jj = 0; jj < KT; ++jj) kp[jj] = kr[j + (jj < n ? jj : n - 1)];  // past the end: the last key again
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D16; c += 16) {
      __m512 qv[RT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) qv[r] = _mm512_loadu_ps(q[r] + c);
#pragma GCC unroll 16
      for (int jj = 0; jj < KT; ++jj) {
        const __m512 kv = load<DT>(kp[jj] + c);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) acc[r * KT + jj] = _mm512_fmadd_ps(qv[r], kv, acc[r * KT + jj]);
      }
    }
    if (tail) {
      __m512 qv[RT];
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) qv[r] = _mm512_maskz_loadu_ps(tail, q[r] + D16);
#pragma GCC unroll 16
      for (int jj = 0; jj < KT; ++jj) {
        const __m512 kv = load<DT>(kp[jj] + D16, tail);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) acc[r * KT + jj] = _mm512_fmadd_ps(qv[r], kv, acc[r * KT + jj]);
      }
    }
    store<RT, KT>(acc, s, j, n);
  }
}

// qk_rows for RT <= 2 rows of D = 16 NQ with q held in registers over the segment (NQ vectors a
// row: at most 8 of the 32 registers, beside the 16 accumulators)
template <int DT, int RT, int NQ, typename Rows, typename Ahead>
inline void qk_rows_held(int64_t nk, const float* const* q, Rows kr, float* const* s, Ahead&& ahead) {
  static_assert(RT * NQ <= 8, "q rows held in registers");
  constexpr int KT = kKeys<RT>;
  __m512 qv[RT][NQ];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NQ; ++c) qv[r][c] = _mm512_loadu_ps(q[r] + 16 * c);
  for (int64_t j = 0; j < nk; j += KT) {
    const int n = static_cast<int>(nk - j < KT ? nk - j : KT);
    ahead(j, n);
    const typename Elem<DT>::T* kp[KT];
#pragma GCC unroll 16
    for (int jj = 0; jj < KT; ++jj) kp[jj] = kr[j + (jj < n ? jj : n - 1)];
    __m512 acc[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NQ; ++c)
#pragma GCC unroll 16
      for (int jj = 0; jj < KT; ++jj) {
        const __m512 kv = load<DT>(kp[jj] + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) acc[r * KT + jj] = _mm512_fmadd_ps(qv[r][c], kv, acc[r * KT + jj]);
      }
    store<RT, KT>(acc, s, j, n);
  }
}

// decode_f32.h's pv_stripe on 16-lane vectors: o_r[c, c + 16 NV) = corr_r o_r + sum_j p_r[j] v_j
// over the stripe, RT x NV accumulators. Every output column is the same chain of FMAs in key
// order as on 8-lane vectors, so the bits are the same; half the instructions per key (one load
// and one FMA per 16 columns) leave more of the out-of-order window to the rows' loads.
template <int DT, int RT, int NV, typename Rows, typename Ahead>
inline void pv_stripe(int64_t nk, int64_t c, const float* const* p, Rows vr, float* const* o, const float* corr,
                      Ahead&& ahead) {
  __m512 a[RT][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + c + 16 * v), _mm512_set1_ps(corr[r]));
  for (int64_t j = 0; j < nk; ++j) {
    ahead(j);
    const typename Elem<DT>::T* vc = vr[j] + c;
    __m512 x[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) x[v] = load<DT>(vc + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r][j]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_fmadd_ps(pr, x[v], a[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o[r] + c + 16 * v, a[r][v]);
}

}  // namespace f32z
}  // namespace sparse_attn_decode

#endif
