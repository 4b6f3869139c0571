// InfLLMv2's per-row steps shared by the prefill selection (infllmv2_select.cpp) and the decode
// selection over a cache's window sums (infllmv2_decode.cpp): kernel visibility, the number of
// picks of a row, the base-2 log-sum-exp, the exp-add of a head's scores into the group sum, and
// step 4-5 for one row (max-pool onto blocks, candidates, running top-w; contract "InfLLMv2
// semantics"). Scores are in base 2: q is pre-multiplied by scale * log2(e), so 2^(f - lse2) is
// the contract's exp(scale q.kc - LSE).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/vec.h"

namespace sparse_attn_cpu {
namespace infllmv2 {

constexpr float kLog2e = 1.4426950408889634f;

// the rule's integers (a pattern's fields as the attention view sees them)
struct Rule {
  int64_t ks, st, bs, ratio, topk, forced_init, window;
  bool variant41, coarse;
};

// kernels of size `size`, stride `stride` visible from position p: end = j*stride + size - 1 <= p
inline int64_t visible(int64_t p, int64_t size, int64_t stride, int64_t n) {
  return p < size - 1 ? 0 : std::min(n, (p - size + 1) / stride + 1);
}

// blocks the scores pick for a row of query block qb, beyond the forced ones
inline int64_t extra_blocks(const Rule& R, int64_t qb) {
  const int64_t before = std::max<int64_t>(0, qb - R.window + 1);
  const int64_t init_counted = std::min(before, R.forced_init);
  if (R.variant41) return std::max<int64_t>(0, R.topk - init_counted - std::min(qb + 1, R.window));
  return R.topk - init_counted;
}

// log2-sum-exp2 of x[0:n] (n > 0): NaN if an x is NaN, +inf if one is +inf (as the PyTorch
// logsumexp), -inf if all are -inf; vectorised (the rows' normalisers are a tenth of the selection)
inline float lse2(const float* x, int64_t n) {
  float m = kNegInf;
  bool nan = false;
  int64_t j = 0;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  {
    vfloat acc = vsplat(kNegInf);
    vint seen{};
    for (; j + kVec <= n; j += kVec) {
      const vfloat v = vload(x + j);
      acc = v > acc ? v : acc;
      seen |= (v != v);
    }
    for (int i = 0; i < kVec; ++i) m = std::max(m, acc[i]), nan = nan || seen[i] != 0;
  }
#endif
  for (int64_t t = j; t < n; ++t) m = std::max(m, x[t]), nan = nan || x[t] != x[t];
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (!std::isfinite(m)) return m;
  float s = 0.f;
  j = 0;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  {
    vfloat acc{};
    const vfloat vm = vsplat(m);
    for (; j + kVec <= n; j += kVec) acc += vexp2(vload(x + j) - vm);
    for (int i = 0; i < kVec; ++i) s += acc[i];
  }
#endif
  for (; j < n; ++j) s += exp2_scalar(x[j] - m);
  return m + std::log2(s);
}

// s[0:n] += 2^(f[0:n] - c)
inline void add_exp2(float* s, const float* f, int64_t n, float c) {
  int64_t j = 0;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  const vfloat vc = vsplat(c);
  for (; j + kVec <= n; j += kVec) vstore(s + j, vload(s + j) + vexp2(vload(f + j) - vc));
#endif
  for (; j < n; ++j) s[j] += exp2_scalar(f[j] - c);
}

// the `w` best of score[lo..hi] (w < hi - lo + 1, no NaN) -> out, ascending; ties keep the lower
// index. ids: scratch of hi - lo + 1 ints. A selection (nth_element) under the total order (score
// descending, index ascending): O(candidates) per row.
inline void top_w(const float* score, int64_t lo, int64_t hi, int64_t w, int32_t* ids, int32_t* out) {
  const int64_t cnt = hi - lo + 1;
  for (int64_t e = 0; e < cnt; ++e) ids[e] = static_cast<int32_t>(lo + e);
  std::nth_element(ids, ids + (w - 1), ids + cnt, [score](int32_t a, int32_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  std::sort(ids, ids + w);
  std::copy(ids, ids + w, out);
}

// Steps 4-5 for the row at position p >= 0 whose group scores over its v1 visible fine kernels are
// sr[0:v1]: the picks beyond the forced blocks, ascending, into out[0:...] (the rest untouched).
// nb: blocks of the call; score / ids: scratch of nb floats / ints.
inline void pick_row(const Rule& R, int64_t p, int64_t nb, const float* sr, int64_t v1, float* score, int32_t* ids,
                     int32_t* out) {
  const int64_t qb = p / R.bs;
  const int64_t lo = R.forced_init, hi = std::min(nb - 1, qb - R.window);
  const int64_t cnt = hi - lo + 1, want = std::min(extra_blocks(R, qb), R.topk);
  if (cnt <= 0 || want <= 0) return;
  if (cnt <= want) {
    for (int64_t e = 0; e < cnt; ++e) out[e] = static_cast<int32_t>(lo + e);
    return;
  }
  for (int64_t blk = lo; blk <= hi; ++blk) {  // kernels [ratio*blk - 1, ratio*blk + ratio) that exist
    const int64_t j0 = std::max<int64_t>(0, R.ratio * blk - 1), j1 = std::min(v1, R.ratio * blk + R.ratio);
    float m = 0.f;  // scores are >= 0: a block without a visible kernel scores 0
    for (int64_t j = j0; j < j1; ++j) m = (sr[j] > m || sr[j] != sr[j]) ? sr[j] : m;
    score[blk] = m != m ? std::numeric_limits<float>::infinity() : m;  // NaN ranks first
  }
  top_w(score, lo, hi, want, ids, out);
}

}  // namespace infllmv2
}  // namespace sparse_attn_cpu
