// The shapes shared by the decode kernel's "direct" products (decode_bf16.h: bfloat16 rows;
// decode_int8.h: int8 codes), which multiply straight from the K/V rows as they sit in the cache,
// with no packing: how many query rows a pass keeps in registers, which head dims they serve, the
// compile-time dispatchers, and the paced prefetch of the next segment (Pacer). Architecture-free:
// the products themselves are in the per-ISA headers.
#pragma once

#include "cpu/prefetch.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace sparse_attn_cpu {

constexpr int kDirectRows = 4;     // query rows per q . K^T pass (accumulators: 4 rows x 4 vectors)
constexpr int kPvAccVectors = 16;  // P . V accumulators per pass: RG rows x 2 NC 64-byte vectors
constexpr int64_t kPvCols = 128;   // P . V columns per pass, at most

// query rows per P . V pass of `cols` columns (kPvAccVectors accumulators, at most kDirectRows rows)
inline int64_t pv_rows_per_pass(int64_t cols) {
  return std::min<int64_t>(kDirectRows, kPvAccVectors * 16 / cols);
}

// head dims whose P . V can run over up to kDirectRows rows and all Dv columns in one pass over the
// keys (decode_bf16.h pv_direct_blocked, decode_int8.h pv_int8_blocked), where passes of
// pv_rows_per_pass rows would read every V row twice
inline bool pv_one_pass_dim(int64_t dv) { return dv == 128 || dv == 256; }

// the Pacer's steps over one segment of nk keys and cnt query rows: one per key pair of each q . K^T
// pass (kDirectRows rows) and of each P . V pass (kDirectRows rows, all columns, where `one_pass`;
// else pv_rows_per_pass rows x kPvCols columns)
inline int64_t pacer_calls(int64_t nk, int64_t cnt, int64_t dv, bool one_pass) {
  const int64_t cols = std::min<int64_t>(dv, kPvCols), rows = pv_rows_per_pass(cols);
  const int64_t qk_passes = (cnt + kDirectRows - 1) / kDirectRows;
  const int64_t pv_passes = one_pass ? qk_passes : (cnt + rows - 1) / rows * ((dv + cols - 1) / cols);
  return (nk + 15) / 16 * 8 * qk_passes + (nk + 1) / 2 * pv_passes;
}

// dispatch a compile-time row count 1..kDirectRows
template <typename F>
inline void with_direct_rows(int64_t rg, F&& f) {
  switch (rg) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// head dims the direct paths serve: 32 * DC elements, DC in {1, 2, 4, 8}
inline bool direct_head_dim(int64_t d) { return d == 32 || d == 64 || d == 128 || d == 256; }

template <typename F>
inline void with_chunks(int64_t d, F&& f) {
  switch (d / 32) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// The paced prefetch of the next segment where the hardware prefetchers cannot guess it (a run
// that does not continue the current one, or the pages of a paged cache): its K rows, then its V
// rows, into L2, spread evenly over the `calls` steps of this segment (one per key pair of each
// q . K^T and P . V pass), so that the requests also go out while the softmax and the P . V passes
// that read V back from cache run, instead of in bursts (a burst of prefetches is mostly dropped).
// Until 2026-12-02 GCC 12 had deleted every prefetch of this pacer from the compiled kernels (see
// prefetch.h): the figures measured before then compared kernels without it. With the prefetches
// kept (2-core Zen 4, 32K keys, Hq 32, Hkv 8, D 128, 1 thread, 64-token pages in random order), a
// paged bf16 decode went from 0.49x to 0.72x the time-rate of a contiguous one, an int8 one from
// 0.51x to 0.86x; without the pacer at all, 0.52x.
// step() is forced inline: as a call, it made the compiler spill the 16 P . V accumulators around
// every key pair, which cost little from DRAM but up to 1.2x on data in cache (TopK(16) decode
// at 128K keys: 1.38-1.93x with the inline hook and long runs together).
// After c steps, floor(c * 2 nk / calls) rows have been asked for, counted without a division
// (a 64-bit idiv per key pair of every pass, as first written, sat in the products' loops).
template <typename Rows>
struct Pacer {
  Rows k, v;
  int64_t nk, kbytes, vbytes, calls, credit = 0, done = 0;
  __attribute__((always_inline)) inline void step() {
    credit += 2 * nk;
    for (; credit >= calls && done < 2 * nk; ++done) {
      credit -= std::max<int64_t>(calls, 1);
      if (done < nk) prefetch_lines<2>(k[done], kbytes);
      else prefetch_lines<2>(v[done - nk], vbytes);
    }
  }
};

}  // namespace sparse_attn_cpu
