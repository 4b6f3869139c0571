// Whether a decode call's K/V are probably still in the last-level cache: the float32 decode
// products ask for the rows ahead of use (the next segment's K, this segment's V, the pages two
// segments ahead), which is what a cache read from DRAM needs, and what costs when the rows are in
// L3 anyway: those prefetches then occupy the core's miss buffers without hiding anything.
// Measured on one Zen 4 core (32 MB L3), paged float32 cache, Hq 4, Hkv 2, D 64, the kernel alone:
//   one cache read over and over (4 MB at 4096 keys): 98.7 us with the prefetches, 85.0 without;
//   12 caches read in turn (48 MB): 243 us with them, 330 without.
// So the kernel keeps a reuse clock: the bytes of K/V every decode call read, process-wide, and per
// cache (its K's address) the clock when it was last read. A cache read again before `budget`
// bytes (half the last-level cache) went by since is warm: no prefetches. Unknown caches, long
// gaps and an unknown cache size are cold (prefetch: the safe side, ~15% slower at worst where the
// rows were cached, against ~35% where they were not). Only where memory is touched changes, never
// the arithmetic: the bits are the same either way (tests/test_cpu_decode_held.py).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <mutex>

namespace sparse_attn_decode {

// the last-level cache's size in bytes (0: unknown): sysfs's index3 (one L3 as the kernel sees
// it: "32768K" on this Zen 4 VM, where sysconf(_SC_LEVEL3_CACHE_SIZE) says 320 MB, the socket's
// ten of them), else sysconf
inline int64_t llc_bytes() {
  static const int64_t n = [] {
    int64_t b = 0;
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long v = 0;
      char unit = 0;
      if (std::fscanf(f, "%ld%c", &v, &unit) >= 1) b = int64_t(v) * (unit == 'M' ? 1 << 20 : unit == 'K' ? 1024 : 1);
      std::fclose(f);
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (b <= 0) b = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return b > 0 ? b : 0;
  }();
  return n;
}

class ReuseClock {
 public:
  // a call that reads `bytes` of the cache whose K starts at `key`: whether that cache was read
  // less than `budget` bytes ago (then its rows are probably still cached); then advances the clock
  bool warm(const void* key, uint64_t bytes, uint64_t budget) {
    std::lock_guard<std::mutex> g(mu_);
    Entry* e = nullptr;
    Entry* oldest = &t_[0];
    for (Entry& x : t_) {
      if (x.key == key) e = &x;
      if (x.stamp < oldest->stamp) oldest = &x;
    }
    const bool w = e && budget > 0 && now_ - e->stamp + bytes <= budget;
    now_ += bytes;
    if (!e) e = oldest, e->key = key;
    e->stamp = now_;
    return w;
  }

 private:
  struct Entry {
    const void* key = nullptr;
    uint64_t stamp = 0;
  };
  std::mutex mu_;
  uint64_t now_ = 0;
  Entry t_[64];  // the caches of 64 layers at most are remembered (the least recent one goes)
};

inline ReuseClock& reuse_clock() {
  static ReuseClock c;
  return c;
}

}  // namespace sparse_attn_decode
