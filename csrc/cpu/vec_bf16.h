// bfloat16 dot-product building blocks of the CPU kernels (AVX-512 BF16, `vdpbf16ps`).
//
// `vdpbf16ps` multiplies 32 bf16 pairs and adds each pair's two products into one float32 lane:
//   acc[i] += a[2i] * b[2i] + a[2i + 1] * b[2i + 1]        (i = 0..15, products exact, fp32 sums)
// So a matrix product C (rows x N) += A (rows x K) . B (K x N) runs over K in pairs: A's row r is
// read as 32-bit words (two consecutive bf16 along K, i.e. a plain bf16 row), and B is "pair-packed":
// word [p][n] holds (B[2p][n], B[2p + 1][n]). For S = Q . K^T that packing of B = K^T is a 32-bit
// transpose of the K block (word p of key row n); for O = P . V it interleaves V rows 2p and 2p + 1.
//
// Everything here exists only when the compiler targets AVX-512 BF16 (-march=native on such a CPU
// in the JIT build), or Arm's BF16 extension (vec_bf16_neon.h: `bfdot` has the same pair semantics
// on 4 lanes, so the same packed layouts feed it): SPARSE_ATTN_BF16_DOT is then defined and the
// kernels use these paths for bfloat16 inputs; otherwise they convert bf16 to float32 and use
// vec.h's float32 kernel.
#pragma once

#include "cpu/vec.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(SPARSE_ATTN_NO_BF16_DOT)
#define SPARSE_ATTN_BF16_DOT 1
#include <immintrin.h>

namespace sparse_attn_cpu {

// 6 x 4 tile: 24 accumulators + 4 B vectors + 1 broadcast of the 32 zmm registers
constexpr int kMRb = 6;
constexpr int kNVb = 4;
constexpr int kLanesBf16 = 16;  // floats per accumulator vector

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// C_r[c_off : c_off + 16 NV] = (Accumulate ? rescale_r * C_r : 0) + sum_p A_r.word[p] (x) B[p],
// scaled by out_mul when not accumulating. A rows by pointer (32-bit words = bf16 pairs), B
// pair-packed with a stride of ldb words.
template <int MR, int NV, bool Accumulate>
inline void micro_bf16(int64_t KP, const uint32_t* const* a, const uint32_t* b, int64_t ldb, float* const* c,
                       int64_t c_off, const float* rescale, float out_mul) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[r][j] = Accumulate ? _mm512_mul_ps(_mm512_loadu_ps(c[r] + c_off + 16 * j), _mm512_set1_ps(rescale[r]))
                             : _mm512_setzero_ps();
  const uint32_t* ar[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ar[r] = a[r];
  for (int64_t p = 0; p < KP; ++p) {
    const uint32_t* bp = b + p * ldb;
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = as_bh(_mm512_loadu_si512(bp + 16 * j));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(ar[r][p])));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, bv[j]);
    }
  }
  const __m512 mul = _mm512_set1_ps(out_mul);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      _mm512_storeu_ps(c[r] + c_off + 16 * j, Accumulate ? acc[r][j] : _mm512_mul_ps(acc[r][j], mul));
}

// Pair-pack a block of rows for a product with its transpose (S = Q . K^T, dP = dO . V^T, ...):
// kp[w * ld + c] = word w (elements 2w, 2w + 1; a missing odd element is 0) of row c, for rows
// c < nk and w < ceil(D / 2); rows nk .. round_up(nk, 16) get zeros. `row(c)` is where row c
// starts, `col_stride` the distance between its elements. Contiguous rows of even D: 16 x 16 word
// tiles transposed in registers; otherwise element by element.
template <typename RowFn>
inline void pack_k_pairs_rows(uint32_t* kp, int64_t ld, RowFn row, int64_t col_stride, int64_t nk, int64_t D) {
  const int64_t Dw = (D + 1) / 2;
  if (col_stride != 1 || D % 2 != 0) {
    for (int64_t c = 0; c < round_up(nk, 16); ++c)
      for (int64_t w = 0; w < Dw; ++w) {
        const uint16_t* r = c < nk ? row(c) : nullptr;
        const uint32_t lo = c < nk ? r[2 * w * col_stride] : 0u;
        const uint32_t hi = c < nk && 2 * w + 1 < D ? r[(2 * w + 1) * col_stride] : 0u;
        kp[w * ld + c] = lo | hi << 16;
      }
    return;
  }
  for (int64_t c0 = 0; c0 < nk; c0 += 16) {
    const int64_t kn = std::min<int64_t>(16, nk - c0);
    for (int64_t w0 = 0; w0 < Dw; w0 += 16) {
      const int64_t wn = std::min<int64_t>(16, Dw - w0);
      const __mmask16 wm = wn == 16 ? __mmask16(0xffff) : __mmask16((1u << wn) - 1);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < kn ? _mm512_maskz_loadu_epi32(wm, row(c0 + i) + 2 * w0) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int64_t j = 0; j < wn; ++j) _mm512_storeu_si512(kp + (w0 + j) * ld + c0, r[j]);
    }
  }
}

// dst[0 : n/2] words = bf16(src[0 : n]) pairs, round to nearest even; n a multiple of 16
inline void floats_to_bf16_pairs(uint32_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i / 2), (__m256i)h);
  }
}

// Pair-pack rows r0 and r1 (bf16, n elements `stride` apart; r1 may be null = zeros) into n
// words: dst[i] = (r0[i], r1[i]).
inline void interleave_bf16_rows(uint32_t* dst, const uint16_t* r0, const uint16_t* r1, int64_t n, int64_t stride = 1) {
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i)
      dst[i] = uint32_t(r0[i * stride]) | (r1 != nullptr ? uint32_t(r1[i * stride]) << 16 : 0u);
    return;
  }
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i x = _mm512_loadu_si512(r0 + i);
    const __m512i y = r1 != nullptr ? _mm512_loadu_si512(r1 + i) : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi16(x, lo_idx, y));
    _mm512_storeu_si512(dst + i + 16, _mm512_permutex2var_epi16(x, hi_idx, y));
  }
  for (; i < n; ++i) dst[i] = uint32_t(r0[i]) | (r1 != nullptr ? uint32_t(r1[i]) << 16 : 0u);
}

}  // namespace sparse_attn_cpu

#endif  // AVX-512 BF16

#if !defined(SPARSE_ATTN_BF16_DOT) && defined(__aarch64__) && defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC) && \
    !defined(SPARSE_ATTN_NO_BF16_DOT)
#include "cpu/vec_bf16_neon.h"  // the same interface with Arm's bfdot
#endif

#ifdef SPARSE_ATTN_BF16_DOT
// What the two instruction sets share, over their micro_bf16 (kLanesBf16 floats per vector).
namespace sparse_attn_cpu {

template <int MR, bool Accumulate>
inline void micro_bf16_cols(int nv, int64_t KP, const uint32_t* const* a, const uint32_t* b, int64_t ldb,
                            float* const* c, int64_t c_off, const float* rescale, float out_mul) {
  switch (nv) {
    case 4: micro_bf16<MR, 4, Accumulate>(KP, a, b, ldb, c, c_off, rescale, out_mul); break;
    case 3: micro_bf16<MR, 3, Accumulate>(KP, a, b, ldb, c, c_off, rescale, out_mul); break;
    case 2: micro_bf16<MR, 2, Accumulate>(KP, a, b, ldb, c, c_off, rescale, out_mul); break;
    default: micro_bf16<MR, 1, Accumulate>(KP, a, b, ldb, c, c_off, rescale, out_mul); break;
  }
}

// C (rows x N floats, N a multiple of kLanesBf16; rows by pointer) = [rescale *] C + A . B over KP
// pairs of the inner dimension (A: bf16 rows read as words, B: pair-packed, ldb words per pair); a
// non-accumulating product is multiplied by out_mul.
template <bool Accumulate>
inline void gemm_bf16(int64_t rows, int64_t N, int64_t KP, const uint32_t* const* a, const uint32_t* b, int64_t ldb,
                      float* const* c, const float* rescale, float out_mul = 1.f) {
  for (int64_t r = 0; r < rows; r += kMRb) {
    const int64_t mr = std::min<int64_t>(kMRb, rows - r);
    const float* sc = rescale == nullptr ? nullptr : rescale + r;
    for (int64_t c0 = 0; c0 < N; c0 += kLanesBf16 * kNVb) {
      const int nv = static_cast<int>(std::min<int64_t>(kNVb, (N - c0) / kLanesBf16));
      with_rows(mr, [&](auto m) {
        micro_bf16_cols<decltype(m)::value, Accumulate>(nv, KP, a + r, b + c0, ldb, c + r, c0, sc, out_mul);
      });
    }
  }
}

// pack_k_pairs_rows for rows `row_stride` elements apart from k
inline void pack_k_pairs(uint32_t* kp, int64_t ld, const uint16_t* k, int64_t row_stride, int64_t col_stride,
                         int64_t nk, int64_t D) {
  pack_k_pairs_rows(kp, ld, [=](int64_t c) { return k + c * row_stride; }, col_stride, nk, D);
}

// One bf16 row (n elements, `stride` apart) as ceil(n / 2) words, a missing odd element 0.
inline void copy_words(uint32_t* dst, const uint16_t* src, int64_t n, int64_t stride) {
  if (stride == 1 && n % 2 == 0) {
    std::memcpy(dst, src, n * sizeof(uint16_t));
    return;
  }
  for (int64_t w = 0; w < (n + 1) / 2; ++w)
    dst[w] = uint32_t(src[2 * w * stride]) | (2 * w + 1 < n ? uint32_t(src[(2 * w + 1) * stride]) << 16 : 0u);
}

}  // namespace sparse_attn_cpu
#endif  // SPARSE_ATTN_BF16_DOT
