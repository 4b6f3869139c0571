// Split-KV ("flash-decoding") attention forward on the CPU for a few query rows (Sq <= 16).
//
// Decode is memory-bound: the whole cost is reading the visited K/V once. So:
// * per (batch, kv head) the visited keys are cut into segments of <= kSeg = 128 keys (the union
//   over the Sq rows; each segment carries a bit mask of the rows that visit it), and the list is
//   split across threads (on the direct bf16 path over a strided tensor, consecutive segments are
//   then read as runs of up to kRunKeys keys, with the same arithmetic); every split computes a partial (out, max, sum) for ALL the rows it
//   serves (the G query heads of the group x the Sq tokens), so each K/V byte is read once, then
//   the splits are merged by log-sum-exp;
// * K/V are read in their dtype (bf16 / fp16 / fp32) and converted in registers, 8 floats at a
//   time (GNU vector types; a plain-array fallback elsewhere); float32 accumulation;
// * scores: q . k as dot products vectorised over the head dim, for a tile of rows x keys at once
//   (register-blocked), reduced with a horizontal-add tree (AVX) or lane sums (portable);
//   softmax in base 2 (q pre-scaled by scale * log2 e), online across segments;
// * out += p . V: accumulators of 16 output columns x the tile's rows stay in registers while the
//   segment's keys stream by;
// * bfloat16 on AVX-512 BF16: vdpbf16ps products (P rounded to bf16, float32 sums), about 3x
//   fewer instructions per key than the float32 dot products, which left one core at ~5 GB/s.
//   Head dims 32/64/128/256 multiply straight from the K/V rows (decode_bf16.h: no packing; one
//   core computes ~24 GB/s of K/V from cache, 1.5x the packed path); other head dims pack each
//   segment's K (16 x 16 word transposes) and V (pair interleave) for vec_bf16.h's micro-kernel,
//   with K/V prefetched two segments ahead.
// Which keys a row visits: the token rule (causal, window, sinks) and a block filter: none
// (Dense, SlidingWindow), a BlockSparse layout (read in place, broadcast batch / heads allowed) or
// TopK (forced sink / local blocks + the per-token selection `token_index`). Rows that see no key
// output 0 with lse = +inf. Nothing of size Sq x Sk is allocated; scratch is O(rows x (D + 64)).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/target_check.h"
#include "cpu/scalar.h"
#include "cpu/vec_bf16.h"    // SPARSE_ATTN_BF16_DOT: bfloat16 products with vdpbf16ps
#include "cpu/decode_bf16.h"  // ... straight from the K/V rows

#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace sparse_attn_decode {
namespace {

// scalar helpers: scalar.h
using sparse_attn_scalar::bits_to_float;
using sparse_attn_scalar::exp2_poly;
using sparse_attn_scalar::exp2_scalar;
using sparse_attn_scalar::float_to_bits;
using sparse_attn_scalar::half_bits_to_float;
using sparse_attn_scalar::kMagic;
using sparse_attn_cpu::round_up;
#ifdef SPARSE_ATTN_BF16_DOT
using sparse_attn_cpu::copy_words;
using sparse_attn_cpu::floats_to_bf16_pairs;
using sparse_attn_cpu::gemm_bf16;
using sparse_attn_cpu::interleave_bf16_rows;
using sparse_attn_cpu::pack_k_pairs_rows;
using sparse_attn_cpu::direct_head_dim;
using sparse_attn_cpu::kDirectRows;
using sparse_attn_cpu::kPvAccVectors;
using sparse_attn_cpu::kPvCols;
using sparse_attn_cpu::pv_rows_per_pass;
using sparse_attn_cpu::prefetch_line_run;
using sparse_attn_cpu::pv_direct;
using sparse_attn_cpu::qk_direct;
using sparse_attn_cpu::with_chunks;
using sparse_attn_cpu::with_direct_rows;
#endif

// dtype tags: 0 float32, 1 bfloat16, 2 float16 (both 16-bit types as raw bits)
template <int DT>
struct Elem {
  using T = uint16_t;
  static float get(const T* p, int64_t i) {
    return DT == 1 ? bits_to_float(uint32_t(p[i]) << 16) : half_bits_to_float(p[i]);
  }
};
template <>
struct Elem<0> {
  using T = float;
  static float get(const T* p, int64_t i) { return p[i]; }
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#ifdef SPARSE_ATTN_BF16_DOT
// The direct bf16 path's prefetch of the next segment where the hardware prefetchers cannot
// guess it (a run that does not continue the current one, or the pages of a paged cache): its K
// rows, then its V rows, into L2 (prefetcht1), spread evenly over the `calls` steps of this
// segment (one per key pair of each q . K^T and P . V pass), so that the requests also go out
// while the softmax and the P . V passes that read V back from cache run, instead of in bursts
// (a burst of prefetches is mostly dropped). Measured with 128-key segments (Sk = 131072, G = 4,
// D = 128, bf16, medians of 30-80 alternating calls in one process): 1.02-1.05x the previous
// unpaced prefetch; prefetcht0 or prefetchnta in place of prefetcht1 0.8x; two segments ahead
// no better than one. step() is forced inline: as a call, it made the compiler spill the 16 P . V
// accumulators around every key pair, which cost little from DRAM but up to 1.2x on data in
// cache (TopK(16) decode at 128K keys: 1.38-1.93x with the inline hook and long runs together).
template <typename Rows>
struct Pacer {
  Rows k, v;
  int64_t nk, kbytes, vbytes, calls, call = 0, done = 0;
  __attribute__((always_inline)) inline void step() {
    const int64_t want = ++call * 2 * nk / std::max<int64_t>(calls, 1);
    for (; done < want && done < 2 * nk; ++done) {
      if (done < nk) prefetch_line_run(k[done], kbytes);
      else prefetch_line_run(v[done - nk], vbytes);
    }
  }
};
#endif

// keys per segment (scores scratch: rows x kSeg). 128 rather than 64: the per-segment work (row
// setup, softmax bookkeeping, the products' prologues) took ~12% less of the bf16 direct path's
// compute from cache (one Zen 4 core, Hkv=8, D=128, G=4)
constexpr int64_t kSeg = 128;
// On the direct bf16 path over a strided tensor, consecutive segments (next keys, same rows) are
// read as one run of up to long_run_keys <= kRunKeys keys: q . K^T over the run, then P . V over
// it, while the softmax and the accumulators' rescaling still go segment by segment, so the
// result is bit-identical to the segments one by one (and to a paged cache, which keeps 128-key
// segments and the paced prefetch: with 2048-key runs it measured 0.79-0.97x under every prefetch
// scheme tried, as a run and its prefetched successor overflow L2). A run's continuation is not
// prefetched by software: the hardware prefetchers follow a long run of demand misses, while one
// core's software prefetches top out near 15 GB/s (probably its L1 miss buffers), where the
// hardware prefetchers reach ~29 (torch.sum over 512 MB: 57-59 GB/s on 2 threads in the VM's fast
// phase). Measured (Sk = 131072, G = 4, D = 128, 2 threads, alternating calls in one process,
// the phase told by a torch.sum between calls): 2048-key runs 1.10-1.13x the paced 128-key
// segments when the sum reads > 42 GB/s, 1.01-1.04x when it reads ~35; 1024-key runs
// 1.09-1.10x / 1.00-1.02x; 2048-key runs with the paced prefetch kept 1.00x; P . V in 32-128-key
// blocks (both row passes over a block while in L1) 0.86-0.93x: pauses in the V stream stall the
// hardware prefetchers.
constexpr int64_t kRunKeys = 2048;
constexpr int64_t kRunScratchFloats = 16384;  // rows x run keys of scores at most (64 KB)
constexpr int64_t kMinSegs = 4;      // a split reads at least ~512 keys: the merge stays negligible
constexpr int64_t kMaxSplits = 256;  // per (batch, kv head)
constexpr int kRT = 4;               // rows per register tile
constexpr int64_t kPrefetchAhead = 2;

// ------------------------------------------------------------------------------ 8-float vectors
#if (defined(__GNUC__) || defined(__clang__)) && !defined(SPARSE_ATTN_NO_VECTOR_TYPES)
#define DECODE_VECTOR_TYPES 1
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));
inline f8 vload(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
inline f8 vsplat(float x) { return f8{} + x; }
inline f8 vzero() { return f8{}; }
inline f8 vmax(f8 a, f8 b) { return a > b ? a : b; }
inline float lane(const f8& v, int i) { return v[i]; }
inline f8 vexp2(f8 x) {  // exp2_scalar, 8 lanes
  x = x < vsplat(-127.0f) ? vsplat(-127.0f) : x;
  const f8 t = x + kMagic;
  const f8 n = t - kMagic;
  const f8 f = x - n;
  const i8 e = ((i8)t - (i8)vsplat(kMagic)) + 127;
  return exp2_poly(f) * (f8)(e << 23);
}
#else
struct f8 {
  float x[8];
  f8& operator+=(const f8& o) {
    for (int i = 0; i < 8; ++i) x[i] += o.x[i];
    return *this;
  }
};
inline f8 operator+(f8 a, const f8& b) { return a += b; }
inline f8 operator-(f8 a, const f8& b) {
  for (int i = 0; i < 8; ++i) a.x[i] -= b.x[i];
  return a;
}
inline f8 operator*(f8 a, const f8& b) {
  for (int i = 0; i < 8; ++i) a.x[i] *= b.x[i];
  return a;
}
inline f8 vload(const float* p) {
  f8 v;
  std::memcpy(v.x, p, sizeof(v.x));
  return v;
}
inline void vstore(float* p, f8 v) { std::memcpy(p, v.x, sizeof(v.x)); }
inline f8 vsplat(float x) {
  f8 v;
  for (int i = 0; i < 8; ++i) v.x[i] = x;
  return v;
}
inline f8 vzero() { return vsplat(0.f); }
inline f8 vmax(f8 a, const f8& b) {
  for (int i = 0; i < 8; ++i) a.x[i] = std::max(a.x[i], b.x[i]);
  return a;
}
inline float lane(const f8& v, int i) { return v.x[i]; }
inline f8 vexp2(f8 v) {
  for (int i = 0; i < 8; ++i) v.x[i] = exp2_scalar(v.x[i]);
  return v;
}
#endif

// 8 elements of dtype DT (0 float32, 1 bfloat16, 2 float16) -> float32, in registers
template <int DT>
inline f8 load8(const typename Elem<DT>::T* p);
template <>
inline f8 load8<0>(const float* p) {
  return vload(p);
}
template <>
inline f8 load8<1>(const uint16_t* p) {
#ifdef DECODE_VECTOR_TYPES
  h8 h;
  std::memcpy(&h, p, sizeof(h));
  return (f8)(__builtin_convertvector(h, i8) << 16);
#else
  f8 v;
  for (int i = 0; i < 8; ++i) v.x[i] = bits_to_float(uint32_t(p[i]) << 16);
  return v;
#endif
}
template <>
inline f8 load8<2>(const uint16_t* p) {
#if defined(__F16C__) && defined(DECODE_VECTOR_TYPES)
  return (f8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = half_bits_to_float(p[i]);
  return vload(t);
#endif
}

// out[i] = sum of the lanes of v[i], i < 8
inline void hsum8(const f8* v, float* out) {
#if defined(__AVX__) && defined(DECODE_VECTOR_TYPES)
  const __m256 t0 = _mm256_hadd_ps((__m256)v[0], (__m256)v[1]);
  const __m256 t1 = _mm256_hadd_ps((__m256)v[2], (__m256)v[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)v[4], (__m256)v[5]);
  const __m256 t3 = _mm256_hadd_ps((__m256)v[6], (__m256)v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // [v0..v3 low halves | v0..v3 high halves]
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out, r);
#else
  for (int i = 0; i < 8; ++i) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += lane(v[i], l);
    out[i] = s;
  }
#endif
}

// ------------------------------------------------------------------------------------- problem
struct Seg {
  int64_t j0;
  int32_t nk;
  uint32_t rows;  // bit t: token row t visits the segment
};

struct Params {
  int64_t B, Hq, Hkv, G, sq, sk, D, Dv, Dpad, R;
  int64_t qst[4], kst[3], vst[3];
  bool causal;
  int64_t window, sinks;  // window < 0: none
  float qmul;             // scale * log2(e)
  int mode;               // 0: no block filter, 1: BlockSparse layout, 2: TopK
  int64_t unit;           // block size of the filter (mode 0: kSeg)
  const bool* lay;
  int64_t lst[4], lb, lh;
  const int32_t* ti;
  int64_t topk, sink_blocks, local_blocks;
  // per-sequence lengths (nullptr: every sequence holds sk keys) and the page table (nullptr:
  // K/V are (B, Hkv, sk, D); else pages (P, Hkv, page_size, D) and key j of sequence b lives at
  // page table[b * tst0 + (j / page_size) * tst1], row j % page_size)
  const int32_t* lens;
  const int32_t* table;
  int64_t tst0, tst1, page_size;

  int64_t len(int64_t b) const { return lens ? lens[b] : sk; }
};

// keys [lo, hi) and the sinks [0, s) visible to token row t by the token rule
struct RowRange {
  int64_t lo, hi, s;
};

inline RowRange row_range(const Params& P, int64_t skb, int64_t t) {
  const int64_t p = skb - P.sq + t;
  RowRange r;
  r.hi = P.causal ? std::min(p + 1, skb) : skb;
  r.hi = std::max<int64_t>(r.hi, 0);
  r.lo = P.window >= 0 ? std::max<int64_t>(0, p - P.window + 1) : 0;
  r.lo = std::min(r.lo, r.hi);
  r.s = P.window >= 0 ? std::min(P.sinks, r.lo) : 0;  // sinks below the window only
  return r;
}

// the visited segments of (b, h), ascending
void build_segments(const Params& P, int64_t b, int64_t h, std::vector<uint32_t>& mask, std::vector<Seg>& out) {
  out.clear();
  const int64_t skb = P.len(b), U = P.unit, nb = (skb + U - 1) / U;
  mask.assign(nb, 0u);
  for (int64_t t = 0; t < P.sq; ++t) {
    const RowRange r = row_range(P, skb, t);
    const uint32_t bit = 1u << t;
    auto mark_range = [&](int64_t a, int64_t z, auto&& ok) {  // blocks meeting keys [a, z)
      if (a >= z) return;
      for (int64_t n = a / U; n <= (z - 1) / U; ++n)
        if (ok(n)) mask[n] |= bit;
    };
    const int64_t p = skb - P.sq + t;
    if (P.mode == 0) {
      auto all = [](int64_t) { return true; };
      mark_range(r.lo, r.hi, all);
      mark_range(0, r.s, all);
    } else if (P.mode == 1) {
      if (p < 0) continue;
      const bool* row = P.lay + (P.lb == 1 ? 0 : b) * P.lst[0] + (P.lh == 1 ? 0 : h) * P.lst[1] + (p / U) * P.lst[2];
      auto in_layout = [&](int64_t n) { return row[n * P.lst[3]]; };
      mark_range(r.lo, r.hi, in_layout);
      mark_range(0, r.s, in_layout);
    } else {
      if (p < 0) continue;
      const int64_t pb = p / U;
      auto in_range = [&](int64_t n) {  // the block holds a key the token rule shows
        const int64_t a = n * U, z = std::min(skb, a + U);
        return (a < r.hi && z > r.lo) || a < r.s;
      };
      for (int64_t n = 0; n < std::min(P.sink_blocks, nb); ++n)
        if (n <= pb && in_range(n)) mask[n] |= bit;
      for (int64_t n = std::max<int64_t>(0, pb - P.local_blocks + 1); n <= std::min(pb, nb - 1); ++n)
        if (in_range(n)) mask[n] |= bit;
      const int32_t* sel = P.ti + ((b * P.Hkv + h) * P.sq + t) * P.topk;
      for (int64_t e = 0; e < P.topk; ++e) {
        const int64_t n = sel[e];
        if (n >= 0 && n < nb && n <= pb && in_range(n)) mask[n] |= bit;
      }
    }
  }
  // keys some row may see by the token rule: the sinks [0, s) and the windows' union [lo, hi)
  // (consecutive rows' windows overlap). Blocks are clipped to them, so no key that no row sees
  // is ever read: a released page (its table entry points at the trash page, which holds the
  // padding rows of ragged appends, any bits) never enters a sum, not even with weight 0.
  int64_t lo = skb, hi = 0, s = 0;
  for (int64_t t = 0; t < P.sq; ++t) {
    const RowRange r = row_range(P, skb, t);
    if (r.lo < r.hi) lo = std::min(lo, r.lo), hi = std::max(hi, r.hi);
    s = std::max(s, r.s);
  }
  int64_t iv[2][2] = {{0, s}, {lo, hi}};
  int niv = 0;
  if (s > 0 && lo <= s) {
    iv[0][1] = std::max(s, hi), niv = 1;
  } else if (s > 0) {
    niv = 2;
  } else {
    iv[0][0] = lo, iv[0][1] = hi, niv = 1;
  }
  for (int64_t n = 0; n < nb; ++n) {
    if (!mask[n]) continue;
    for (int i = 0; i < niv; ++i) {
      const int64_t a = std::max(n * U, iv[i][0]), z = std::min({skb, (n + 1) * U, iv[i][1]});
      for (int64_t j = a; j < z; j += kSeg)
        out.push_back(Seg{j, static_cast<int32_t>(std::min(kSeg, z - j)), mask[n]});
    }
  }
}

// ------------------------------------------------------------------------------- micro-kernels
// where key j's row starts: strided rows of a tensor, or an address table (rows of pages); the
// micro-kernels are instantiated for both, with the same arithmetic
template <typename T>
struct StridedRows {
  const T* base;
  int64_t stride;
  const T* operator[](int64_t j) const { return base + j * stride; }
  StridedRows operator+(int64_t j) const { return {base + j * stride, stride}; }
};
template <typename T>
struct TableRows {
  const T* const* p;
  const T* operator[](int64_t j) const { return p[j]; }
  TableRows operator+(int64_t j) const { return {p + j}; }
};

// s[r][j0 + jj] = q_r . k_{jj}, r < RT, jj < KT (q rows float32, zero-padded to a multiple of 8);
// key jj's row starts at kr[jj] (rows anywhere: a contiguous tensor or pages)
template <int DT, int RT, int KT, typename Rows>
inline void qk_tile(int64_t D, const float* const* q, Rows kr, float* const* s, int64_t j0) {
  static_assert(RT * KT <= 8, "tile of at most 8 dot products");
  f8 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = vzero();
  const int64_t D8 = D / 8 * 8;
  for (int64_t c = 0; c < D8; c += 8) {
    f8 kv[KT];
#pragma GCC unroll 8
    for (int jj = 0; jj < KT; ++jj) kv[jj] = load8<DT>(kr[jj] + c);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const f8 qv = vload(q[r] + c);
#pragma GCC unroll 8
      for (int jj = 0; jj < KT; ++jj) acc[r * KT + jj] += qv * kv[jj];
    }
  }
  float out[8];
  hsum8(acc, out);
  for (int64_t c = D8; c < D; ++c)
    for (int jj = 0; jj < KT; ++jj) {
      const float kc = Elem<DT>::get(kr[jj], c);
      for (int r = 0; r < RT; ++r) out[r * KT + jj] += q[r][c] * kc;
    }
  for (int r = 0; r < RT; ++r)
    for (int jj = 0; jj < KT; ++jj) s[r][j0 + jj] = out[r * KT + jj];
}

template <int DT, int RT, typename Rows>
inline void qk_rows(int64_t nk, int64_t D, const float* const* q, Rows kr, float* const* s) {
  constexpr int KT = RT == 1 ? 8 : (RT == 2 ? 4 : 2);
  int64_t j = 0;
  for (; j + KT <= nk; j += KT) qk_tile<DT, RT, KT>(D, q, kr + j, s, j);
  for (; j < nk; ++j) qk_tile<DT, RT, 1>(D, q, kr + j, s, j);
}

// o_r = corr_r * o_r + sum_j p_r[j] v_j, r < RT; 16 (then 8, then 1) output columns at a time;
// value j's row starts at vr[j]
template <int DT, int RT, typename Rows>
inline void pv_rows(int64_t nk, int64_t Dv, const float* const* p, Rows vr, float* const* o, const float* corr) {
  int64_t c = 0;
  for (; c + 16 <= Dv; c += 16) {
    f8 a0[RT], a1[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      a0[r] = vload(o[r] + c) * vsplat(corr[r]);
      a1[r] = vload(o[r] + c + 8) * vsplat(corr[r]);
    }
    for (int64_t j = 0; j < nk; ++j) {
      const typename Elem<DT>::T* vc = vr[j] + c;
      const f8 v0 = load8<DT>(vc), v1 = load8<DT>(vc + 8);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        const f8 pr = vsplat(p[r][j]);
        a0[r] += pr * v0;
        a1[r] += pr * v1;
      }
    }
    for (int r = 0; r < RT; ++r) {
      vstore(o[r] + c, a0[r]);
      vstore(o[r] + c + 8, a1[r]);
    }
  }
  for (; c + 8 <= Dv; c += 8) {
    f8 a0[RT];
    for (int r = 0; r < RT; ++r) a0[r] = vload(o[r] + c) * vsplat(corr[r]);
    for (int64_t j = 0; j < nk; ++j) {
      const f8 v0 = load8<DT>(vr[j] + c);
      for (int r = 0; r < RT; ++r) a0[r] += vsplat(p[r][j]) * v0;
    }
    for (int r = 0; r < RT; ++r) vstore(o[r] + c, a0[r]);
  }
  for (; c < Dv; ++c)
    for (int r = 0; r < RT; ++r) {
      float a = o[r][c] * corr[r];
      for (int64_t j = 0; j < nk; ++j) a += p[r][j] * Elem<DT>::get(vr[j], c);
      o[r][c] = a;
    }
}

// ------------------------------------------------------------------------------------ one split
#ifdef SPARSE_ATTN_BF16_DOT
constexpr bool kHaveBf16Dot = true;
#else
constexpr bool kHaveBf16Dot = false;
#endif

// bf16 dot-product path (bfloat16 on AVX-512 BF16): q rows as bf16 words (unscaled), the segment's
// K pair-packed (transposed) and V pair-packed (rows interleaved), P as bf16 pairs, and the output
// accumulators with rows padded to a multiple of 16 columns (ob); products by vec_bf16.h's
// micro-kernel, the softmax as on the float32 path.
struct DotScratch {
  int64_t Dw = 0, Dvp = 0;
  bool direct = false;  // decode_bf16.h's products (no packing): D and Dv in {32, 64, 128, 256}
  std::vector<uint16_t> zero;
  std::vector<uint32_t> qw, kp, vp, pw;
  std::vector<float> ob;
  std::vector<const uint32_t*> qwp, pwp;
  std::vector<float*> obp;
  static bool direct_path(const Params& P) {
#ifdef SPARSE_ATTN_BF16_DOT
    return direct_head_dim(P.D) && direct_head_dim(P.Dv);
#else
    return false;
#endif
  }
  // `run`: keys per segment at most (the stride of the P rows)
  void init(const Params& P, int64_t run) {
    Dw = (P.D + 1) / 2, Dvp = (P.Dv + 15) / 16 * 16;
    direct = direct_path(P);
    zero.assign(Dvp, 0);
    qw.assign(P.R * Dw, 0u), kp.assign(std::max<int64_t>(Dw, 1) * kSeg, 0u), vp.assign(kSeg / 2 * Dvp, 0u);
    pw.assign(P.R * run / 2, 0u), ob.assign(P.R * Dvp, 0.f);
    qwp.resize(P.R), pwp.resize(P.R), obp.resize(P.R);
    for (int64_t i = 0; i < P.R; ++i) pwp[i] = pw.data() + i * run / 2;
  }
};

// keys of a strided run processed as one segment for `rows` query rows: a power of two in
// [kSeg, kRunKeys] whose rows x keys of scores fit kRunScratchFloats
inline int64_t long_run_keys(int64_t rows) {
  int64_t n = kSeg;
  while (n * 2 <= kRunKeys && rows * n * 2 <= kRunScratchFloats) n *= 2;
  return n;
}

struct Scratch {
  std::vector<float> q, o, s, m, l, corr;
  std::vector<const float*> qp;
  std::vector<float*> sp, op;
  std::vector<int32_t> rid;
  DotScratch w;
  // keys per segment at most: kSeg, or long_run_keys on the direct bf16 path over a strided
  // tensor, where runs of consecutive segments are read as one (Split::run)
  int64_t run = kSeg;
  std::vector<Seg> runs;  // a split's segments merged into runs (run > kSeg)
  std::vector<int64_t> run_first, pair_end;  // runs[e]'s first segment; per sub-segment, its end key pair
  Scratch(const Params& P, bool bf16_dot) {
    if (bf16_dot && DotScratch::direct_path(P) && !P.table) run = long_run_keys(P.R);
    if (bf16_dot) w.init(P, run);
    q.assign(P.R * P.Dpad, 0.f);
    o.assign(P.R * std::max<int64_t>(P.Dv, 1), 0.f);
    s.assign(P.R * run, 0.f);
    m.assign(P.R, kNegInf);
    l.assign(P.R, 0.f);
    corr.assign(P.R, 1.f);
    qp.resize(P.R), sp.resize(P.R), op.resize(P.R), rid.resize(P.R);
  }
};

template <int DT>
class Split {
  using In = typename Elem<DT>::T;

 public:
  static constexpr bool kDot = DT == 1 && kHaveBf16Dot;

  Split(const Params& P, const In* Q, const In* K, const In* V) : P(P), Q(Q), K(K), V(V) {}

  // rows r = t * G + g (token-major); writes the split's unnormalised out (R x Dv), max, sum
  void run(Scratch& S, int64_t b, int64_t h, const Seg* segs, int64_t nseg, float* po, float* pm, float* pl) {
    const int64_t G = P.G;
    uint32_t need = 0;
    for (int64_t e = 0; e < nseg; ++e) need |= segs[e].rows;
    for (int64_t t = 0; t < P.sq; ++t) {
      if (!(need >> t & 1u)) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = t * G + g;
        const In* src = Q + b * P.qst[0] + (h * G + g) * P.qst[1] + t * P.qst[2];
#ifdef SPARSE_ATTN_BF16_DOT
        if constexpr (kDot) {
          copy_words(S.w.qw.data() + row * S.w.Dw, reinterpret_cast<const uint16_t*>(src), P.D, P.qst[3]);
          continue;
        }
#endif
        float* dst = S.q.data() + row * P.Dpad;
        for (int64_t d = 0; d < P.D; ++d) dst[d] = Elem<DT>::get(src, d * P.qst[3]) * P.qmul;
      }
    }
    std::fill(S.o.begin(), S.o.end(), 0.f);
    if constexpr (kDot) std::fill(S.w.ob.begin(), S.w.ob.end(), 0.f);
    std::fill(S.m.begin(), S.m.end(), kNegInf);
    std::fill(S.l.begin(), S.l.end(), 0.f);
    const int64_t skb = P.len(b);
    if (!P.table) {
      const In* kb = K + b * P.kst[0] + h * P.kst[1];
      const In* vb = V + b * P.vst[0] + h * P.vst[1];
      if (S.run > kSeg) {  // direct bf16 path: runs of consecutive segments (kRunKeys)
        // a run grows by the next segment while it continues it (next keys, same rows), fits
        // S.run keys, and ends on a multiple of 16 keys so far (its sub-segments then keep their
        // own key pairs and 16-key score groups: the arithmetic of separate segments)
        S.runs.clear(), S.run_first.clear();
        for (int64_t e = 0; e < nseg;) {
          Seg r = segs[e];
          S.run_first.push_back(e);
          for (++e; e < nseg && r.nk % 16 == 0 && segs[e].j0 == r.j0 + r.nk && segs[e].rows == r.rows &&
                    r.nk + segs[e].nk <= S.run;
               ++e)
            r.nk += segs[e].nk;
          S.runs.push_back(r);
        }
        S.run_first.push_back(nseg);
        const int64_t nrun = static_cast<int64_t>(S.runs.size());
        for (int64_t e = 0; e < nrun; ++e) {
          const Seg& cur = S.runs[e];
          const Seg* nx = e + 1 < nrun ? &S.runs[e + 1] : nullptr;
          const Seg* subs = segs + S.run_first[e];
          const int64_t nsub = S.run_first[e + 1] - S.run_first[e];
          // the next run is prefetched (its first kSeg keys) only where it does not continue this
          // one: a continuation the hardware prefetchers fetch by themselves
          const int64_t ahead = nx && nx->j0 != cur.j0 + cur.nk ? std::min<int64_t>(nx->nk, kSeg) : 0;
          const StridedRows<In> ck{kb + cur.j0 * P.kst[2], P.kst[2]}, cv{vb + cur.j0 * P.vst[2], P.vst[2]};
          const StridedRows<In> nk{kb + (nx ? nx->j0 : 0) * P.kst[2], P.kst[2]};
          const StridedRows<In> nv{vb + (nx ? nx->j0 : 0) * P.vst[2], P.vst[2]};
          if (ahead > 0) {
            segment(S, cur, ck, cv, skb, nk, nv, ahead, subs, nsub);
          } else {
            segment<StridedRows<In>, false>(S, cur, ck, cv, skb, nk, nv, 0, subs, nsub);
          }
        }
        copy_out(S, po, pm, pl);
        return;
      }
      for (int64_t e = 0; e < nseg; ++e) {
        if (kDot && !S.w.direct) {  // K and V kPrefetchAhead segments ahead, every line: the bf16
          // products consume a segment faster than the hardware prefetchers fetch 16 rows at once
          for (int64_t f = (e == 0 ? 1 : kPrefetchAhead); f <= kPrefetchAhead && e + f < nseg; ++f) {
            prefetch_rows<StridedRows<In>, 1>(StridedRows<In>{kb + segs[e + f].j0 * P.kst[2], P.kst[2]}, segs[e + f].nk, P.D);
            prefetch_rows<StridedRows<In>, 1>(StridedRows<In>{vb + segs[e + f].j0 * P.vst[2], P.vst[2]}, segs[e + f].nk, P.Dv);
          }
        }
        const Seg* nx = e + 1 < nseg ? &segs[e + 1] : nullptr;
        segment(S, segs[e], StridedRows<In>{kb + segs[e].j0 * P.kst[2], P.kst[2]},
                StridedRows<In>{vb + segs[e].j0 * P.vst[2], P.vst[2]}, skb,
                StridedRows<In>{kb + (nx ? nx->j0 : 0) * P.kst[2], P.kst[2]},
                StridedRows<In>{vb + (nx ? nx->j0 : 0) * P.vst[2], P.vst[2]}, nx ? nx->nk : 0);
      }
      copy_out(S, po, pm, pl);
      return;
    }
    if (nseg > 0) locate(segs[0], b, h, kr_[0], vr_[0]);
    for (int64_t e = 0; e < nseg; ++e) {
      if (e + 1 < nseg) locate(segs[e + 1], b, h, kr_[(e + 1) & 1], vr_[(e + 1) & 1]);
      // pages sit anywhere in the pool: the hardware prefetchers cannot guess where the keys go
      // on, and every page costs a TLB walk. Touch one line per 4 KB of K and V two segments
      // ahead (a strided tensor streams by itself). Measured: paged / contiguous time ~1.14 ->
      // ~1.08 (64-token pages in random order); prefetching whole segments ahead was slower.
      if (e + 2 < nseg) {
        const Seg& s2 = segs[e + 2];
        const int64_t step = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, P.kst[2] * (int64_t)sizeof(In)));
        const int32_t* row = P.table + b * P.tst0;
        for (int64_t j = 0; j < s2.nk; j += step) {
          const int64_t a = s2.j0 + j, page = row[(a / P.page_size) * P.tst1], off = a % P.page_size;
          __builtin_prefetch(K + page * P.kst[0] + h * P.kst[1] + off * P.kst[2], 0, 2);
          __builtin_prefetch(V + page * P.vst[0] + h * P.vst[1] + off * P.vst[2], 0, 2);
        }
      }
      segment(S, segs[e], TableRows<In>{kr_[e & 1]}, TableRows<In>{vr_[e & 1]}, skb, TableRows<In>{kr_[(e + 1) & 1]},
              TableRows<In>{vr_[(e + 1) & 1]}, e + 1 < nseg ? segs[e + 1].nk : 0);
    }
    copy_out(S, po, pm, pl);
  }

 private:
  void copy_out(const Scratch& S, float* po, float* pm, float* pl) const {
    if constexpr (kDot) {
      for (int64_t r = 0; r < P.R; ++r) std::copy_n(S.w.ob.data() + r * S.w.Dvp, P.Dv, po + r * P.Dv);
    } else {
      std::copy(S.o.begin(), S.o.begin() + P.R * P.Dv, po);
    }
    std::copy(S.m.begin(), S.m.end(), pm);
    std::copy(S.l.begin(), S.l.end(), pl);
  }

  // the K/V row addresses of a segment of a paged cache, from the page table (a segment may
  // cross pages; segments are cut by position, not by page, and the arithmetic does not depend
  // on where rows live, so a paged cache gives bit-identical results to a contiguous one)
  void locate(const Seg& sg, int64_t b, int64_t h, const In** kr, const In** vr) const {
    const int64_t nk = sg.nk, j0 = sg.j0, ps = P.page_size;
    const int32_t* row = P.table + b * P.tst0;
    for (int64_t j = 0; j < nk;) {
      const int64_t a = j0 + j, off = a % ps, n = std::min(nk - j, ps - off);
      const int64_t page = row[(a / ps) * P.tst1];
      const In* k = K + page * P.kst[0] + h * P.kst[1] + off * P.kst[2];
      const In* v = V + page * P.vst[0] + h * P.vst[1] + off * P.vst[2];
      for (int64_t i = 0; i < n; ++i, ++j) kr[j] = k + i * P.kst[2], vr[j] = v + i * P.vst[2];
    }
  }

  // every cache line of rows [0, nk) of `n` elements
  template <typename Rows, int Locality = 3>
  static void prefetch_rows(Rows r, int64_t nk, int64_t n) {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t c = 0; c < n * (int64_t)sizeof(In); c += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(r[j]) + c, 0, Locality);
  }

  // one segment's keys: kr / vr its K / V rows; nkr / nvr the next segment's (next_nk of them),
  // which the direct bf16 path prefetches into L2 while it works
  // Paced = false (next_nk must be 0): no prefetch hook at all in the products' loops (a call
  // there, even one that does nothing, makes the compiler spill the accumulators around it)
  // `subs` (nsub > 0): sg is a run of these consecutive segments, each but the last a multiple of
  // 16 keys; the softmax and the P . V rescaling run per sub-segment, so the result is bit-identical
  // to processing them one by one (only the memory access pattern changes)
  template <typename Rows, bool Paced = true>
  void segment(Scratch& S, const Seg& sg, Rows kr, Rows vr, int64_t skb, Rows nkr, Rows nvr, int64_t next_nk,
               const Seg* subs = nullptr, int64_t nsub = 0) {
    const int64_t G = P.G, nk = sg.nk, j0 = sg.j0;
    if (nsub == 0) subs = &sg, nsub = 1;
    if (!kDot || (P.table && !S.w.direct)) prefetch_rows(vr, nk, P.Dv);  // the V rows are read after the scores: ask for them now
    int64_t cnt = 0;
    for (int64_t t = 0; t < P.sq; ++t) {
      if (!(sg.rows >> t & 1u)) continue;
      for (int64_t g = 0; g < G; ++g, ++cnt) {
        const int64_t row = t * G + g;
        S.qp[cnt] = S.q.data() + row * P.Dpad;
        S.op[cnt] = S.o.data() + row * P.Dv;
        S.sp[cnt] = S.s.data() + cnt * S.run;
        S.rid[cnt] = static_cast<int32_t>(row);
        if constexpr (kDot) {
          S.w.qwp[cnt] = S.w.qw.data() + row * S.w.Dw;
          S.w.obp[cnt] = S.w.ob.data() + row * S.w.Dvp;
        }
      }
    }
#ifdef SPARSE_ATTN_BF16_DOT
    // direct path: q . K^T in passes of kDirectRows rows, P . V in passes of `rows` rows x `cols`
    // columns; every key pair of every pass steps the pacer, which prefetches the next segment
    const int64_t cols = std::min<int64_t>(P.Dv, kPvCols), rows = pv_rows_per_pass(cols);
    Pacer<Rows> pace{nkr, nvr, next_nk, P.D * int64_t(sizeof(In)), P.Dv * int64_t(sizeof(In)),
                     (nk + 15) / 16 * 8 * ((cnt + kDirectRows - 1) / kDirectRows) +
                         (nk + 1) / 2 * ((cnt + rows - 1) / rows) * ((P.Dv + cols - 1) / cols)};
    if constexpr (kDot) {  // scores: q . K^T over the segment's keys, scaled by scale * log2 e
      if (S.w.direct) {
        for (int64_t r = 0; r < cnt; r += kDirectRows)
          with_direct_rows(std::min<int64_t>(kDirectRows, cnt - r), [&](auto rg) {
            with_chunks(P.D, [&](auto dc) {
              qk_direct<decltype(rg)::value, decltype(dc)::value>(
                  nk, S.w.qwp.data() + r, [&](int64_t j) { return reinterpret_cast<const uint16_t*>(kr[j]); },
                  S.sp.data() + r, P.qmul, [&]() __attribute__((always_inline)) {
                    if constexpr (Paced) pace.step();
                  });
            });
          });
      } else {
      pack_k_pairs_rows(S.w.kp.data(), kSeg, [&](int64_t j) { return reinterpret_cast<const uint16_t*>(kr[j]); }, 1,
                        nk, P.D);
      gemm_bf16<false>(cnt, round_up(nk, 16), S.w.Dw, S.w.qwp.data(), S.w.kp.data(), kSeg, S.sp.data(), nullptr,
                       P.qmul);
      }
    } else
#endif
    for (int64_t r = 0; r < cnt; r += kRT) {
      switch (std::min<int64_t>(kRT, cnt - r)) {
        case 4: qk_rows<DT, 4>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r); break;
        case 3: qk_rows<DT, 3>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r); break;
        case 2: qk_rows<DT, 2>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r); break;
        default: qk_rows<DT, 1>(nk, P.D, S.qp.data() + r, kr, S.sp.data() + r); break;
      }
    }
    // token rule, online softmax (base 2), per sub-segment; corr[u * cnt + i]: sub-segment u's
    // rescaling of row i's accumulators
    if (static_cast<int64_t>(S.corr.size()) < nsub * cnt) S.corr.resize(nsub * cnt);
    float* const corr = S.corr.data();
    const int64_t nk8 = (nk + 7) / 8 * 8;
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t row = S.rid[i], t = row / G;
      const RowRange rr = row_range(P, skb, t);
      for (int64_t u = 0; u < nsub; ++u) {  // padding and the token rule
        const int64_t sj0 = subs[u].j0, snk = subs[u].nk, snk8 = (snk + 7) / 8 * 8;
        float* s = S.sp[i] + (sj0 - j0);
        for (int64_t j = snk; j < snk8; ++j) s[j] = kNegInf;
        const bool in_window = sj0 >= rr.lo && sj0 + snk <= rr.hi, in_sinks = sj0 + snk <= rr.s;
        if (!in_window && !in_sinks)
          for (int64_t j = 0; j < snk; ++j) {
            const int64_t a = sj0 + j;
            if (!((a >= rr.lo && a < rr.hi) || a < rr.s)) s[j] = kNegInf;
          }
      }
      // a run whose scores stay at or below the row's running max leaves it unchanged at every
      // sub-segment: their own maxima need not be found (the same values result, ~3% of a run)
      bool steady = false;
      if (nsub > 1 && S.m[row] != kNegInf) {
        f8 mx = vsplat(kNegInf);
        for (int64_t j = 0; j < nk8; j += 8) mx = vmax(mx, vload(S.sp[i] + j));
        float m_run = kNegInf;
        for (int l = 0; l < 8; ++l) m_run = std::max(m_run, lane(mx, l));
        steady = m_run <= S.m[row];
      }
      for (int64_t u = 0; u < nsub; ++u) {
        const int64_t sj0 = subs[u].j0, snk = subs[u].nk, snk8 = (snk + 7) / 8 * 8;
        float* s = S.sp[i] + (sj0 - j0);
        float& cr = corr[u * cnt + i];
        float m_blk = kNegInf;
        if (!steady) {
          f8 mx = vsplat(kNegInf);
          for (int64_t j = 0; j < snk8; j += 8) mx = vmax(mx, vload(s + j));
          for (int l = 0; l < 8; ++l) m_blk = std::max(m_blk, lane(mx, l));
        }
        const float m_old = S.m[row], m_new = std::max(m_old, m_blk);
        if (m_new == kNegInf) {  // nothing visible to this row yet
          cr = 1.f;
          std::fill_n(s, snk8, 0.f);
          continue;
        }
        cr = exp2_scalar(m_old - m_new);  // 0 on the row's first visible segment
        const f8 vm = vsplat(m_new);
        f8 acc = vzero();
        for (int64_t j = 0; j < snk8; j += 8) {
          const f8 pj = vexp2(vload(s + j) - vm);
          vstore(s + j, pj);
          acc += pj;
        }
        float sum = 0.f;
        for (int l = 0; l < 8; ++l) sum += lane(acc, l);
        S.l[row] = S.l[row] * cr + sum;
        S.m[row] = m_new;
      }
    }
#ifdef SPARSE_ATTN_BF16_DOT
    if constexpr (kDot) {  // out = corr * out + P . V, P rounded to bf16 pairs
      const int64_t np = (nk + 1) / 2;
      S.pair_end.resize(nsub);
      for (int64_t u = 0; u < nsub; ++u) S.pair_end[u] = (subs[u].j0 - j0 + subs[u].nk + 1) / 2;
      for (int64_t i = 0; i < cnt; ++i) floats_to_bf16_pairs(S.w.pw.data() + i * S.run / 2, S.sp[i], round_up(nk, 16));
      if (S.w.direct) {  // passes of up to kPvCols columns: whole V rows for Dv <= 128 (decode_bf16.h)
        for (int64_t r = 0; r < cnt; r += rows)
          for (int64_t d0 = 0; d0 < P.Dv; d0 += cols)
            with_direct_rows(std::min<int64_t>(rows, cnt - r), [&](auto rg) {
              with_chunks(cols, [&](auto nc) {
                constexpr int RG = std::remove_reference_t<decltype(rg)>::value, NC = decltype(nc)::value;
                if constexpr (RG * NC <= kPvAccVectors / 2)  // pv_rows_per_pass never asks for more
                  pv_direct<RG, NC>(
                      nk, S.w.pwp.data() + r, [&](int64_t j) { return reinterpret_cast<const uint16_t*>(vr[j]); },
                      S.w.zero.data(), d0, S.w.obp.data() + r, corr + r, [&]() __attribute__((always_inline)) {
                        if constexpr (Paced) pace.step();
                      }, nsub, S.pair_end.data(), cnt);
              });
            });
        return;
      }
      for (int64_t pr = 0; pr < np; ++pr)
        interleave_bf16_rows(S.w.vp.data() + pr * S.w.Dvp, reinterpret_cast<const uint16_t*>(vr[2 * pr]),
                             2 * pr + 1 < nk ? reinterpret_cast<const uint16_t*>(vr[2 * pr + 1]) : nullptr, P.Dv);
      gemm_bf16<true>(cnt, S.w.Dvp, np, S.w.pwp.data(), S.w.vp.data(), S.w.Dvp, S.w.obp.data(), S.corr.data());
      return;
    }
#endif
    for (int64_t r = 0; r < cnt; r += kRT) {
      const float* const* p = const_cast<const float* const*>(S.sp.data() + r);
      switch (std::min<int64_t>(kRT, cnt - r)) {
        case 4: pv_rows<DT, 4>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r); break;
        case 3: pv_rows<DT, 3>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r); break;
        case 2: pv_rows<DT, 2>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r); break;
        default: pv_rows<DT, 1>(nk, P.Dv, p, vr, S.op.data() + r, S.corr.data() + r); break;
      }
    }
  }

  const Params& P;
  const In *Q, *K, *V;
  const In* kr_[2][kSeg];  // paged: K / V row addresses of the current and the next segment
  const In* vr_[2][kSeg];
};

template <typename OutT>
void merge(const Params& P, int64_t b, int64_t h, int64_t ns, const float* po, const float* pm, const float* pl,
           OutT* out, float* lse, std::vector<float>& acc, std::vector<float>& w) {
  const int64_t R = P.R, Dv = P.Dv;
  acc.resize(Dv), w.resize(ns);
  for (int64_t row = 0; row < R; ++row) {
    const int64_t t = row / P.G, g = row % P.G;
    const int64_t orow = (b * P.Hq + h * P.G + g) * P.sq + t;
    float mx = kNegInf;
    for (int64_t i = 0; i < ns; ++i) mx = std::max(mx, pm[i * R + row]);
    OutT* dst = out + orow * Dv;
    if (mx == kNegInf) {  // no visible key
      for (int64_t c = 0; c < Dv; ++c) dst[c] = static_cast<OutT>(0.f);
      lse[orow] = std::numeric_limits<float>::infinity();
      continue;
    }
    float l = 0.f;
    for (int64_t i = 0; i < ns; ++i) {
      w[i] = exp2_scalar(pm[i * R + row] - mx);
      l += w[i] * pl[i * R + row];
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t i = 0; i < ns; ++i) {
      if (w[i] == 0.f) continue;
      const float* src = po + (i * R + row) * Dv;
      for (int64_t c = 0; c < Dv; ++c) acc[c] += w[i] * src[c];
    }
    const float inv = 1.f / l;
    for (int64_t c = 0; c < Dv; ++c) dst[c] = static_cast<OutT>(acc[c] * inv);
    lse[orow] = kLn2 * (mx + std::log2(l));
  }
}

template <int DT, typename OutT>
void run_all(const Params& P, const void* q, const void* k, const void* v, OutT* out, float* lse) {
  using In = typename Elem<DT>::T;
  const int64_t BH = P.B * P.Hkv, R = P.R, Dv = P.Dv;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());

  // 1. the visited segments of every (batch, kv head): O(Sq x blocks) integer work each, done
  // here when small (a parallel region costs a barrier, and on a busy machine a barrier can cost
  // a scheduler time slice)
  std::vector<std::vector<Seg>> segs(BH);
  const int64_t nb = (P.sk + P.unit - 1) / P.unit;
  auto build = [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> mask;
    for (int64_t bh = lo; bh < hi; ++bh) build_segments(P, bh / P.Hkv, bh % P.Hkv, mask, segs[bh]);
  };
  if (BH * (nb + 1) * P.sq <= (int64_t(1) << 20)) {
    build(0, BH);
  } else {
    at::parallel_for(0, BH, 1, build);
  }

  // 2. splits: ~4 units of work per thread over all (batch, kv head), each >= kMinSegs segments
  int64_t total = 0;
  for (const auto& s : segs) total += static_cast<int64_t>(s.size());
  const int64_t per_split = std::max<int64_t>(kMinSegs, (total + 4 * nthreads - 1) / (4 * nthreads));
  std::vector<int64_t> first(BH + 1, 0), nsplit(BH, 1);
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t n = static_cast<int64_t>(segs[bh].size());
    nsplit[bh] = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, (n + per_split - 1) / per_split));
    first[bh + 1] = first[bh] + nsplit[bh];
  }
  const int64_t units = first[BH];
  std::vector<float> po(units * R * Dv), pm(units * R), pl(units * R);
  // splits still running per (batch, kv head): the thread that finishes the last one merges
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[BH]);
  for (int64_t bh = 0; bh < BH; ++bh) left[bh].store(nsplit[bh]);

  // 3. one parallel region: splits handed out dynamically, merged by log-sum-exp when complete
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    Scratch S(P, Split<DT>::kDot);
    std::vector<float> acc, w;
    Split<DT> split(P, static_cast<const In*>(q), static_cast<const In*>(k), static_cast<const In*>(v));
    for (;;) {
      const int64_t u = next.fetch_add(1);
      if (u >= units) break;
      const int64_t bh = std::upper_bound(first.begin(), first.end(), u) - first.begin() - 1;
      const int64_t i = u - first[bh], ns = nsplit[bh], n = static_cast<int64_t>(segs[bh].size());
      const int64_t s0 = n * i / ns, s1 = n * (i + 1) / ns, b = bh / P.Hkv, h = bh % P.Hkv;
      split.run(S, b, h, segs[bh].data() + s0, s1 - s0, po.data() + u * R * Dv, pm.data() + u * R,
                pl.data() + u * R);
      if (left[bh].fetch_sub(1, std::memory_order_acq_rel) == 1)
        merge<OutT>(P, b, h, ns, po.data() + first[bh] * R * Dv, pm.data() + first[bh] * R, pl.data() + first[bh] * R,
                    out, lse, acc, w);
    }
  };
  const int64_t workers = std::min(nthreads, units);
  if (workers <= 1) {
    work(0, 1);
  } else {
    at::parallel_for(0, workers, 1, work);
  }
}

}  // namespace
}  // namespace sparse_attn_decode

// mode 0: token rule only; 1: BlockSparse `layout` (bool (B', H', nb, nb)); 2: TopK (`token_index`
// int32 (B, Hkv, Sq, topk), ascending, -1 padded, plus sink / local blocks). `block`: the filter's
// block size (ignored in mode 0).
// `lengths` (int32 (B,), optional): sequence b holds lengths[b] keys and its query rows are
// end-aligned to it (absent: every sequence holds k.size(2) keys). `page_table` (int32 (B, W),
// optional, needs `lengths`): k, v are pages (P, Hkv, page_size, Dk|Dv) and key j of sequence b
// is row j % page_size of page page_table[b, j / page_size].
std::tuple<torch::Tensor, torch::Tensor> decode_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, bool causal,
                                                    int64_t window, int64_t sinks, int64_t mode, int64_t block,
                                                    c10::optional<torch::Tensor> layout,
                                                    c10::optional<torch::Tensor> token_index, int64_t sink_blocks,
                                                    int64_t local_blocks, double scale,
                                                    c10::optional<torch::Tensor> lengths,
                                                    c10::optional<torch::Tensor> page_table, int64_t page_size) {
  using namespace sparse_attn_decode;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_fwd: q, k, v must be 4-D (B, H, S, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_fwd: CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "decode_fwd: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "decode_fwd: q, k, v must share one dtype");
  const bool paged = page_table.has_value() && page_table->defined();
  const bool ragged = lengths.has_value() && lengths->defined();
  TORCH_CHECK(!paged || ragged, "decode_fwd: a page_table needs lengths");
  const int64_t B = q.size(0), Hq = q.size(1), sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), rows = k.size(2), Dv = v.size(3);
  TORCH_CHECK((paged || k.size(0) == B) && v.size(0) == k.size(0) && v.size(1) == Hkv && v.size(2) == rows &&
                  k.size(3) == D,
              "decode_fwd: q, k, v shapes disagree");
  TORCH_CHECK(sq <= 16, "decode_fwd: at most 16 query rows, got ", sq);
  TORCH_CHECK(mode >= 0 && mode <= 2 && (mode == 0 || block > 0), "decode_fwd: bad mode / block");
  torch::Tensor lens, table;
  int64_t sk = rows;  // the longest sequence
  if (ragged) {
    lens = lengths->to(torch::kInt32).contiguous();
    TORCH_CHECK(lens.device().is_cpu() && lens.dim() == 1 && lens.size(0) == B,
                "decode_fwd: lengths must be a CPU int32 (B=", B, ",) tensor, got ", lens.sizes());
    int64_t cap = rows;
    if (paged) {
      table = *page_table;
      TORCH_CHECK(table.scalar_type() == torch::kInt32 && table.device().is_cpu() && table.dim() == 2 &&
                      table.size(0) == B,
                  "decode_fwd: page_table must be a CPU int32 (B=", B, ", W) tensor, got ", table.sizes());
      TORCH_CHECK(page_size > 0 && rows == page_size, "decode_fwd: k, v pages must hold page_size=", page_size,
                  " rows, got ", rows);
      cap = table.size(1) * page_size;
    }
    const int32_t* L = lens.data_ptr<int32_t>();
    sk = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(L[b] >= 0 && L[b] <= cap, "decode_fwd: lengths[", b, "] = ", L[b], " is outside [0, ", cap, "]");
      TORCH_CHECK(!causal || L[b] >= sq, "decode_fwd: a causal rule needs Sq <= lengths[", b, "] = ", L[b]);
      sk = std::max<int64_t>(sk, L[b]);
      if (paged) {  // every page a visited key can live on must be in the pool
        const int32_t* row = table.data_ptr<int32_t>() + b * table.stride(0);
        for (int64_t s = 0; s < (L[b] + page_size - 1) / page_size; ++s) {
          const int32_t pg = row[s * table.stride(1)];
          TORCH_CHECK(pg >= 0 && pg < k.size(0), "decode_fwd: page_table[", b, ", ", s, "] = ", pg,
                      " is outside the pool [0, ", k.size(0), ")");
        }
      }
    }
  } else {
    TORCH_CHECK(!causal || sq <= sk, "decode_fwd: a causal rule needs Sq <= Sk");
  }
  auto out = torch::empty({B, Hq, sq, Dv}, q.options());
  auto lse = torch::empty({B, Hq, sq}, q.options().dtype(torch::kFloat32));
  if (B == 0 || Hq == 0 || sq == 0) return {out, lse};
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_fwd: Hq must be a multiple of Hkv");
  if (rows > 0 && D > 0) TORCH_CHECK(k.stride(3) == 1, "decode_fwd: k must be contiguous in its last dim");
  if (rows > 0 && Dv > 0) TORCH_CHECK(v.stride(3) == 1, "decode_fwd: v must be contiguous in its last dim");

  Params P{};
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.G = Hq / Hkv, P.sq = sq, P.sk = sk, P.D = D, P.Dv = Dv;
  P.Dpad = std::max<int64_t>(8, (D + 7) / 8 * 8), P.R = sq * P.G;
  for (int d = 0; d < 4; ++d) P.qst[d] = q.stride(d);
  for (int d = 0; d < 3; ++d) P.kst[d] = k.stride(d), P.vst[d] = v.stride(d);
  P.causal = causal, P.window = window, P.sinks = std::max<int64_t>(0, sinks);
  P.qmul = static_cast<float>(scale) * kLog2e;
  P.mode = static_cast<int>(mode), P.unit = mode == 0 ? kSeg : block;
  P.lens = ragged ? lens.data_ptr<int32_t>() : nullptr;
  P.table = paged ? table.data_ptr<int32_t>() : nullptr;
  P.tst0 = paged ? table.stride(0) : 0, P.tst1 = paged ? table.stride(1) : 0;
  P.page_size = paged ? page_size : 0;
  torch::Tensor lay, ti;
  const int64_t nb = (sk + P.unit - 1) / P.unit;
  if (mode == 1) {
    TORCH_CHECK(layout.has_value() && layout->defined(), "decode_fwd: mode 1 needs a layout");
    lay = *layout;
    TORCH_CHECK(lay.scalar_type() == torch::kBool && lay.device().is_cpu() && lay.dim() == 4 &&
                    (lay.size(0) == 1 || lay.size(0) == B) && (lay.size(1) == 1 || lay.size(1) == Hkv) &&
                    lay.size(2) >= nb && lay.size(3) >= nb,
                "decode_fwd: layout must be bool (1 or B, 1 or Hkv, >= ", nb, ", >= ", nb, "), got ", lay.sizes());
    P.lay = lay.data_ptr<bool>();
    for (int d = 0; d < 4; ++d) P.lst[d] = lay.stride(d);
    P.lb = lay.size(0), P.lh = lay.size(1);
  } else if (mode == 2) {
    TORCH_CHECK(token_index.has_value() && token_index->defined(), "decode_fwd: mode 2 needs token_index");
    ti = token_index->to(torch::kInt32).contiguous();
    TORCH_CHECK(ti.device().is_cpu() && ti.dim() == 4 && ti.size(0) == B && ti.size(1) == Hkv && ti.size(2) == sq,
                "decode_fwd: token_index must be (B, Hkv, Sq, topk), got ", ti.sizes());
    P.ti = ti.data_ptr<int32_t>(), P.topk = ti.size(3);
    P.sink_blocks = std::max<int64_t>(0, sink_blocks), P.local_blocks = std::max<int64_t>(1, local_blocks);
  }

  const void *qd = q.data_ptr(), *kd = k.data_ptr(), *vd = v.data_ptr();
  if (dt == torch::kFloat32) {
    run_all<0, float>(P, qd, kd, vd, out.data_ptr<float>(), lse.data_ptr<float>());
  } else if (dt == torch::kBFloat16) {
    run_all<1, at::BFloat16>(P, qd, kd, vd, out.data_ptr<at::BFloat16>(), lse.data_ptr<float>());
  } else {
    run_all<2, at::Half>(P, qd, kd, vd, out.data_ptr<at::Half>(), lse.data_ptr<float>());
  }
  return {out, lse};
}

// TopK's pooled keys: mean of each block of `block` keys (the last may be partial), float32
// (B, Hkv, ceil(Sk / block), D). K is read once in its dtype (converted in registers), float32
// sums; parallel over (batch, kv head, block). At decode this is the selection's whole cost.
torch::Tensor pool_keys(torch::Tensor k, int64_t block) {
  using namespace sparse_attn_decode;
  TORCH_CHECK(k.dim() == 4 && k.device().is_cpu(), "pool_keys: k must be a 4-D CPU tensor");
  TORCH_CHECK(block > 0, "pool_keys: block must be positive");
  const auto dt = k.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "pool_keys: dtype must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = k.size(0), H = k.size(1), sk = k.size(2), D = k.size(3), nb = (sk + block - 1) / block;
  auto out = torch::empty({B, H, nb, D}, k.options().dtype(torch::kFloat32));
  if (out.numel() == 0) return out;
  if (D > 1 && k.stride(3) != 1) k = k.contiguous();
  const int64_t s0 = k.stride(0), s1 = k.stride(1), s2 = k.stride(2);
  float* o = out.data_ptr<float>();
  auto run = [&](auto tag) {
    constexpr int DT = decltype(tag)::value;
    using In = typename Elem<DT>::T;
    const In* K = static_cast<const In*>(k.data_ptr());
    const int64_t grain = std::max<int64_t>(1, 4096 / block);  // ~4K keys per task
    at::parallel_for(0, B * H * nb, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(std::max<int64_t>(D, 8));
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = i % nb, bh = i / nb, j0 = n * block, j1 = std::min(sk, j0 + block);
        const In* base = K + (bh / H) * s0 + (bh % H) * s1;
        std::fill(acc.begin(), acc.end(), 0.f);
        const int64_t D8 = D / 8 * 8;
        for (int64_t j = j0; j < j1; ++j) {
          const In* row = base + j * s2;
          for (int64_t c = 0; c < D8; c += 8) vstore(acc.data() + c, vload(acc.data() + c) + load8<DT>(row + c));
          for (int64_t c = D8; c < D; ++c) acc[c] += Elem<DT>::get(row, c);
        }
        const float cnt = static_cast<float>(j1 - j0);
        float* dst = o + i * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = acc[c] / cnt;
      }
    });
  };
  if (dt == torch::kFloat32) {
    run(std::integral_constant<int, 0>{});
  } else if (dt == torch::kBFloat16) {
    run(std::integral_constant<int, 1>{});
  } else {
    run(std::integral_constant<int, 2>{});
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SPARSE_ATTN_CHECK_TARGET();  // refuse to load on a CPU without this build's features
  m.doc() = "sparse_attn CPU split-KV decode kernel";
  m.attr("bf16_dot") = sparse_attn_decode::kHaveBf16Dot;  // bfloat16 products with vdpbf16ps
  m.def("decode_fwd", &decode_fwd, "split-KV attention forward for Sq <= 16 query rows -> (out, lse)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("causal"), py::arg("window"), py::arg("sinks"), py::arg("mode"),
        py::arg("block"), py::arg("layout"), py::arg("token_index"), py::arg("sink_blocks"),
        py::arg("local_blocks"), py::arg("scale"), py::arg("lengths") = py::none(),
        py::arg("page_table") = py::none(), py::arg("page_size") = 0);
  m.def("pool_keys", &pool_keys, "mean key of each block, float32 (B, H, ceil(Sk / block), D)", py::arg("k"),
        py::arg("block"));
}
