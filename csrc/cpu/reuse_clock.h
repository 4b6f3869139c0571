// Whether a decode call's K/V are probably still in the last-level cache: the decode products
// ask for the rows ahead of use (the next segment's K, this segment's V, the pages two
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
// The bytes count only decode calls. A model's step also reads its weights (GBs: every layer's
// cache is evicted between two steps, whatever its K/V bytes), so a cache is warm only while the
// time since its last read ended is short too: under `budget` / kFlushBytesPerNs, the time other
// work needs to stream `budget` bytes through the cache (0.5 ms for 16 MB). One layer's cache read
// back to back stays warm; a model's layers of a short context (K/V under half the L3, weights
// beyond it) are cold again. Measured on one Zen 4 core, 12 paged float32 caches of 1024 keys
// (Hq 4, Hkv 2, D 64) read in turn with 64 MB of other reads between calls: ~12-15% faster per
// call with the prefetches (median 161-169 against 189-193 us; each call waits on DRAM and TLB
// walks), which the clock now keeps.
// The bf16 / fp16 products (pacer, page touch, V rows ahead) follow the same clock with the budget
// capped at 8 MB: they read fast enough that a page walk per 4 KB shows, and past ~2048 pages (a
// second-level TLB's reach) a cache judged warm by L3/2 ran 2x slower without the prefetches'
// walks (`PagedKVCache` bf16, Hq 32, Hkv 8, D 128, 12-16 MB). Within 8 MB, one thread, warm: bf16
// tiny shape (Hq 4, Hkv 2, D 64) 1024 / 4096 / 16384 keys 20.4 / 75.3 / 363 -> 15.6 / 57.5 / 239 us;
// Hq 32, Hkv 8, D 128 paged, 1024 / 2048 keys 238 / 470 -> 196 / 379 us (medians). Quantized caches keep
// their prefetches (no gain measured).
#pragma once

#include <unistd.h>

#include <chrono>
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
  // less than `budget` bytes ago, and that read ended (`done`) less than budget / kFlushBytesPerNs
  // ns ago (then its rows are probably still cached); then advances the clock
  bool warm(const void* key, uint64_t bytes, uint64_t budget) {
    const int64_t t = now_ns();
    std::lock_guard<std::mutex> g(mu_);
    Entry* e = find(key);
    Entry* oldest = &t_[0];
    for (Entry& x : t_)
      if (x.stamp < oldest->stamp) oldest = &x;
    const bool w = e && budget > 0 && now_ - e->stamp + bytes <= budget && e->end_ns > 0 &&
                   double(t - e->end_ns) * kFlushBytesPerNs <= double(budget);
    now_ += bytes;
    if (!e) e = oldest, e->key = key;
    e->stamp = now_;
    e->end_ns = 0;  // being read: not warm by time until done()
    return w;
  }
  // the read of the cache whose K starts at `key` ended now
  void done(const void* key) {
    const int64_t t = now_ns();
    std::lock_guard<std::mutex> g(mu_);
    if (Entry* e = find(key)) e->end_ns = t;
  }

  // bytes per ns other work may stream through the last-level cache (one core's DRAM read rate,
  // ~30 GB/s here): the time after which a cache counts as flushed
  static constexpr double kFlushBytesPerNs = 32.0;

 private:
  struct Entry {
    const void* key = nullptr;
    uint64_t stamp = 0;
    int64_t end_ns = 0;  // when its last read ended (0: unknown or being read)
  };
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  Entry* find(const void* key) {
    for (Entry& x : t_)
      if (x.key == key) return &x;
    return nullptr;
  }
  std::mutex mu_;
  uint64_t now_ = 0;
  Entry t_[64];  // the caches of 64 layers at most are remembered (the least recent one goes)
};

inline ReuseClock& reuse_clock() {
  static ReuseClock c;
  return c;
}

}  // namespace sparse_attn_decode
