// Small float32 building blocks of the CPU kernels: a register-blocked matrix micro-kernel, a
// vectorised exp2, and bf16 / fp16 -> float32 conversion loops.
//
// Portable C++17 plus, on gcc and clang, GNU vector types (`vector_size`): no intrinsics, no
// instruction-set assumption. The vector width follows the target the file is compiled for
// (16 floats with AVX-512, 8 with AVX, 4 otherwise); -march=native in JIT builds picks it.
// One exception, at the end: `v8`, vectors of exactly 8 floats whatever the target (the decode
// kernel's dot-product tiles and softmax), with AVX / F16C intrinsics where they exist.
// Why vector types and not plain loops: with plain loops gcc 12 kept the micro-kernel's
// accumulators in registers for some (rows x columns) shapes only and fell to ~3 GFLOP/s on the
// others, whereas the vector-typed kernel reaches ~110 GFLOP/s per core on AVX-512 for all of
// them (measured 2026-11-23 on the project's 2-core EPYC).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/scalar.h"

#if defined(__AVX__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sparse_attn_cpu {

using sparse_attn_scalar::bits_to_float;
using sparse_attn_scalar::exp2_poly;
using sparse_attn_scalar::exp2_scalar;
using sparse_attn_scalar::float_to_bits;
using sparse_attn_scalar::half_bits_to_float;
using sparse_attn_scalar::kMagic;

// Micro tile: kMR rows x kNV vectors of accumulators, plus kNV B vectors and one broadcast, must
// fit the register file (gemm_rows handles kMR <= 6, kNV <= 4). SPARSE_ATTN_MR / _NV override.
#if defined(__AVX512F__)
constexpr int kVec = 16;  // floats per vector register
#define SPARSE_ATTN_TILE 6, 4  // 24 + 4 + 1 of 32 registers
#elif defined(__AVX__)
constexpr int kVec = 8;
// 16 registers: 6 x 2 accumulators + 2 B vectors + 1 broadcast. The former 3 x 4 tile needs 17,
// so gcc folds the B loads into the FMAs (15 loads per 12 FMAs, load-bound on Zen 3); 6 x 2 keeps
// B in registers: 23% fewer cycles than 3 x 4 (4 x 3: 10% fewer) on the kernel's Q.K^T and P.V
// shapes (perf stat cycles:u, 2026-11-23, the 2-core AVX2 EPYC (Zen 3) the project now runs on).
#define SPARSE_ATTN_TILE 6, 2
#elif defined(__aarch64__)
constexpr int kVec = 4;
#define SPARSE_ATTN_TILE 6, 4  // 32 registers
#else
constexpr int kVec = 4;
#define SPARSE_ATTN_TILE 3, 4
#endif
constexpr int kTile[2] = {SPARSE_ATTN_TILE};
#ifdef SPARSE_ATTN_MR
constexpr int kMR = SPARSE_ATTN_MR;
#else
constexpr int kMR = kTile[0];  // rows of a micro tile
#endif
#ifdef SPARSE_ATTN_NV
constexpr int kNV = SPARSE_ATTN_NV;
#else
constexpr int kNV = kTile[1];  // vectors per micro-tile row
#endif
constexpr int kNR = kNV * kVec;    // columns per micro tile

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }


// ------------------------------------------------------------------------------------- vectors
#if (defined(__GNUC__) || defined(__clang__)) && !defined(SPARSE_ATTN_NO_VECTOR_TYPES)
#define SPARSE_ATTN_VECTOR_TYPES 1
typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kVec * sizeof(int32_t))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline vfloat vsplat(float x) { return vfloat{} + x; }
#endif

// 2^x for x <= 0 (the softmax's exponent): exp2_scalar and exp2_poly come from scalar.h.
#ifdef SPARSE_ATTN_VECTOR_TYPES
inline vfloat vexp2(vfloat x) {
#if defined(__AVX512F__)
  // the clamps below as vmaxps / vminps, the constant first: a NaN x is the second operand, which
  // both return when a lane is unordered, as the comparisons do (gcc emits compare + blend for those).
  // (vfloat and __m512 are both 16-float GNU vectors here: a cast converts.)
  x = (vfloat)_mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), (__m512)x));
#else
  x = x < vsplat(-127.0f) ? vsplat(-127.0f) : x;
  x = x > vsplat(127.0f) ? vsplat(127.0f) : x;
#endif
  const vfloat t = x + kMagic;
  const vfloat n = t - kMagic;
  const vfloat f = x - n;
  const vint e = ((vint)t - (vint)vsplat(kMagic)) + 127;
  return exp2_poly(f) * (vfloat)(e << 23);
}
#endif

// 2^x for x <= 0, a small positive x or NaN (a score less its row's maximum; -inf gives 0, NaN NaN)
// in 10 operations instead of vexp2's 15: with AVX-512, n = round(x) by vrndscaleps and 2^n applied
// by vscalefps. For x >= -126 the same n, f and polynomial as vexp2, so the same bits; below, where
// vexp2 flushes to 0 from n = -127, this gives the subnormals down to 2^-149, then 0 (x clamped at
// -150 so -inf does not make f = -inf - -inf a NaN). Elsewhere vexp2 itself.
inline vfloat vexp2_nonpos(vfloat x) {
#if defined(__AVX512F__)
  x = (vfloat)_mm512_max_ps(_mm512_set1_ps(-150.0f), (__m512)x);  // NaN is the second operand: kept
  const __m512 n = _mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (vfloat)_mm512_scalef_ps((__m512)exp2_poly(x - (vfloat)n), n);
#else
  return vexp2(x);
#endif
}

// The sum and the max of a vector's lanes. With AVX-512 as trees (4 shuffle + op steps, the order
// of _mm512_reduce_*: not lane 0, 1, 2, ...); elsewhere lane by lane. hmax: v holds no NaN.
inline float hsum(vfloat v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s = 0.f;
  for (int i = 0; i < kVec; ++i) s += v[i];
  return s;
#endif
}
inline float hmax(vfloat v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps((__m512)v);
#else
  float m = v[0];
  for (int i = 1; i < kVec; ++i) m = std::max(m, v[i]);
  return m;
#endif
}
// the lanes' maxima (with AVX-512 vmaxps: a NaN in either lane gives b's lane; elsewhere a
// comparison, which gives b's lane too; callers that must keep NaN check for it separately)
inline vfloat vmax(vfloat a, vfloat b) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_max_ps((__m512)a, (__m512)b);
#else
  return a > b ? a : b;
#endif
}
// whether any lane of a comparison's result is set
inline bool vany(vint v) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)v, (__m512i)v) != 0;
#else
  for (int i = 0; i < kVec; ++i)
    if (v[i] != 0) return true;
  return false;
#endif
}

// y[i] = 2^(x[i] - m) for m >= every x[i] (vexp2_nonpos), returns the sum (hsum's order); n a
// multiple of kVec. A NaN m makes every y NaN.
inline float exp2_sub_sum(float* x, int64_t n, float m) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
  vfloat acc{};
  const vfloat vm = vsplat(m);
  for (int64_t i = 0; i < n; i += kVec) {
    const vfloat v = vload(x + i);
    const vfloat p = vexp2_nonpos(v - vm);
    vstore(x + i, p);
    acc += p;
  }
  return hsum(acc);
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = exp2_scalar(x[i] - m));
  return s;
#endif
}

// x[i] = 2^(x[i] - y[i]) (a per-column offset, e.g. each query's log-sum-exp); n a multiple of kVec.
// y = +inf gives 0.
inline void exp2_sub_cols(float* x, const float* y, int64_t n) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
  for (int64_t i = 0; i < n; i += kVec) vstore(x + i, vexp2(vload(x + i) - vload(y + i)));
#else
  for (int64_t i = 0; i < n; ++i) x[i] = exp2_scalar(x[i] - y[i]);
#endif
}

// max of x[0:n]; n a multiple of kVec.
inline float row_max(const float* x, int64_t n) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
  vfloat acc = vsplat(kNegInf);
  for (int64_t i = 0; i < n; i += kVec) {
    const vfloat v = vload(x + i);
    acc = v > acc ? v : acc;
  }
  float m = kNegInf;
  for (int i = 0; i < kVec; ++i) m = std::max(m, acc[i]);
  return m;
#else
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

// --------------------------------------------------------------------------------- micro-kernel
// For the MR rows r: C_r[c_off : c_off + NV*kVec] = rescale_r * C_r[...] (Accumulate) or 0,
// plus sum_k A_r[k] * B[k][0 : NV*kVec]. Rows are given by pointers (a[r], c[r]), so a kernel can
// run any subset of its rows; B is row-major with stride ldb.
template <int MR, int NV, bool Accumulate>
inline void micro_kernel(int64_t K, const float* const* a, const float* b, int64_t ldb, float* const* c,
                         int64_t c_off, const float* rescale) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
  vfloat acc[MR][NV];
  const float* ar[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    ar[r] = a[r];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = Accumulate ? vload(c[r] + c_off + j * kVec) * rescale[r] : vfloat{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    vfloat bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = vload(bk + j * kVec);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float x = ar[r][k];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] += x * bv[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vstore(c[r] + c_off + j * kVec, acc[r][j]);
#else
  constexpr int NR = NV * kVec;
  for (int r = 0; r < MR; ++r) {
    float acc[NR];
    for (int j = 0; j < NR; ++j) acc[j] = Accumulate ? c[r][c_off + j] * rescale[r] : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float x = a[r][k];
      const float* bk = b + k * ldb;
      for (int j = 0; j < NR; ++j) acc[j] += x * bk[j];
    }
    for (int j = 0; j < NR; ++j) c[r][c_off + j] = acc[j];
  }
#endif
}

template <int MR, bool Accumulate>
inline void micro_cols(int nv, int64_t K, const float* const* a, const float* b, int64_t ldb, float* const* c,
                       int64_t c_off, const float* rescale) {
  switch (nv) {
    case 4: micro_kernel<MR, 4, Accumulate>(K, a, b, ldb, c, c_off, rescale); break;
    case 3: micro_kernel<MR, 3, Accumulate>(K, a, b, ldb, c, c_off, rescale); break;
    case 2: micro_kernel<MR, 2, Accumulate>(K, a, b, ldb, c, c_off, rescale); break;
    default: micro_kernel<MR, 1, Accumulate>(K, a, b, ldb, c, c_off, rescale); break;
  }
}

// f(std::integral_constant<int, mr>{}) for a micro tile of mr = 1..6 rows (the row count as a
// template argument of the micro-kernels)
template <typename F>
inline void with_rows(int64_t mr, F&& f) {
  switch (mr) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    default: break;
  }
}

// C (rows x N, N a multiple of kVec; rows by pointer) = [rescale *] C + A (rows x K) . B (K x N).
template <bool Accumulate>
inline void gemm_rows(int64_t rows, int64_t N, int64_t K, const float* const* a, const float* b, int64_t ldb,
                      float* const* c, const float* rescale) {
  for (int64_t r = 0; r < rows; r += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, rows - r);
    for (int64_t c0 = 0; c0 < N; c0 += kNR) {
      const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - c0) / kVec));
      const float* bb = b + c0;
      const float* sc = rescale == nullptr ? nullptr : rescale + r;
      with_rows(mr, [&](auto m) { micro_cols<decltype(m)::value, Accumulate>(nv, K, a + r, bb, ldb, c + r, c0, sc); });
    }
  }
}

// ------------------------------------------------------------------------------ transposes
#if defined(__AVX512F__)
// In-place transpose of a 16 x 16 matrix of 32-bit words held in 16 registers.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // lane L of t[2i] / t[2i+1]: rows 2i, 2i+1 at columns 4L+{0,1} / 4L+{2,3}
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {  // lane L of u[4g + e]: rows 4g..4g+3 at column 4L + e
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {  // gather lane L of u[e], u[4+e], u[8+e], u[12+e] into row 4L + e
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), w0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD), w1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[4 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}
#endif

// dst[x * ldd + c] = src[c * lds + x] for c < rows, x < cols (32-bit elements). With AVX-512,
// 16 x 16 tiles in registers; a tile's rows past `rows` and columns past `cols` are not read
// (masked loads), and only x < cols rows and c < rows columns of dst are written.
inline void transpose_f32(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows, int64_t cols) {
#if defined(__AVX512F__)
  for (int64_t c0 = 0; c0 < rows; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, rows - c0);
    const __mmask16 cm = __mmask16((1u << cn) - 1);
    for (int64_t x0 = 0; x0 < cols; x0 += 16) {
      const int64_t xn = std::min<int64_t>(16, cols - x0);
      const __mmask16 xm = __mmask16((1u << xn) - 1);
      __m512i r[16];
      if (cn == 16 && xn == 16) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (c0 + i) * lds + x0);
      } else {
        for (int i = 0; i < 16; ++i)
          r[i] = i < cn ? _mm512_maskz_loadu_epi32(xm, src + (c0 + i) * lds + x0) : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r);
      for (int64_t j = 0; j < xn; ++j) {
        if (cn == 16) _mm512_storeu_si512(dst + (x0 + j) * ldd + c0, r[j]);
        else _mm512_mask_storeu_epi32(dst + (x0 + j) * ldd + c0, cm, r[j]);
      }
    }
  }
#else
  for (int64_t c0 = 0; c0 < rows; c0 += 16)  // 16 rows at a time: the reads stay in a few lines
    for (int64_t x = 0; x < cols; ++x)
      for (int64_t c = c0; c < std::min(rows, c0 + 16); ++c) dst[x * ldd + c] = src[c * lds + x];
#endif
}

// ---------------------------------------------------------------------------------- conversion
// dtype tags: 0 float32, 1 bfloat16, 2 float16
template <int DT>
struct Elem;
template <>
struct Elem<0> {
  using T = float;
  static float get(const T* p, int64_t i) { return p[i]; }
};
template <>
struct Elem<1> {
  using T = uint16_t;
  static float get(const T* p, int64_t i) { return bits_to_float(uint32_t(p[i]) << 16); }
};
template <>
struct Elem<2> {
  using T = uint16_t;
  static float get(const T* p, int64_t i) { return half_bits_to_float(p[i]); }
};

// dst[0:n] = float(src[0:n:stride]) * mul
template <int DT>
inline void load_row(float* dst, const typename Elem<DT>::T* src, int64_t n, int64_t stride, float mul) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = Elem<DT>::get(src, i) * mul;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = Elem<DT>::get(src, i * stride) * mul;
  }
}

// ------------------------------------------------------------------------ fixed 8-float vectors
// The decode kernel (decode_f32.h, decode_softmax.h) works on exactly 8 floats at a time on every
// target: its q . k tiles keep 8 accumulators of 8 lanes and reduce them together (hsum), and its
// results must not depend on how rows are found (a paged and a contiguous cache give the same
// bits). AVX-512 builds replace the float32 q . K^T and P . V loops by 16-lane ones
// (decode_f32_avx512.h; the softmax stays here). GNU vector types where the
// compiler has them (one 256-bit register with AVX, two 128-bit ones without), a plain array
// elsewhere. Separate names from the native-width `vfloat` above: with AVX the two are one type.
namespace v8 {

#ifdef SPARSE_ATTN_VECTOR_TYPES
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));
inline f8 load(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
#ifdef __AVX__
// a broadcast (vbroadcastss, from memory when x is): `f8{} + x` compiled to a scalar add of 0
// before the broadcast, one more instruction per splat in the P . V loop
inline f8 splat(float x) { return (f8)_mm256_set1_ps(x); }
#else
inline f8 splat(float x) { return f8{} + x; }
#endif
inline f8 zero() { return f8{}; }
// a > b ? a : b per lane: a NaN does not reliably survive a running max (callers that must see
// NaN look for it themselves, as decode_softmax.h does)
inline f8 max(f8 a, f8 b) { return a > b ? a : b; }
inline float lane(const f8& v, int i) { return v[i]; }
// 2^x per lane for the softmax's x <= 0 (exp2_scalar's polynomial; NaN stays NaN)
inline f8 exp2(f8 x) {
  x = x < splat(-127.0f) ? splat(-127.0f) : x;
  const f8 t = x + kMagic;
  const f8 n = t - kMagic;
  const f8 f = x - n;
  const i8 e = ((i8)t - (i8)splat(kMagic)) + 127;
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
inline f8 load(const float* p) {
  f8 v;
  std::memcpy(v.x, p, sizeof(v.x));
  return v;
}
inline void store(float* p, f8 v) { std::memcpy(p, v.x, sizeof(v.x)); }
inline f8 splat(float x) {
  f8 v;
  for (int i = 0; i < 8; ++i) v.x[i] = x;
  return v;
}
inline f8 zero() { return splat(0.f); }
inline f8 max(f8 a, const f8& b) {
  for (int i = 0; i < 8; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
  return a;
}
inline float lane(const f8& v, int i) { return v.x[i]; }
inline f8 exp2(f8 v) {
  for (int i = 0; i < 8; ++i) v.x[i] = exp2_scalar(v.x[i]);
  return v;
}
#endif

// 8 elements of dtype DT (0 float32, 1 bfloat16, 2 float16) -> float32, in registers
template <int DT>
inline f8 convert(const typename Elem<DT>::T* p);
template <>
inline f8 convert<0>(const float* p) {
  return load(p);
}
template <>
inline f8 convert<1>(const uint16_t* p) {
#ifdef SPARSE_ATTN_VECTOR_TYPES
#ifdef __AVX2__
  // one vpmovzxwd ymm from memory and a shift: GCC lowered the generic conversion below to two
  // 128-bit halves and an insert (6 instructions per 8 keys' elements on the decode's hot loops)
  return (f8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  h8 h;
  std::memcpy(&h, p, sizeof(h));
  return (f8)(__builtin_convertvector(h, i8) << 16);
#endif
#else
  f8 v;
  for (int i = 0; i < 8; ++i) v.x[i] = bits_to_float(uint32_t(p[i]) << 16);
  return v;
#endif
}
template <>
inline f8 convert<2>(const uint16_t* p) {
#if defined(__F16C__) && defined(SPARSE_ATTN_VECTOR_TYPES)
  return (f8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float t[8];
  for (int i = 0; i < 8; ++i) t[i] = half_bits_to_float(p[i]);
  return load(t);
#endif
}

// out[i] = sum of the lanes of v[i], i < 8 (a horizontal-add tree with AVX, lane sums elsewhere)
inline void hsum(const f8* v, float* out) {
#if defined(__AVX__) && defined(SPARSE_ATTN_VECTOR_TYPES)
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

}  // namespace v8

}  // namespace sparse_attn_cpu
