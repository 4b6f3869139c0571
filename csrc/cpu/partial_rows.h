// How the tokens of a query tile see one of its partial key blocks, under the contract's token
// rule (causal, a sliding window with sink tokens): none of the block, all of it, or part of it.
// A layout lists a block as partial for the whole tile; the tile's tokens are consecutive, so its
// rows split into at most five runs (none, part, all, part, none: before the block, on its
// diagonal, past it, on the window's trailing edge, past the window). The forward and the
// backward's dq pass skip the rows that see none of it, run the ones that see all of it
// unmasked and give the token rule only to the rest; the dk/dv pass skips the tile's leading and
// trailing columns that see none of it. The rest get the rule as ranges of hidden keys
// (hide_keys: a query's row) or of hidden queries (hide_queries: a key's row of query columns).
#pragma once

#include <algorithm>
#include <cstdint>

namespace sparse_attn_cpu {

enum class Sees { kNone, kAll, kPart };

// what the token at position p sees of the keys [j0, j0 + nk): key j is visible unless
// (causal and j > p) or (window >= 0 and p - j >= window and j >= sinks)
inline Sees sees_block(int64_t p, int64_t j0, int64_t nk, bool causal, int64_t window, int64_t sinks) {
  if (nk <= 0) return Sees::kNone;
  const int64_t hi = causal ? std::min(j0 + nk - 1, p) : j0 + nk - 1;  // the last key the causal rule keeps
  int64_t seen = hi - j0 + 1;
  if (window >= 0) {
    const int64_t cut = std::min(hi, p - window);  // keys [j0, cut] are past the window...
    if (cut >= j0) seen -= (cut - j0 + 1) - std::max<int64_t>(0, std::min(cut, sinks - 1) - j0 + 1);  // ...but sinks
  }
  return seen <= 0 ? Sees::kNone : seen == nk ? Sees::kAll : Sees::kPart;
}

// f(lo, hi, masked) for each run [lo, hi) of the rows (row r: the token at p_lo + r) that sees
// some of the keys [j0, j0 + nk): masked false where every row of the run sees all of them
template <typename F>
inline void partial_rows(int64_t p_lo, int64_t rows, int64_t j0, int64_t nk, bool causal, int64_t window,
                         int64_t sinks, F&& f) {
  int64_t lo = 0;
  Sees run = Sees::kNone;
  for (int64_t r = 0; r <= rows; ++r) {
    const Sees s = r < rows ? sees_block(p_lo + r, j0, nk, causal, window, sinks) : Sees::kNone;
    if (r < rows && s == run) continue;
    if (run != Sees::kNone && r > lo) f(lo, r, run == Sees::kPart);
    lo = r, run = s;
  }
}

// the rows [first, last) of a tile that see anything of the keys [j0, j0 + nk) (first == last: none)
inline void seeing_rows(int64_t p_lo, int64_t rows, int64_t j0, int64_t nk, bool causal, int64_t window,
                        int64_t sinks, int64_t& first, int64_t& last) {
  first = rows, last = 0;
  partial_rows(p_lo, rows, j0, nk, causal, window, sinks, [&](int64_t lo, int64_t hi, bool) {
    first = std::min(first, lo), last = std::max(last, hi);
  });
  if (first >= last) first = last = 0;
}

// A causal block's rows whose first token does not see the whole block (its diagonal) go
// kNarrowTokens tokens at a time, each group over only the keys its last token sees, rounded up to
// kNarrowTokens (a float32 vector of scores): the keys past them are hidden from every row of the
// group (the forward's attend and the backward's dq pass, off the AMX tiles)
constexpr int64_t kNarrowTokens = 16;

// whether the rows from the token at position p_first on narrow the causal block [j0, j0 + nk):
// the first token's hidden keys span at least one group's unit
inline bool narrows(int64_t p_first, int64_t j0, int64_t nk, bool causal) {
  return causal && p_first - j0 + 1 + kNarrowTokens <= nk;
}

// the position of the last token among `rows` state rows rid[0..rows) (row r = token * G + head),
// the group's rows starting at token position p_lo
inline int64_t last_token(const int32_t* rid, int64_t rows, int64_t G, int64_t p_lo) {
  int64_t p_last = 0;
  for (int64_t r = 0; r < rows; ++r) p_last = std::max<int64_t>(p_last, p_lo + rid[r] / G);
  return p_last;
}

// the columns a group of rows whose last token is at p_last computes of the block [j0, j0 + nk)
// padded to kbp: the keys it sees rounded up to `unit`, at most kbp
inline int64_t seen_width(int64_t p_last, int64_t j0, int64_t nk, int64_t kbp, int64_t unit) {
  const int64_t seen = std::clamp<int64_t>(p_last - j0 + 1, 0, nk);
  return std::min(kbp, (seen + unit - 1) / unit * unit);
}

// the rule on one row of scores, as ranges (no per-element test): s[c] = fill for the keys j0 + c,
// c < nk, that the token at position p does not see (j > p under the causal rule, and
// sinks <= j <= p - window under a window)
inline void hide_keys(float* s, int64_t p, int64_t j0, int64_t nk, bool causal, int64_t window, int64_t sinks,
                      float fill) {
  if (causal) {
    const int64_t c = std::max<int64_t>(0, p - j0 + 1);
    if (c < nk) std::fill(s + c, s + nk, fill);
  }
  if (window >= 0) {
    const int64_t c0 = std::max<int64_t>(0, sinks - j0), c1 = std::min<int64_t>(nk, p - window - j0 + 1);
    if (c0 < c1) std::fill(s + c0, s + c1, fill);
  }
}

// the same rule along one key's row of query columns: s[c] = fill for the columns x0 + c, c < C
// (column x: head x % G of the token at position off + x / G), that do not see key j (the tokens
// before j under the causal rule, those at j + window or later under a window unless j is a sink)
inline void hide_queries(float* s, int64_t x0, int64_t C, int64_t G, int64_t off, int64_t j, bool causal,
                         int64_t window, int64_t sinks, float fill) {
  if (causal) {
    const int64_t c1 = std::clamp<int64_t>((j - off) * G - x0, 0, C);
    std::fill(s, s + c1, fill);
  }
  if (window >= 0 && j >= sinks) {
    const int64_t c0 = std::clamp<int64_t>((j + window - off) * G - x0, 0, C);
    std::fill(s + c0, s + C, fill);
  }
}

}  // namespace sparse_attn_cpu
