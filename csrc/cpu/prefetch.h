// Software prefetch that the compiler keeps.
//
// GCC 12 (-O1 and up) deletes `__builtin_prefetch` in some inlined loops: in decode_direct.h's
// Pacer::step, for one, not a single prefetch instruction was left in the compiled decode kernels
// (the loop over a row's lines, guarded by `done < nk`, was removed as having no effect; a lone
// prefetch in a simple loop survives, which is why it went unnoticed). An `asm volatile`
// instruction cannot be deleted or moved across other volatile asm, so every prefetch of the CPU
// kernels goes through prefetch_line() below. (To see what a build kept:
// `objdump -d <extension>.so | grep -c prefetch`.)
#pragma once

#include <cstdint>

namespace sparse_attn_cpu {

// the cache line holding p, for reading: Locality 3 into L1 (and below), 2 into L2, 1 into L3,
// 0 non-temporal (the meaning of __builtin_prefetch's third argument)
template <int Locality = 2>
__attribute__((always_inline)) inline void prefetch_line(const void* p) {
  static_assert(Locality >= 0 && Locality <= 3, "Locality is 0..3");
#if defined(__x86_64__) || defined(__i386__)
  const char& line = *static_cast<const char*>(p);
  if constexpr (Locality == 3) {
    asm volatile("prefetcht0 %0" : : "m"(line));
  } else if constexpr (Locality == 2) {
    asm volatile("prefetcht1 %0" : : "m"(line));
  } else if constexpr (Locality == 1) {
    asm volatile("prefetcht2 %0" : : "m"(line));
  } else {
    asm volatile("prefetchnta %0" : : "m"(line));
  }
#elif defined(__aarch64__)
  if constexpr (Locality == 3) {
    asm volatile("prfm pldl1keep, [%0]" : : "r"(p));
  } else if constexpr (Locality == 2) {
    asm volatile("prfm pldl2keep, [%0]" : : "r"(p));
  } else if constexpr (Locality == 1) {
    asm volatile("prfm pldl3keep, [%0]" : : "r"(p));
  } else {
    asm volatile("prfm pldl1strm, [%0]" : : "r"(p));
  }
#else
  __builtin_prefetch(p, 0, Locality);
#endif
}

// every cache line of the `bytes` bytes at p (the CPU kernels ask for L2, Locality 2: into L1 was no
// faster, as one core's L1 misses in flight cap it; a read micro-benchmark gave 11 GB/s with t0, 17-19 with t1)
template <int Locality = 2>
__attribute__((always_inline)) inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) prefetch_line<Locality>(static_cast<const char*>(p) + c);
}

}  // namespace sparse_attn_cpu
