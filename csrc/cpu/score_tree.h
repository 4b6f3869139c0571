// The reduction tree of the direct q . K^T products (decode_bf16.h: float, decode_int8.h: int32):
// each key leaves one 16-lane vector of partial sums, and 16 keys' vectors become their 16 scores,
// in key order, in 15 adds. The first two levels stay inside 128-bit blocks (unpack + add), the
// last two cross them. An earlier tree that crossed blocks at its first level (two shuffles per
// key pair) made the int8 q . K^T ~9% slower (7.4 against 6.8 ns per key for 4 query rows at
// D = 128, one Zen 4 core, a stand-alone harness).
//   score_pair(a, b): keys a, b -> per block (a, b, a, b), each the sum of two of that key's four
//                     partial sums in the block (the vector a key pair stores, level 1);
//   score_16(t):      the 8 pair vectors of keys 0..15 -> lane L = key L's whole sum (levels 2-4).
// For floats the order of the adds is part of the result's bits: both overloads add in the same
// order, so a paged and a contiguous cache (same keys, same segments) give the same scores.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <type_traits>

namespace sparse_attn_cpu {

__attribute__((always_inline)) inline __m512i score_pair(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
__attribute__((always_inline)) inline __m512 score_pair(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}

namespace detail {
template <typename V, typename Add, typename Lo, typename Hi, typename Shuf>
__attribute__((always_inline)) inline V score_16(const V* t, Add add, Lo lo64, Hi hi64, Shuf shuf) {
  V g[4];
  for (int i = 0; i < 4; ++i)  // level 2, inside each block: keys 4i .. 4i + 3, the block's share of each
    g[i] = add(lo64(t[2 * i], t[2 * i + 1]), hi64(t[2 * i], t[2 * i + 1]));
  // levels 3 and 4, across blocks: block i <- keys 4i .. 4i + 3, whole sums
  const V h01 = add(shuf(g[0], g[1], std::integral_constant<int, 0x88>{}), shuf(g[0], g[1], std::integral_constant<int, 0xDD>{}));
  const V h23 = add(shuf(g[2], g[3], std::integral_constant<int, 0x88>{}), shuf(g[2], g[3], std::integral_constant<int, 0xDD>{}));
  return add(shuf(h01, h23, std::integral_constant<int, 0x88>{}), shuf(h01, h23, std::integral_constant<int, 0xDD>{}));
}
}  // namespace detail

__attribute__((always_inline)) inline __m512i score_16(const __m512i* t) {
  return detail::score_16(
      t, [](__m512i x, __m512i y) { return _mm512_add_epi32(x, y); },
      [](__m512i x, __m512i y) { return _mm512_unpacklo_epi64(x, y); },
      [](__m512i x, __m512i y) { return _mm512_unpackhi_epi64(x, y); },
      [](__m512i x, __m512i y, auto imm) { return _mm512_shuffle_i32x4(x, y, decltype(imm)::value); });
}
__attribute__((always_inline)) inline __m512 score_16(const __m512* t) {
  return detail::score_16(
      t, [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); },
      [](__m512 x, __m512 y) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); },
      [](__m512 x, __m512 y) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); },
      [](__m512 x, __m512 y, auto imm) { return _mm512_shuffle_f32x4(x, y, decltype(imm)::value); });
}

}  // namespace sparse_attn_cpu

#endif  // __AVX512F__
