// q . K^T over a paged float32 cache that stores each (page, kv head) block's K as columns: the
// block is D rows of `ld` floats, row d holding element d of the page's keys side by side
// (Params::kcol = ld; the pages as a tensor (pages, Hkv, page_size, D) with strides (., ., 1, ld)).
// vLLM's own CPU writer keeps float32 K so; the vLLM plugin writes its float32 pages so too
// (integrations/vllm/pages.py), because the scores then come out with the keys in the vector
// lanes: one FMA per (row, 16 keys, d) and no reduction, where K rows end every 16 scores in
// score_tree.h's ~45 shuffles and adds. A stand-alone model of one warm decode call (4096 keys in
// 64-key pages in random order, Hq 4, Hkv 2, D 64, 256-key segments, softmax and P . V as the
// kernel's; one Zen 4 core, three rounds): 81-85 us with K rows, 69-76 us with K columns. The
// kernel itself gained less (its held-q K rows were already near the FMA rate): one thread, warm,
// 4096 keys 73.9-76.8 -> 71.6-73.6 us; from DRAM at 128K keys 1.16x (Hq 32, Hkv 8, D 128, 1 and 2
// threads), 0.97-1.09x (Hq 4, Hkv 2, D 64) (docs/vllm_measurements.md, thirty-sixth session).
//
// The keys of a segment are cut into chunks of at most 16 keys that are consecutive in one block
// (a page's keys, or fewer at a page's end, a window's start or the segment's end); four chunks
// run together so that every (row, chunk) accumulator's chain of FMAs has three others beside it.
// Bits: key j's score is one chain of FMAs over d = 0 .. D-1 in order from zero (a lane of the
// vector, or std::fma on targets without AVX-512: the same bits), whatever the chunk's length or
// place. It differs from the K rows' scores (summed per 16-column chunk, then by the tree), within
// the contract's float32 bounds: a cache with K columns gives its own bits (the same with the
// prefetches on or off; the splits, hence the merged output, follow the thread count as for rows).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sparse_attn_decode {

constexpr int kColChunks = 4;  // chunks of up to 16 keys in flight

// the next chunks of keys [j, nk): at most kColChunks runs of at most 16 keys in one page. The
// segment's keys are consecutive positions (decode_rows.h locate_rows), so a run ends at the
// segment's end or its page's: `off` is key j's row in its page, carried from chunk to chunk (the
// caller finds the first key's once per segment). Returns the key after the last one taken.
template <typename Rows>
inline int64_t col_chunks(Rows kr, int64_t j, int64_t nk, int64_t ps, int64_t& off, const float** base, int64_t* at,
                          int* n, int& nc) {
  for (nc = 0; nc < kColChunks && j < nk; ++nc) {
    const int c = static_cast<int>(std::min<int64_t>(std::min<int64_t>(16, nk - j), ps - off));
    base[nc] = kr[j], at[nc] = j, n[nc] = c;
    j += c, off += c;
    if (off == ps) off = 0;
  }
  return j;
}

// s[r][0 : nk) = q_r . k_j for RT rows (q rows float32, already scaled); key j's element d at
// kr[j] + d * ld; `ps` keys a page, key 0 at row `off` of its page (col_row); ahead(j, n) is called
// before keys [j, j + n) (the caller's paced prefetch)
template <int RT, typename Rows, typename Ahead>
inline void qk_cols(int64_t nk, int64_t D, int64_t ld, int64_t ps, int64_t off, const float* const* q, Rows kr,
                    float* const* s, Ahead&& ahead) {
  const float* base[kColChunks];
  int64_t at[kColChunks];
  int n[kColChunks];
  int nc = 0;
  for (int64_t j = 0; j < nk;) {
    const int64_t j0 = j;
    j = col_chunks(kr, j, nk, ps, off, base, at, n, nc);
    // the pass's keys handed to `ahead` one at a time, spread over its d loop (a burst of a pass's
    // 64 V rows at its start was mostly dropped: 0.87-0.93x the K rows' speed from DRAM)
    int64_t next = j0, due = 0;
    const int64_t keys = j - j0;
#if defined(__AVX512F__)
    __mmask16 m[kColChunks];
#pragma GCC unroll 4
    for (int c = 0; c < kColChunks; ++c) {
      m[c] = c < nc ? static_cast<__mmask16>((1u << n[c]) - 1u) : 0;  // n = 16: 0xFFFF
      if (c >= nc) base[c] = base[0];                                    // nothing loaded
    }
    __m512 acc[RT][kColChunks];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < kColChunks; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      for (due += keys; due >= D; due -= D) ahead(next++, 1);
      __m512 kv[kColChunks];
#pragma GCC unroll 4
      for (int c = 0; c < kColChunks; ++c) kv[c] = _mm512_maskz_loadu_ps(m[c], base[c] + d * ld);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        const __m512 qd = _mm512_set1_ps(q[r][d]);
#pragma GCC unroll 4
        for (int c = 0; c < kColChunks; ++c) acc[r][c] = _mm512_fmadd_ps(qd, kv[c], acc[r][c]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < nc; ++c) _mm512_mask_storeu_ps(s[r] + at[c], m[c], acc[r][c]);
    (void)next;
#else
    for (int64_t d = 0; d < keys; ++d) ahead(next++, 1);
    for (int c = 0; c < nc; ++c)
      for (int r = 0; r < RT; ++r) {
        float a[16] = {};
        if (n[c] == 16) {
          for (int64_t d = 0; d < D; ++d)
            for (int i = 0; i < 16; ++i) a[i] = std::fma(q[r][d], base[c][d * ld + i], a[i]);
        } else {
          for (int64_t d = 0; d < D; ++d)
            for (int i = 0; i < n[c]; ++i) a[i] = std::fma(q[r][d], base[c][d * ld + i], a[i]);
        }
        for (int i = 0; i < n[c]; ++i) s[r][at[c] + i] = a[i];
      }
#endif
  }
}

// the row in its page of the key whose column starts at `col` (K: the pool's first element; `blk` =
// D x ld; kst0 and kst1 are multiples of it, as decode_binding.cpp checks)
inline int64_t col_row(const float* K, const float* col, int64_t blk) { return (col - K) % blk; }

// where a prefetch of key j's share of its block starts: the block's D x ld floats spread evenly
// over its page_size keys (the same bytes per key as K rows when ld = page_size), so that asking
// for every key's share asks for the whole block once
inline const float* col_share(const float* K, const float* col, int64_t blk, int64_t page_size) {
  const int64_t off = col_row(K, col, blk);
  return col - off + off * (blk / page_size);
}

}  // namespace sparse_attn_decode
