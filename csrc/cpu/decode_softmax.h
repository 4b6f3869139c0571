// The decode kernel's softmax: online (base 2: q is pre-scaled by scale * log2 e) across the
// segments of a split, then the splits merged by log-sum-exp. float32 throughout. Soft-capping
// (softcap.h) caps a row's raw scores before its token rule.
//
// Non-finite inputs (the contract's "Bad input"): a row whose float64 evaluation involves a NaN
// or an infinity comes out NaN, never finite and wrong.
// * Its own q row, or the K row of a key it sees: the key's score is NaN or +-inf. Before the
//   token rule masks the scores (masked keys become -inf, so a -inf score would pass for a masked
//   key), each row looks for a non-finite score among the keys it sees; if it finds one, its
//   running max becomes NaN, which every later step keeps (NaN corrections, NaN sums), and the
//   merge turns the row into NaN. The max itself is not trusted with NaN: a running max drops a
//   NaN that is not last.
// * The V row of a key it sees: P . V carries the infinity or NaN into the row's accumulators
//   (p x inf = inf, 0 x inf = NaN); the merge makes the whole row NaN if any of its columns is
//   not finite.
// * A key the row does not see: its score is masked before the max and the sums, so its K row
//   never matters. Its V row does when another row of the same call (Sq > 1) sees that key and
//   it sits in a segment this row reads: P . V multiplies the masked key's p = 0 with it, and
//   0 x NaN = NaN. That spreading stays within the call's rows of one (batch, kv head); with
//   Sq = 1 every key the kernel reads is a key the row sees.
// A score that overflows float32 from finite inputs counts as non-finite (the row is NaN).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu/decode_plan.h"
#include "cpu/softcap.h"
#include "cpu/vec.h"

namespace sparse_attn_decode {

namespace v8 = sparse_attn_cpu::v8;
using sparse_attn_scalar::exp2_scalar;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// whether s[a, z) holds a NaN or an infinity (x * 0 is NaN exactly for those)
inline bool any_nonfinite(const float* s, int64_t a, int64_t z) {
  v8::f8 acc = v8::zero();
  const v8::f8 zero = v8::zero();
  int64_t j = a;
  for (; j + 8 <= z; j += 8) acc += v8::load(s + j) * zero;
  float t = 0.f;
  for (; j < z; ++j) t += s[j] * 0.f;
  for (int l = 0; l < 8; ++l) t += v8::lane(acc, l);
  return t != t;
}

#if defined(__AVX512F__) && defined(SPARSE_ATTN_VECTOR_TYPES)
using sparse_attn_cpu::vfloat;

// online_softmax's common case for one row, 16 lanes at a time: no soft-cap, and every key of the
// run visible to the row (the run lies inside its window). One pass per segment finds the max and
// probes for a non-finite score at once, a second exponentiates, sums and zeroes the padding; the
// general path below takes 5-6 passes of 8 lanes (probe twice, pad, max, exp). Returns false,
// having changed nothing, if a score is not finite (the general path then makes the row NaN).
// (2-core Zen 4, int8 cache, 4096 keys, Hq 32, Hkv 8, D 128, 1 thread: ~4% of the call.)
inline bool softmax_row_visible(float* srow, int64_t j0, const Seg* subs, int64_t nsub, int64_t cnt, int64_t i,
                                float& m, float& l, float* corr) {
  constexpr int64_t kMaxSubs = 64;
  if (nsub > kMaxSubs) return false;
  float mb[kMaxSubs];
  __m512 probe = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps(), ninf = _mm512_set1_ps(kNegInf);
  for (int64_t u = 0; u < nsub; ++u) {
    const float* s = srow + (subs[u].j0 - j0);
    const int64_t n = subs[u].nk;
    __m512 mx = ninf;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      const __m512 x = _mm512_mask_loadu_ps(ninf, k, s + j);
      mx = _mm512_max_ps(mx, x);
      probe = _mm512_mask_fmadd_ps(x, k, zero, probe);  // x * 0: NaN exactly for a NaN or an infinity
    }
    mb[u] = _mm512_reduce_max_ps(mx);
  }
  const float pr = _mm512_reduce_add_ps(probe);
  if (pr != pr) return false;
  for (int64_t u = 0; u < nsub; ++u) {
    float* s = srow + (subs[u].j0 - j0);
    const int64_t n = subs[u].nk, n8 = (n + 7) / 8 * 8;
    const float m_new = std::max(m, mb[u]);
    float& cr = corr[u * cnt + i];
    if (m_new == kNegInf) {  // an empty segment before any key
      cr = 1.f;
      std::fill_n(s, n8, 0.f);
      continue;
    }
    cr = exp2_scalar(m - m_new);  // 0 on the row's first visible segment (m = -inf)
    const __m512 vm = _mm512_set1_ps(m_new);
    v8::f8 acc = v8::zero();  // summed in the general path's order: the same bits whichever path a row takes
    for (int64_t j = 0; j < n8; j += 16) {  // p = 2^(s - m) for the n keys, 0 for the padding to n8
      const __mmask16 kv = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16(n > j ? (1u << (n - j)) - 1 : 0u);
      const __mmask16 kw = n8 - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n8 - j)) - 1);
      const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(kv, s + j), vm);
      const __m512 p = _mm512_maskz_mov_ps(kv, static_cast<__m512>(sparse_attn_cpu::vexp2(static_cast<vfloat>(x))));
      _mm512_mask_storeu_ps(s + j, kw, p);
      acc += static_cast<v8::f8>(_mm512_castps512_ps256(p));
      if (n8 - j > 8) acc += static_cast<v8::f8>(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
    }
    float sum = 0.f;
    for (int k = 0; k < 8; ++k) sum += v8::lane(acc, k);
    l = l * cr + sum;
    m = m_new;
  }
  return true;
}
#endif

// The online softmax over one segment, or a run of nsub consecutive segments subs[0, nsub) (its
// keys [j0, j0 + nk)), for the cnt rows that visit it: row i (row id rid[i], token rid[i] / G)
// has its raw scores q . k_j at sp[i][j - j0], padded with room to a multiple of 8 keys past each
// segment. The scores become the probabilities 2^(s - m), the row's max m[rid[i]] and sum
// l[rid[i]] advance, and corr[u * cnt + i] is segment u's rescaling of row i's accumulators (0 on
// the row's first visible segment). Per segment, so that a run gives the bits of its segments.
inline void online_softmax(const Params& P, int64_t skb, int64_t j0, int64_t nk, const Seg* subs, int64_t nsub,
                           int64_t cnt, const int32_t* rid, float* const* sp, float* m, float* l, float* corr) {
  const int64_t nk8 = (nk + 7) / 8 * 8;
  for (int64_t i = 0; i < cnt; ++i) {
    const int64_t row = rid[i], t = row / P.G;
    const RowRange rr = row_range(P, skb, t);
#if defined(__AVX512F__) && defined(SPARSE_ATTN_VECTOR_TYPES)
    if (P.cap <= 0.f && j0 >= rr.lo && j0 + nk <= rr.hi &&
        softmax_row_visible(sp[i], j0, subs, nsub, cnt, i, m[row], l[row], corr))
      continue;
#endif
    // a non-finite score among the keys the row sees (the window's and the sinks' keys here)
    const bool bad = any_nonfinite(sp[i], std::max(j0, rr.lo) - j0, std::min(j0 + nk, rr.hi) - j0) ||
                     any_nonfinite(sp[i], 0, std::min(j0 + nk, rr.s) - j0);
    if (P.cap > 0.f) sparse_attn_cpu::softcap_row(sp[i], nk8, P.cap);  // before the padding and the rule's -inf
    for (int64_t u = 0; u < nsub; ++u) {  // padding and the token rule
      const int64_t sj0 = subs[u].j0, snk = subs[u].nk, snk8 = (snk + 7) / 8 * 8;
      float* s = sp[i] + (sj0 - j0);
      for (int64_t j = snk; j < snk8; ++j) s[j] = kNegInf;
      const bool in_window = sj0 >= rr.lo && sj0 + snk <= rr.hi, in_sinks = sj0 + snk <= rr.s;
      if (!in_window && !in_sinks)
        for (int64_t j = 0; j < snk; ++j) {
          const int64_t a = sj0 + j;
          if (!((a >= rr.lo && a < rr.hi) || a < rr.s)) s[j] = kNegInf;
        }
    }
    // a run whose scores stay at or below the row's running max leaves it unchanged at every
    // segment: their own maxima need not be found (the same values result, ~3% of a run)
    bool steady = false;
    if (nsub > 1 && m[row] != kNegInf && !bad) {
      v8::f8 mx = v8::splat(kNegInf);
      for (int64_t j = 0; j < nk8; j += 8) mx = v8::max(mx, v8::load(sp[i] + j));
      float m_run = kNegInf;
      for (int k = 0; k < 8; ++k) m_run = std::max(m_run, v8::lane(mx, k));
      steady = m_run <= m[row];
    }
    for (int64_t u = 0; u < nsub; ++u) {
      const int64_t sj0 = subs[u].j0, snk = subs[u].nk, snk8 = (snk + 7) / 8 * 8;
      float* s = sp[i] + (sj0 - j0);
      float& cr = corr[u * cnt + i];
      float m_blk = kNegInf;
      if (!steady) {
        v8::f8 mx = v8::splat(kNegInf);
        for (int64_t j = 0; j < snk8; j += 8) mx = v8::max(mx, v8::load(s + j));
        for (int k = 0; k < 8; ++k) m_blk = std::max(m_blk, v8::lane(mx, k));
      }
      // NaN once the row is bad: std::max keeps a NaN m_old, and the NaN reaches cr, p and l
      const float m_old = m[row], m_new = bad ? kNaN : std::max(m_old, m_blk);
      if (m_new == kNegInf) {  // nothing visible to this row yet
        cr = 1.f;
        std::fill_n(s, snk8, 0.f);
        continue;
      }
      cr = exp2_scalar(m_old - m_new);  // 0 on the row's first visible segment
      const v8::f8 vm = v8::splat(m_new);
      v8::f8 acc = v8::zero();
      for (int64_t j = 0; j < snk8; j += 8) {
        const v8::f8 pj = v8::exp2(v8::load(s + j) - vm);
        v8::store(s + j, pj);
        acc += pj;
      }
      float sum = 0.f;
      for (int k = 0; k < 8; ++k) sum += v8::lane(acc, k);
      l[row] = l[row] * cr + sum;
      m[row] = m_new;
    }
  }
}

// The ns splits of (batch b, kv head h) merged by log-sum-exp into out (B, Hq, Sq, Dv) and lse
// (B, Hq, Sq): split i's unnormalised out po[(i * R + row) * Dv ...], max pm[i * R + row] and sum
// pl[i * R + row]. A row with no visible key gives 0 and lse = +inf; a row that met a non-finite
// value (a NaN max, or a column of its sum that is not finite) gives NaN and lse = NaN. lse may be
// null (a serving step's call: decode_step), then only out is written.
template <typename OutT>
void merge(const Params& P, int64_t b, int64_t h, int64_t ns, const float* po, const float* pm, const float* pl,
           OutT* out, float* lse, std::vector<float>& acc, std::vector<float>& w) {
  const int64_t R = P.R, Dv = P.Dv;
  acc.resize(Dv), w.resize(ns);
  for (int64_t row = 0; row < R; ++row) {
    const int64_t t = row / P.G, g = row % P.G;
    const int64_t orow = (b * P.Hq + h * P.G + g) * P.sq + t;
    OutT* dst = out + orow * Dv;
    float mx = kNegInf;
    bool bad = false;
    for (int64_t i = 0; i < ns; ++i) {
      const float x = pm[i * R + row];
      bad |= x != x;
      mx = std::max(mx, x);
    }
    if (mx == kNegInf && !bad) {  // no visible key
      for (int64_t c = 0; c < Dv; ++c) dst[c] = static_cast<OutT>(0.f);
      if (lse) lse[orow] = std::numeric_limits<float>::infinity();
      continue;
    }
    float tot = 0.f;
    if (!bad) {
      float sum = 0.f;
      for (int64_t i = 0; i < ns; ++i) {
        w[i] = exp2_scalar(pm[i * R + row] - mx);
        sum += w[i] * pl[i * R + row];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      // a split that saw none of the row's keys adds nothing; one whose weight underflowed to 0
      // still adds 0 x its sums, which is exact for finite sums and NaN for the others
      for (int64_t i = 0; i < ns; ++i) {
        if (pm[i * R + row] == kNegInf) continue;
        const float* src = po + (i * R + row) * Dv;
        for (int64_t c = 0; c < Dv; ++c) acc[c] += w[i] * src[c];
      }
      const float inv = 1.f / sum;
      for (int64_t c = 0; c < Dv; ++c) acc[c] *= inv, tot += acc[c] * 0.f;
      if (lse) lse[orow] = kLn2 * (mx + std::log2(sum));
    }
    if (bad || tot != tot) {
      for (int64_t c = 0; c < Dv; ++c) dst[c] = static_cast<OutT>(kNaN);
      if (lse) lse[orow] = kNaN;
      continue;
    }
    for (int64_t c = 0; c < Dv; ++c) dst[c] = static_cast<OutT>(acc[c]);
  }
}

}  // namespace sparse_attn_decode
