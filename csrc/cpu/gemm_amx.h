// Prefill products on AMX tiles: gemm_bf16 (vec_bf16.h) with the same operands, for the bfloat16
// path of block_sparse_fwd.cpp on a CPU with AMX-BF16 (Sapphire Rapids and later).
//
// The forward already packs its operands in the layouts the tiles take: Q rows as bf16 words (the
// A operand, 16 rows x 16 words per tile), the K block pair-packed (word p of key c at [p][c]: the
// B operand of S = Q . K^T), the probabilities as bf16 pairs (A of P . V) and the V block with rows
// 2p, 2p + 1 interleaved at [p] (B of P . V). So a product is, per group of 32 rows and 32 output
// columns: four C tiles (t0-t3, 16 rows x 16 floats each), for each 16-word chunk of the inner
// dimension two A loads (t4, t5), two B loads (t6, t7) and four tdpbf16ps, then the C tiles stored
// to a scratch and added to the rows (`Accumulate`: c = rescale * c + A . B) or written scaled
// (c = out_mul * A . B); a non-accumulating product with out_mul 1 into evenly spaced rows (the
// scores) is stored by the tiles straight into its rows. (One B tile reloaded for every product
// ran ~4x below the tiles' rate: each load waits for the product still reading the tile.)
//
// Operands that a tile cannot load where they sit go through a scratch: A rows that are not evenly
// spaced (TopK's per-token rows), a group of fewer rows than its tiles, or an inner dimension that
// is not a multiple of 16 words (D = 80; a block's last keys); the inner dimension's tail chunk of
// B is copied with zero rows past its end, so words past KW (stale rows of an earlier block) are
// never multiplied.
//
// Products: bf16 x bf16 exact, summed in float32 (the order differs from vdpbf16ps's: other bits,
// the same bounds; tests/test_cpu_prefill_amx.py checks both paths against the float64 oracle).
// The tile configuration (every tile 16 x 64 bytes, gemm_tiles) is loaded once per worker thread of
// a call and released when the thread finishes its tasks.
#pragma once

#include "cpu/amx.h"

#ifdef SPARSE_ATTN_AMX

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>

namespace sparse_attn_cpu {

inline TileConfig gemm_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.set(t, 16, 64);
  return c;
}

// per worker thread: A rows copied (32 x KW rounded up to 16 words), a B tail chunk (two 16 x 16
// word tiles) and the C read-back (32 rows x 32 floats)
struct GemmAmxScratch {
  std::unique_ptr<uint32_t[]> a;
  int64_t a_words = 0;
  alignas(64) uint32_t b[2 * 256];
  alignas(64) float c[32 * 32];
  uint32_t* a_rows(int64_t words) {
    if (words > a_words) a.reset(new uint32_t[words]), a_words = words;
    return a.get();
  }
  // every word NaN (tests: the forward's kept scratch, block_sparse_fwd.cpp)
  void poison() {
    std::fill(a.get(), a.get() + a_words, 0x7fc07fc0u);
    std::fill(std::begin(b), std::end(b), 0x7fc07fc0u);
    std::fill(std::begin(c), std::end(c), std::numeric_limits<float>::quiet_NaN());
  }
};

namespace amx_detail {

// C tile (m, n) = t(2m + n), A (row group m) = t(4 + m), B (column group n) = t(6 + n): per chunk of
// 16 inner words MT + NT loads and MT x NT products, no tile reloaded while a product reads it
// C stored to `cd` (rows `cs` bytes apart)
template <int MT, int NT>
__attribute__((always_inline)) inline void products(int64_t KW, const uint32_t* ap, int64_t as, const uint32_t* b,
                                                    int64_t ldb, GemmAmxScratch& x, float* cd, int64_t cs) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (MT > 1) _tile_zero(2);
  if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  for (int64_t k0 = 0; k0 < KW; k0 += 16) {
    const int64_t kw = std::min<int64_t>(16, KW - k0);
    const uint32_t* bp = b + k0 * ldb;
    int64_t bs = 4 * ldb, step = 16;
    if (kw < 16) {  // the tail chunk: its rows, then zero rows
      for (int t = 0; t < NT; ++t) {
        uint32_t* dst = x.b + 256 * t;
        for (int64_t i = 0; i < kw; ++i) std::memcpy(dst + 16 * i, bp + i * ldb + 16 * t, 64);
        std::memset(dst + 16 * kw, 0, 64 * (16 - kw));
      }
      bp = x.b, bs = 64, step = 256;
    }
    _tile_loadd(4, ap + k0, as);
    _tile_loadd(6, bp, bs);
    if constexpr (MT > 1) _tile_loadd(5, ap + 16 * (as / 4) + k0, as);
    if constexpr (NT > 1) _tile_loadd(7, bp + step, bs);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, cd, cs);
  if constexpr (NT > 1) _tile_stored(1, cd + 16, cs);
  if constexpr (MT > 1) _tile_stored(2, reinterpret_cast<char*>(cd) + 16 * cs, cs);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, reinterpret_cast<char*>(cd + 16) + 16 * cs, cs);
}

// the distance between rows p[0], p[1], ... p[n - 1] (in elements) where they are evenly spaced
// and ascending, else 0
template <typename T>
inline int64_t even_stride(T* const* p, int64_t n) {
  const int64_t ld = n > 1 && p[1] > p[0] ? p[1] - p[0] : 0;
  for (int64_t i = 2; i < n && ld != 0; ++i)
    if (p[i] != p[0] + i * ld) return 0;
  return ld;
}

}  // namespace amx_detail

// C (rows x N floats, N a multiple of 16; rows by pointer) = [rescale *] C + A . B over KW words of
// the inner dimension (A: rows of bf16 words by pointer; B: pair-packed, ldb words per row); a
// non-accumulating product is multiplied by out_mul. gemm_bf16's contract, on tiles configured by
// gemm_tiles(). Groups of 32 rows x 32 columns (2 x 2 tiles; 16 at the edges). A non-accumulating
// product with out_mul 1 into evenly spaced C rows is stored by the tiles where it goes (at D = 64
// the read-back through the scratch cost as much as the products: two 16-word chunks per tile).
template <bool Accumulate>
inline void gemm_amx(int64_t rows, int64_t N, int64_t KW, const uint32_t* const* a, const uint32_t* b, int64_t ldb,
                     float* const* c, const float* rescale, float out_mul, GemmAmxScratch& x) {
  const __m512 vmul = _mm512_set1_ps(out_mul);
  for (int64_t r0 = 0; r0 < rows; r0 += 32) {
    const int64_t mr = std::min<int64_t>(32, rows - r0);
    const int64_t mrows = mr > 16 ? 32 : 16;  // rows the tiles compute
    const uint32_t* const* ar = a + r0;
    // A where it sits: the tile rows evenly spaced, whole 16-word chunks; else copied (zero padded)
    const int64_t lda = mr == mrows && KW % 16 == 0 ? amx_detail::even_stride(ar, mrows) : 0;
    const bool even = lda != 0;
    const uint32_t* ap = ar[0];
    int64_t as = 4 * lda;
    if (!even) {
      const int64_t kwp = (KW + 15) / 16 * 16;
      uint32_t* dst = x.a_rows(32 * kwp);
      for (int64_t i = 0; i < mrows; ++i) {
        if (i < mr) std::memcpy(dst + i * kwp, ar[i], 4 * KW);
        std::memset(dst + i * kwp + (i < mr ? KW : 0), 0, 4 * (i < mr ? kwp - KW : kwp));
      }
      ap = dst, as = 4 * kwp;
    }
    // C where it goes: no rescale or scaling, the group's rows evenly spaced
    const int64_t ldc = !Accumulate && out_mul == 1.f && mr == mrows ? amx_detail::even_stride(c + r0, mrows) : 0;
    const bool direct = ldc != 0;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const int nt = N - n0 >= 32 ? 2 : 1;
      float* cd = direct ? c[r0] + n0 : x.c;
      const int64_t cs = direct ? 4 * ldc : 128;
      if (mrows == 32) {
        if (nt == 2) amx_detail::products<2, 2>(KW, ap, as, b + n0, ldb, x, cd, cs);
        else amx_detail::products<2, 1>(KW, ap, as, b + n0, ldb, x, cd, cs);
      } else {
        if (nt == 2) amx_detail::products<1, 2>(KW, ap, as, b + n0, ldb, x, cd, cs);
        else amx_detail::products<1, 1>(KW, ap, as, b + n0, ldb, x, cd, cs);
      }
      if (direct) continue;
      for (int64_t i = 0; i < mr; ++i) {
        float* dst = c[r0 + i] + n0;
        const float* src = x.c + 32 * i;
        if constexpr (Accumulate) {
          const __m512 s = _mm512_set1_ps(rescale != nullptr ? rescale[r0 + i] : 1.f);
          for (int t = 0; t < nt; ++t) {
            const __m512 old = _mm512_loadu_ps(dst + 16 * t);
            _mm512_storeu_ps(dst + 16 * t, _mm512_fmadd_ps(s, old, _mm512_loadu_ps(src + 16 * t)));
          }
        } else {
          for (int t = 0; t < nt; ++t)
            _mm512_storeu_ps(dst + 16 * t, _mm512_mul_ps(vmul, _mm512_loadu_ps(src + 16 * t)));
        }
      }
    }
  }
}

}  // namespace sparse_attn_cpu

#endif  // SPARSE_ATTN_AMX
