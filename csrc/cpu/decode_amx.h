// bfloat16 decode products on AMX tiles (Intel Sapphire Rapids and later: AMX-TILE, AMX-BF16).
//
// decode_bf16.h multiplies with vdpbf16ps: per key and query row D / 32 dot products plus a share
// of a reduction tree, per key pair and row Dv / 16 products. Here the same products run on tiles,
// with K and V read as they sit in the cache (no packing, no stores of K / V):
//   scores:  C[16 keys x R] += K[16 keys x 32 dims] . Q^T[32 dims x R], one tdpbf16ps per 32 dims.
//            The 16 K rows are the A operand, one tile load at the row stride where they are evenly
//            spaced (a contiguous tensor, or 16 keys inside one page), else copied to a 16-row
//            scratch. q, transposed into pairs (the B layout: row i = dims 2i, 2i + 1 of every
//            query row), stays in tiles over the segment. C is stored and read back per query row
//            by a gather (the transpose to s[r][j]).
//   P . V:   B = 16 V rows x 32 columns as they sit (a row's 16 words are column pairs, not key
//            pairs). With A = P spread to the even halves of the pairs, (p_j, 0), the product sums
//            p_j v_j[2n] into column n of C; with (0, p_j), p_j v_j[2n + 1]: two products per B tile,
//            half of the tile unit's multiplies wasted, against the vpermt2w interleave of V rows
//            and its stores that a key-pair B layout needs (measured: that interleave took ~45% of
//            the kernel's time, which left the tiles slower than decode_bf16.h). The even / odd
//            columns are merged with two permutes per 32 columns when a sub-segment's C is added to
//            corr * out.
// Each sub-segment's P . V starts from zero tiles and is added to corr * out afterwards, so a run
// of segments gives the same bits as the segments one at a time (paged == contiguous). The bits
// differ from decode_bf16.h's (another order of the float32 sums): within the contract's bounds,
// tested against the float64 oracle with the tiles on and off (tests/test_cpu_decode_amx.py).
//
// Two tile configurations per pass of R <= 16 query rows (qk_tiles, pv_tiles; ~60 ns to load),
// released at the end of the segment, so no tile state outlives a call. Linux gives a process AMX
// tiles only after arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): asked once (amx_permitted); refused,
// the kernel keeps decode_bf16.h's products. Off at run time with SPARSE_ATTN_CPU_AMX=0 or
// set_amx(False) (tests, A/B runs). Measured (one core of a 2-core Sapphire Rapids VM, Hq 32,
// Hkv 8, D 128, contiguous cache, marginal ns per key and kv head): ~15 against ~30 with the cache
// in L2, ~30 against ~35 from L3, where both wait on memory (docs/kernel_guide.md).
#pragma once

#include "cpu/amx.h"

#ifdef SPARSE_ATTN_AMX

#include <algorithm>
#include <cstring>
#include <memory>

namespace sparse_attn_cpu {

// q . K^T for r query rows: t0 scores C (16 keys x r), t1 a K chunk (A, 16 keys x 32 dims), t2-t5
// the q chunks (B, 32 dims x r), resident over the segment
inline TileConfig qk_tiles(int r) {
  TileConfig c;
  c.set(0, 16, 4 * r), c.set(1, 16, 64);
  for (int t = 2; t < 6; ++t) c.set(t, 16, 4 * r);
  return c;
}

// P . V for r query rows: t0-t3 C (r x 16 columns: even and odd columns of two 32-column chunks),
// t4 / t5 P spread to the even / odd halves of the pairs (A, r x 16 keys), t6 / t7 V (B, 16 keys x
// 32 columns, as the rows sit in the cache)
inline TileConfig pv_tiles(int r) {
  TileConfig c;
  for (int t = 0; t < 6; ++t) c.set(t, r, 64);
  c.set(6, 16, 64), c.set(7, 16, 64);
  return c;
}

// scratch without zero-fill (every word is written before it is read)
template <typename T>
struct Buffer {
  std::unique_ptr<T[]> p;
  int64_t n = 0;
  T* get(int64_t need) {
    if (need > n) p.reset(new T[need]), n = need;
    return p.get();
  }
};

// the scratch of a split: q chunks in the B layout, a 16-row K / V copy, the C read-back, P spread
struct AmxScratch {
  Buffer<uint32_t> qb, pe, po;
  Buffer<uint16_t> rc;
  Buffer<float> cb;
};

// q rows r < R (bf16 words, DC * 16 words each) into the B layout: qb[(16 c + i) R + r] = q_r's word
// 16 c + i (dims 32 c + 2i, 32 c + 2i + 1)
inline void q_tiles(uint32_t* qb, const uint32_t* const* q, int R, int DC) {
  for (int c = 0; c < DC; ++c)
    for (int i = 0; i < 16; ++i)
      for (int r = 0; r < R; ++r) qb[(16 * c + i) * R + r] = q[r][16 * c + i];
}

// the 16 rows of keys j0.. as one tile operand: (base, stride) in the cache where the rows are
// evenly spaced and all below n, else copied to rc (`bytes` each; rows past n: `tail_zero` ? zeros
// : row n - 1)
template <typename Rows>
__attribute__((always_inline)) inline const char* tile_rows(Rows row, int64_t j0, int64_t n, int64_t bytes,
                                                            uint16_t* rc, bool tail_zero, int64_t& stride) {
  const char* base = reinterpret_cast<const char*>(row(j0));
  bool even = j0 + 16 <= n;
  if (even) {
    stride = reinterpret_cast<const char*>(row(j0 + 1)) - base;
    for (int i = 2; i < 16 && even; ++i) even = reinterpret_cast<const char*>(row(j0 + i)) == base + i * stride;
  }
  if (even) return base;
  char* dst = reinterpret_cast<char*>(rc);
  for (int64_t i = 0; i < 16; ++i) {
    if (j0 + i < n) std::memcpy(dst + i * bytes, row(j0 + i), bytes);
    else if (tail_zero) std::memset(dst + i * bytes, 0, bytes);
    else std::memcpy(dst + i * bytes, row(n - 1), bytes);
  }
  stride = bytes;
  return dst;
}

// A K / V tile (16 rows at `stride`) into tile 1 / 6 / 7: with the non-temporal hint (tileloaddt1)
// where the caller reads these rows once (`once`: one pass of <= 16 query rows). Measured (Dense,
// 128K keys, bf16, 2 threads, each call after emptying the L3, one process, 11-15 rounds): 0.8-1.4%
// faster contiguous, 1.9-3.1% over vLLM's page layout; with 16K keys in L3, one thread: 0.99-1.01x.
// The same bits either way (a hint on where the line is kept, nothing else).
__attribute__((always_inline)) inline void k_tile(const char* base, int64_t stride, bool once) {
  if (once) _tile_stream_loadd(1, base, stride);
  else _tile_loadd(1, base, stride);
}

// s[r][0 : round_up(nk, 16)) = mul * (q_r . k_j), r < R, the q rows in the B layout (q_tiles), the
// tiles configured by qk_tiles(R); keys past nk repeat key nk - 1 (finite scores the caller masks).
// krow(j): key j's row of DC * 32 bf16 words. ahead(j) is called for each key pair j, j + 1. once:
// these K rows are read by this pass only (k_tile's hint).
template <int DC, typename Rows, typename Ahead>
inline void qk_amx(int64_t nk, int R, const uint32_t* qb, Rows krow, float* const* s, float mul, uint16_t* rc,
                   float* cb, Ahead&& ahead, bool once) {
  const __m512 vmul = _mm512_set1_ps(mul);
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(16));
  const int64_t qs = 4 * R;  // bytes of a q tile row
  if constexpr (DC <= 4) {  // q resident in t2 .. t(1 + DC)
    _tile_loadd(2, qb, qs);
    if constexpr (DC >= 2) _tile_loadd(3, qb + 16 * R, qs);
    if constexpr (DC >= 4) {
      _tile_loadd(4, qb + 32 * R, qs);
      _tile_loadd(5, qb + 48 * R, qs);
    }
  }
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    int64_t stride;
    const char* base = tile_rows(krow, j0, nk, 64 * DC, rc, false, stride);
    _tile_zero(0);
    if constexpr (DC <= 4) {
      k_tile(base, stride, once);
      _tile_dpbf16ps(0, 1, 2);
      if constexpr (DC >= 2) {
        k_tile(base + 64, stride, once);
        _tile_dpbf16ps(0, 1, 3);
      }
      if constexpr (DC >= 4) {
        k_tile(base + 128, stride, once);
        _tile_dpbf16ps(0, 1, 4);
        k_tile(base + 192, stride, once);
        _tile_dpbf16ps(0, 1, 5);
      }
    } else {  // D = 256: the q chunks reloaded
#pragma GCC unroll 8
      for (int c = 0; c < DC; ++c) {
        k_tile(base + 64 * c, stride, once);
        _tile_loadd(2, qb + 16 * c * R, qs);
        _tile_dpbf16ps(0, 1, 2);
      }
    }
    for (int m = 0; m < 8; ++m) ahead(j0 + 2 * m);
    _tile_stored(0, cb, 64);
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(s[r] + j0, _mm512_mul_ps(_mm512_i32gather_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(r)), cb, 4), vmul));
  }
}

// P rows (floats, keys [0, nk)) into the two A layouts of P . V: pe[j] = (bf16(p_j), 0), po[j] =
// (0, bf16(p_j)) (round to nearest even, as floats_to_bf16_pairs), zero for keys nk .. round_up(nk, 16)
inline void spread_p(uint32_t* pe, uint32_t* po, const float* p, int64_t nk) {
  for (int64_t j = 0; j < nk; j += 16) {
    const __mmask16 m = nk - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nk - j)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p + j));
    const __m512i e = _mm512_maskz_cvtepu16_epi32(m, (__m256i)h);
    _mm512_storeu_si512(pe + j, e);
    _mm512_storeu_si512(po + j, _mm512_slli_epi32(e, 16));
  }
}

// o_r[0 : Dv) = corr_r * o_r + sum_{j < n} p_r,j v_j, r < R, the tiles configured by pv_tiles(R).
// P spread (spread_p) rows `pstride` bytes apart from pe / po, zero from key n to round_up(n, 16);
// vrow(j): key j's V row, Dv bf16 words (Dv a multiple of 32), loaded as the B operand as it sits
// (16 keys x 32 columns: the pair halves are two columns, so P's even / odd spreads give the even
// / odd columns); a group past n or across pages is copied to rc with zero rows past n. cb: R x 64.
// ahead(j) is called for each key pair j, j + 1 in the first 64 columns' pass. once: these V rows
// are read by this pass only (k_tile's hint).
template <typename Rows, typename Ahead>
inline void pv_amx(int64_t n, int R, int64_t Dv, const uint32_t* pe, const uint32_t* po, int64_t pstride, Rows vrow,
                   uint16_t* rc, float* const* o, const float* corr, float* cb, Ahead&& ahead, bool once) {
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_add_epi32(ilo, _mm512_set1_epi32(8));
  for (int64_t c0 = 0; c0 < Dv; c0 += 64) {
    const bool two = c0 + 64 <= Dv;  // two 32-column chunks, else one (Dv % 64 == 32)
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      int64_t stride;
      const char* base = tile_rows(vrow, j0, n, 2 * Dv, rc, true, stride) + 2 * c0;
      if (c0 == 0)
        for (int m = 0; m < 8; ++m) ahead(j0 + 2 * m);
      _tile_loadd(4, pe + j0, pstride);
      _tile_loadd(5, po + j0, pstride);
      if (once) _tile_stream_loadd(6, base, stride);  // k_tile's hint
      else _tile_loadd(6, base, stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      if (two) {
        if (once) _tile_stream_loadd(7, base + 64, stride);
        else _tile_loadd(7, base + 64, stride);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, cb, 256);
    _tile_stored(1, cb + 16, 256);
    if (two) {
      _tile_stored(2, cb + 32, 256);
      _tile_stored(3, cb + 48, 256);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 c = _mm512_set1_ps(corr[r]);
      for (int q = 0; q < (two ? 2 : 1); ++q) {
        const __m512 e = _mm512_loadu_ps(cb + 64 * r + 32 * q), od = _mm512_loadu_ps(cb + 64 * r + 32 * q + 16);
        float* d = o[r] + c0 + 32 * q;
        _mm512_storeu_ps(d, _mm512_fmadd_ps(c, _mm512_loadu_ps(d), _mm512_permutex2var_ps(e, ilo, od)));
        _mm512_storeu_ps(d + 16, _mm512_fmadd_ps(c, _mm512_loadu_ps(d + 16), _mm512_permutex2var_ps(e, ihi, od)));
      }
    }
  }
}

}  // namespace sparse_attn_cpu

#endif  // SPARSE_ATTN_AMX
