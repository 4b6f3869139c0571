// Where the decode kernel finds key j's K and V rows: a strided tensor (B, Hkv, S, D) or the pages
// of a paged cache (P, Hkv, page_size, D) through a page table. Every product is a template over
// the row type, instantiated for both, with the same arithmetic: a paged cache gives the same bits
// as a contiguous one. What differs is only how rows are found and prefetched.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/decode_plan.h"
#include "cpu/prefetch.h"

namespace sparse_attn_decode {

// rows `stride` elements apart from base
template <typename T>
struct StridedRows {
  const T* base;
  int64_t stride;
  const T* operator[](int64_t j) const { return base + j * stride; }
  StridedRows operator+(int64_t j) const { return {base + j * stride, stride}; }
};

// rows anywhere, by an address table (a segment of a paged cache, filled by locate_rows)
template <typename T>
struct TableRows {
  const T* const* p;
  const T* operator[](int64_t j) const { return p[j]; }
  TableRows operator+(int64_t j) const { return {p + j}; }
};

// kr[j], vr[j]: where key sg.j0 + j of sequence b, kv head h lives in the pages K, V, for
// j < sg.nk (a segment may cross pages)
template <typename T>
inline void locate_rows(const Params& P, const T* K, const T* V, const Seg& sg, int64_t b, int64_t h, const T** kr,
                        const T** vr) {
  const int64_t nk = sg.nk, j0 = sg.j0, ps = P.page_size;
  const int32_t* row = P.table + b * P.tst0;
  for (int64_t j = 0; j < nk;) {
    const int64_t a = j0 + j, off = a % ps, n = std::min(nk - j, ps - off);
    const int64_t page = row[(a / ps) * P.tst1];
    const T* k = K + page * P.kst[0] + h * P.kst[1] + off * P.kst[2];
    const T* v = V + page * P.vst[0] + h * P.vst[1] + off * P.vst[2];
    for (int64_t i = 0; i < n; ++i, ++j) kr[j] = k + i * P.kst[2], vr[j] = v + i * P.vst[2];
  }
}

// Pages sit anywhere in the pool: the hardware prefetchers cannot guess where the keys go on, and
// every page costs a TLB walk. The kernel touches one line per 4 KB of K and V of the segment two
// ahead (a strided tensor streams by itself). Measured: paged / contiguous time ~1.14 -> ~1.08
// (64-token pages in random order); prefetching whole segments ahead was slower.
// (K as columns, decode_kcols.h: a key's share of its block, D x kcol / page_size elements)
template <typename T>
inline void touch_pages(const Params& P, const T* K, const T* V, const Seg& sg, int64_t b, int64_t h) {
  const int64_t kstep = P.kcol ? P.D * P.kcol / P.page_size : P.kst[2];  // K elements per key
  const int64_t step = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, kstep * (int64_t)sizeof(T)));
  const int32_t* row = P.table + b * P.tst0;
  for (int64_t j = 0; j < sg.nk; j += step) {
    const int64_t a = sg.j0 + j, page = row[(a / P.page_size) * P.tst1], off = a % P.page_size;
    sparse_attn_cpu::prefetch_line<2>(K + page * P.kst[0] + h * P.kst[1] + off * kstep);
    sparse_attn_cpu::prefetch_line<2>(V + page * P.vst[0] + h * P.vst[1] + off * P.vst[2]);
  }
}

// whether a paged cache keeps each page's K and V rows of a head in one block (vLLM's CPU layout,
// (pages, Hkv, 2 x page_size, D) split in halves: the V rows right after the K rows) rather than in
// two pools. Split::paged_runs reads the first kind as runs; in two pools the runs measured slower
// than the paced segments (decode.cpp, docs/kernel_guide.md 8a).
template <typename T>
inline bool kv_share_pages(const Params& P, const T* K, const T* V) {
  if (!P.table || P.kst[0] != P.vst[0] || P.kst[1] != P.vst[1]) return false;
  // bytes from page 0's K rows to its V rows (as integers: the two views may be two allocations)
  const auto k = reinterpret_cast<std::uintptr_t>(K), v = reinterpret_cast<std::uintptr_t>(V);
  return v > k && v - k < static_cast<std::uintptr_t>(P.kst[1]) * sizeof(T);
}

// every cache line of rows [0, nk) of `n` elements of T
template <typename T, int Locality = 3, typename Rows>
inline void prefetch_rows(Rows r, int64_t nk, int64_t n) {
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t c = 0; c < n * (int64_t)sizeof(T); c += 64)
      sparse_attn_cpu::prefetch_line<Locality>(reinterpret_cast<const char*>(r[j]) + c);
}

}  // namespace sparse_attn_decode
