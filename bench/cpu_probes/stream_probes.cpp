// Memory-stream probes for the CPU decode kernel's questions (docs/kernel_guide.md section 8).
// Not part of the bench suite or the tests: a standalone program, one core, plain C++ and AVX-512 BF16.
//
//   g++ -O2 -march=native bench/cpu_probes/stream_probes.cpp -o /tmp/stream_probes
//   taskset -c 1 /tmp/stream_probes prefetch   # are software prefetches issued at a given rate served?
//   taskset -c 1 /tmp/stream_probes phases     # hardware prefetchers under K/V phases like decode's
//   taskset -c 1 /tmp/stream_probes pv         # a loop shaped like decode_bf16.h's pv_direct
//
// Each probe prints GB/s; compare numbers of one run only (the VM's memory speed drifts).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <initializer_list>

namespace {

double now() {
  timespec a;
  clock_gettime(CLOCK_MONOTONIC, &a);
  return a.tv_sec + a.tv_nsec * 1e-9;
}

__m512bh bh(__m512i x) { return (__m512bh)x; }

void spin(unsigned long n) {  // ~n cycles of dependent decrements
  unsigned long x = n;
  __asm__ volatile("1: dec %0\n jnz 1b" : "+r"(x));
}

long read_back(const char* b, size_t n) {
  __m512i s = _mm512_setzero_si512();
  for (size_t o = 0; o < n; o += 64) s = _mm512_add_epi32(s, _mm512_loadu_si512(b + o));
  return _mm512_reduce_add_epi32(s);
}

// prefetcht1 a 64 KB chunk with `gap` cycles between lines, wait, then time reading it back: a
// read-back at cache speed means the prefetches were served, at DRAM speed that they were dropped
void probe_prefetch(char* b, size_t n) {
  const size_t ch = 65536;
  long s = 0;
  for (unsigned long gap : {0ul, 4ul, 8ul, 16ul, 32ul, 64ul}) {
    double tp = 0, tl = 0;
    int it = 0;
    for (size_t off = ch; off + ch <= n && it < 1500; off += ch, ++it) {
      double t0 = now();
      for (size_t o = 0; o < ch; o += 64) {
        _mm_prefetch(b + off + o, _MM_HINT_T1);
        if (gap) spin(gap);
      }
      tp += now() - t0;
      spin(200000);
      t0 = now();
      s += read_back(b + off, ch);
      tl += now() - t0;
    }
    printf("prefetch gap %3lu: issued at %.1f GB/s, read back at %.1f GB/s\n", gap, it * ch / tp / 1e9, it * ch / tl / 1e9);
  }
  printf("(%ld)\n", s);
}

template <int W>
void eat2(__m512* acc, const char* p) {
  const __m512bh q = bh(_mm512_set1_epi32(0x3f803f80));
  const __m512bh x = bh(_mm512_loadu_si512(p)), y = bh(_mm512_loadu_si512(p + 64));
#pragma GCC unroll 16
  for (int w = 0; w < W; ++w)
    acc[w & 7] = _mm512_dpbf16_ps(acc[w & 7], x, q), acc[8 + (w & 7)] = _mm512_dpbf16_ps(acc[8 + (w & 7)], y, q);
}

// 32 KB of K with WK products per line, 32 KB of V with WV, then IDLE products with no memory access
template <int WK, int WV, int IDLE>
__attribute__((noinline)) float phases(const char* K, const char* V, size_t n) {
  const size_t seg = 32768;
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512bh q = bh(_mm512_set1_epi32(0x3f803f80));
  for (size_t e = 0; e < n; e += seg) {
    for (size_t o = 0; o < seg; o += 128) eat2<WK>(acc, K + e + o);
    for (size_t o = 0; o < seg; o += 128) eat2<WV>(acc, V + e + o);
    for (int i = 0; i < IDLE; i += 16) {
#pragma GCC unroll 16
      for (int w = 0; w < 16; ++w) acc[w] = _mm512_dpbf16_ps(acc[w], q, q);
    }
  }
  __m512 s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

template <int WK, int WV, int IDLE>
void run_phases(const char* name, const char* K, const char* V, size_t n, float& s) {
  double b = 1e9, bb = 1e9;
  for (int r = 0; r < 100; ++r) {
    double t = now();
    s += phases<WK, WV, IDLE>(K, V, 64 << 10);
    b = std::min(b, now() - t);
  }
  for (int r = 0; r < 3; ++r) {
    double t = now();
    s += phases<WK, WV, IDLE>(K, V, n);
    bb = std::min(bb, now() - t);
  }
  printf("%-24s from cache %.1f GB/s, streaming %.1f GB/s\n", name, 2.0 * (64 << 10) / b / 1e9, 2.0 * n / bb / 1e9);
}

// pv_direct's shape: per key pair two 256-byte V rows, vpermt2w into bf16 pairs, RG rows' p pairs broadcast
template <int RG>
__attribute__((noinline)) float pv(const uint16_t* V, size_t nrows, const uint32_t* p) {
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  __m512 acc[RG][8];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (size_t i = 0; i < nrows / 2; ++i) {
    const uint16_t* va = V + 2 * i * 128;
    const uint16_t* vb = va + 128;
    __m512bh pw[RG];
    for (int r = 0; r < RG; ++r) pw[r] = bh(_mm512_set1_epi32(static_cast<int>(p[(i & 63) * 4 + r])));
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i x = _mm512_loadu_si512(va + 32 * c), y = _mm512_loadu_si512(vb + 32 * c);
      const __m512bh lo = bh(_mm512_permutex2var_epi16(x, lo_idx, y)), hi = bh(_mm512_permutex2var_epi16(x, hi_idx, y));
      for (int r = 0; r < RG; ++r)
        acc[r][2 * c] = _mm512_dpbf16_ps(acc[r][2 * c], pw[r], lo), acc[r][2 * c + 1] = _mm512_dpbf16_ps(acc[r][2 * c + 1], pw[r], hi);
    }
  }
  __m512 s = _mm512_setzero_ps();
  for (auto& row : acc)
    for (auto& a : row) s = _mm512_add_ps(s, a);
  return _mm512_reduce_add_ps(s);
}

template <int RG>
void run_pv(const uint16_t* V, size_t nrows, const uint32_t* p, float& s) {
  double b = 1e9, bb = 1e9;
  for (int r = 0; r < 200; ++r) {
    double t = now();
    s += pv<RG>(V, 256, p);
    b = std::min(b, now() - t);
  }
  for (int r = 0; r < 3; ++r) {
    double t = now();
    s += pv<RG>(V, nrows, p);
    bb = std::min(bb, now() - t);
  }
  printf("pv, %d query rows: from cache %.1f GB/s, streaming %.1f GB/s\n", RG, 256.0 * 256 / b / 1e9, nrows * 256.0 / bb / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  const char* which = argc > 1 ? argv[1] : "";
  const size_t n = size_t(512) << 20;
  char* a = static_cast<char*>(aligned_alloc(2 << 20, n));
  char* b = static_cast<char*>(aligned_alloc(2 << 20, n));
  memset(a, 1, n), memset(b, 1, n);
  float s = 0;
  if (!strcmp(which, "prefetch")) {
    probe_prefetch(a, n);
  } else if (!strcmp(which, "phases")) {
    run_phases<8, 8, 0>("K 8, V 8", a, b, n / 2, s);
    run_phases<8, 4, 2048>("K 8, V 4, idle 2048", a, b, n / 2, s);
    run_phases<4, 4, 4096>("K 4, V 4, idle 4096", a, b, n / 2, s);
  } else if (!strcmp(which, "pv")) {
    uint32_t p[256];
    for (int i = 0; i < 256; ++i) p[i] = 0x3f803f80u + i;
    run_pv<1>(reinterpret_cast<const uint16_t*>(a), n / 256, p, s);
    run_pv<2>(reinterpret_cast<const uint16_t*>(a), n / 256, p, s);
  } else {
    fprintf(stderr, "usage: %s prefetch|phases|pv\n", argv[0]);
    return 2;
  }
  printf("(checksum %g)\n", s);
  return 0;
}
