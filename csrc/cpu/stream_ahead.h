// Software prefetch along a run of K / V rows (a contiguous cache's, or a paged run's through its
// padded row table: decode.cpp's Split::paged_runs): while the products read keys j, j + 1, ask for
// the rows `dist` keys further on (into L2), where dist = stream_ahead_bytes() / row bytes.
//
// decode_plan.h's long runs (up to kRunKeys consecutive keys of a strided cache) were left to the
// hardware prefetchers: on a 2-core Zen 4 they follow a run by themselves, faster than software
// prefetches. On a 2-core Sapphire Rapids VM (2026-12-03) they do not keep up once the cache is in
// DRAM (there one thread's plain read, a sum over 256 MB, streams ~16 GB/s, 27-29 GB/s from L3):
// with rows asked for ahead, Dense decode at 128K keys (B 1, Hq 32, Hkv 8, D 128, the same process
// on / off, `python bench/cpu_decode_ab.py`) went, 2 threads, bf16 on AMX tiles 29.8 -> 21.9 ms, bf16
// on vdpbf16ps 30.4 -> 28.0, an int8 cache 17.7 -> 12.8, fp8 33.2 -> 30.2; one thread, bf16 on tiles
// 64.3 -> 43.0, int8 31.2 -> 26.5; at 16K keys (in L3), one thread, bf16 1.21x, int8 1.03x; at
// 1K-4K keys 0.97-1.01x. Distances of 32 to 512 int8 keys measured alike (docs/kernel_guide.md 8a).
// So the default follows the measurements: 8 KB ahead on Intel CPUs, off elsewhere (the Zen 4
// measurements, decode_plan.h); SPARSE_ATTN_CPU_STREAM_AHEAD=<bytes> (0: off) or the extension's
// set_stream_ahead() overrides it. Only where memory is touched changes, never the arithmetic.
// Like every prefetch of the kernels it follows the reuse clock (reuse_clock.h): a cache judged
// still cached gets none.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "cpu/prefetch.h"

namespace sparse_attn_cpu {

constexpr int64_t kStreamAheadIntel = 8192;  // bytes of a row stream asked for ahead by default

// the default by CPU vendor (see above)
inline int64_t default_stream_ahead() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d)) {
    char v[13] = {};
    std::memcpy(v, &b, 4), std::memcpy(v + 4, &d, 4), std::memcpy(v + 8, &c, 4);
    if (std::strcmp(v, "GenuineIntel") == 0) return kStreamAheadIntel;
  }
#endif
  return 0;
}

// bytes ahead (0: off): the environment's SPARSE_ATTN_CPU_STREAM_AHEAD if set to a whole number >= 0,
// else the default (a value that is not one is named on stderr, not silently read as 0);
// set_stream_ahead() changes it for the process (A/B runs, tests)
inline std::atomic<int64_t>& stream_ahead_bytes() {
  static std::atomic<int64_t> n{[] {
    const char* e = std::getenv("SPARSE_ATTN_CPU_STREAM_AHEAD");
    if (e == nullptr || *e == '\0') return default_stream_ahead();
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (*end != '\0' || v < 0) {
      std::fprintf(stderr, "sparse_attn: SPARSE_ATTN_CPU_STREAM_AHEAD must be a whole number of bytes >= 0, got '%s'; "
                   "using the default (%lld)\n", e, static_cast<long long>(default_stream_ahead()));
      return default_stream_ahead();
    }
    return static_cast<int64_t>(v);
  }()};
  return n;
}

// how many rows of row_bytes each the stream runs ahead, for `ahead` bytes (0: off)
inline int64_t stream_rows(int64_t ahead, int64_t row_bytes) {
  return ahead > 0 ? std::max<int64_t>(2, ahead / std::max<int64_t>(row_bytes, 1)) : 0;
}

// rows of a run: operator()(j), called as keys j, j + 1 are read, asks for rows j + dist and
// j + dist + 1, dist = stream_rows(ahead, row_bytes) (`ahead`: stream_ahead_bytes() as the call
// read it once, so every Streamer of one call agrees with the row tables it sized). Row addresses
// past the run's end are computed, never loaded (a prefetch of any address is harmless), so Rows
// must give an address for every index up to the run's keys rounded up to 16, plus dist + 1:
// StridedRows, or a paged run's row table padded with the rows that follow (Split::paged_runs).
template <typename Rows>
struct Streamer {
  Rows rows;
  int64_t bytes = 0, dist = 0;
  Streamer(Rows r, int64_t row_bytes, int64_t ahead) : rows(r), bytes(row_bytes), dist(stream_rows(ahead, row_bytes)) {}
  __attribute__((always_inline)) inline void operator()(int64_t j) const {
    prefetch_lines<2>(rows[j + dist], bytes);
    prefetch_lines<2>(rows[j + dist + 1], bytes);
  }
};

}  // namespace sparse_attn_cpu
