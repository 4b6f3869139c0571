// bfloat16 dot-product building blocks on Arm (Armv8.6 BF16 / FEAT_BF16: `bfdot`), with the
// interface of vec_bf16.h's AVX-512 BF16 version, so every kernel's bf16 path runs unchanged.
//
// `bfdot v, a, b` does, per 32-bit lane i of 4:  v[i] += a[2i] * b[2i] + a[2i + 1] * b[2i + 1]
// — the same pair semantics as x86's `vdpbf16ps` on a quarter of the width. So the same
// "pair-packed" B layout (word [p][n] = (B[2p][n], B[2p + 1][n])) feeds it, and A's row is read as
// 32-bit words (one word = the pair (A[r][2p], A[r][2p + 1])), broadcast to the 4 lanes (`ld1r`).
// Non-extended BFDOT (FPCR.EBF = 0, the Linux default) flushes denormals and rounds the pair sum
// to odd before the accumulation: an error of the order of float32's rounding, far inside the
// contract's bfloat16 bound.
//
// Micro tile: 6 rows x 16 columns = 24 accumulators + 4 B vectors + 1 broadcast of the 32 NEON
// registers. Included by vec_bf16.h only when the target has BF16 (-march=...+bf16).
#pragma once

#include <arm_neon.h>

#include "cpu/vec.h"

#define SPARSE_ATTN_BF16_DOT 1

namespace sparse_attn_cpu {

constexpr int kMRb = 6;  // rows of a micro tile
constexpr int kNVb = 4;  // float32x4 vectors per row: 16 columns
// floats per accumulator vector: gemm_bf16's N need only be a multiple of 4 here (the kernels pad
// their column counts to vec.h's kVec, 4 on Arm, not 16 as on every x86 target with bf16)
constexpr int kLanesBf16 = 4;

inline bfloat16x8_t words_as_bf16(uint32x4_t x) { return vreinterpretq_bf16_u32(x); }

// C_r[c_off : c_off + 4 NV] = (Accumulate ? rescale_r * C_r : 0) + sum_p A_r.word[p] (x) B[p],
// multiplied by out_mul when not accumulating (as vec_bf16.h's AVX-512 micro_bf16).
template <int MR, int NV, bool Accumulate>
inline void micro_bf16(int64_t KP, const uint32_t* const* a, const uint32_t* b, int64_t ldb, float* const* c,
                       int64_t c_off, const float* rescale, float out_mul) {
  float32x4_t acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      acc[r][j] = Accumulate ? vmulq_n_f32(vld1q_f32(c[r] + c_off + 4 * j), rescale[r]) : vdupq_n_f32(0.f);
  const uint32_t* ar[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) ar[r] = a[r];
  for (int64_t p = 0; p < KP; ++p) {
    const uint32_t* bp = b + p * ldb;
    bfloat16x8_t bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = words_as_bf16(vld1q_u32(bp + 4 * j));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const bfloat16x8_t x = words_as_bf16(vld1q_dup_u32(ar[r] + p));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = vbfdotq_f32(acc[r][j], x, bv[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      vst1q_f32(c[r] + c_off + 4 * j, Accumulate ? acc[r][j] : vmulq_n_f32(acc[r][j], out_mul));
}

// (gemm_bf16, pack_k_pairs and copy_words, shared with x86, are at the end of vec_bf16.h.)

// In-place transpose of a 4 x 4 block of 32-bit words.
inline void transpose4x4_u32(uint32x4_t r[4]) {
  const uint32x4_t t0 = vtrn1q_u32(r[0], r[1]), t1 = vtrn2q_u32(r[0], r[1]);
  const uint32x4_t t2 = vtrn1q_u32(r[2], r[3]), t3 = vtrn2q_u32(r[2], r[3]);
  r[0] = vreinterpretq_u32_u64(vtrn1q_u64(vreinterpretq_u64_u32(t0), vreinterpretq_u64_u32(t2)));
  r[1] = vreinterpretq_u32_u64(vtrn1q_u64(vreinterpretq_u64_u32(t1), vreinterpretq_u64_u32(t3)));
  r[2] = vreinterpretq_u32_u64(vtrn2q_u64(vreinterpretq_u64_u32(t0), vreinterpretq_u64_u32(t2)));
  r[3] = vreinterpretq_u32_u64(vtrn2q_u64(vreinterpretq_u64_u32(t1), vreinterpretq_u64_u32(t3)));
}

// Pair-pack a block of rows for a product with its transpose (S = Q . K^T, ...): kp[w * ld + c] =
// word w (elements 2w, 2w + 1; a missing odd element is 0) of row c, for c < nk, w < ceil(D / 2);
// rows nk .. round_up(nk, 4) get zeros (x86 pads to 16, its vector width; here the callers' leading
// dimension `ld` is only a multiple of vec.h's kVec = 4, so 16 could run past it). Contiguous rows
// of even D: 4 x 4 word tiles transposed in registers; otherwise element by element.
template <typename RowFn>
inline void pack_k_pairs_rows(uint32_t* kp, int64_t ld, RowFn row, int64_t col_stride, int64_t nk, int64_t D) {
  const int64_t Dw = (D + 1) / 2;
  const int64_t padded = round_up(nk, 4);
  if (col_stride != 1 || D % 2 != 0) {
    for (int64_t c = 0; c < padded; ++c)
      for (int64_t w = 0; w < Dw; ++w) {
        const uint16_t* r = c < nk ? row(c) : nullptr;
        const uint32_t lo = c < nk ? r[2 * w * col_stride] : 0u;
        const uint32_t hi = c < nk && 2 * w + 1 < D ? r[(2 * w + 1) * col_stride] : 0u;
        kp[w * ld + c] = lo | hi << 16;
      }
    return;
  }
  for (int64_t c0 = 0; c0 < padded; c0 += 4) {
    const int64_t kn = std::max<int64_t>(0, std::min<int64_t>(4, nk - c0));
    const uint32_t* src[4];
    for (int i = 0; i < 4; ++i) src[i] = i < kn ? reinterpret_cast<const uint32_t*>(row(c0 + i)) : nullptr;
    int64_t w0 = 0;
    for (; w0 + 4 <= Dw; w0 += 4) {
      uint32x4_t r[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) r[i] = src[i] != nullptr ? vld1q_u32(src[i] + w0) : vdupq_n_u32(0u);
      transpose4x4_u32(r);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) vst1q_u32(kp + (w0 + j) * ld + c0, r[j]);
    }
    for (; w0 < Dw; ++w0)
      for (int i = 0; i < 4; ++i) {
        uint32_t word = 0u;
        if (src[i] != nullptr) std::memcpy(&word, src[i] + w0, sizeof(word));  // rows are only 2-byte aligned
        kp[w0 * ld + c0 + i] = word;
      }
  }
}

// dst[0 : n/2] words = bf16(src[0 : n]) pairs, rounded to nearest even (`bfcvtn`); n even (the
// callers' counts are multiples of kVec = 4)
inline void floats_to_bf16_pairs(uint32_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const bfloat16x8_t h = vcvtq_high_bf16_f32(vcvtq_low_bf16_f32(vld1q_f32(src + i)), vld1q_f32(src + i + 4));
    vst1q_u32(dst + i / 2, vreinterpretq_u32_bf16(h));
  }
  for (; i + 4 <= n; i += 4) vst1_u32(dst + i / 2, vreinterpret_u32_bf16(vcvt_bf16_f32(vld1q_f32(src + i))));
  for (; i + 2 <= n; i += 2) {
    const float32x4_t x = {src[i], src[i + 1], 0.f, 0.f};
    dst[i / 2] = vget_lane_u32(vreinterpret_u32_bf16(vcvt_bf16_f32(x)), 0);
  }
}

// Pair-pack rows r0 and r1 (bf16, n elements `stride` apart; r1 may be null = zeros) into n words:
// dst[i] = (r0[i], r1[i]).
inline void interleave_bf16_rows(uint32_t* dst, const uint16_t* r0, const uint16_t* r1, int64_t n, int64_t stride = 1) {
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i)
      dst[i] = uint32_t(r0[i * stride]) | (r1 != nullptr ? uint32_t(r1[i * stride]) << 16 : 0u);
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint16x8_t x = vld1q_u16(r0 + i);
    const uint16x8_t y = r1 != nullptr ? vld1q_u16(r1 + i) : vdupq_n_u16(0);
    vst1q_u16(reinterpret_cast<uint16_t*>(dst + i), vzip1q_u16(x, y));
    vst1q_u16(reinterpret_cast<uint16_t*>(dst + i + 4), vzip2q_u16(x, y));
  }
  for (; i < n; ++i) dst[i] = uint32_t(r0[i]) | (r1 != nullptr ? uint32_t(r1[i]) << 16 : 0u);
}

}  // namespace sparse_attn_cpu
