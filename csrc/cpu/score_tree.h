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

namespace tree {
// the shuffles move 32-bit lanes and are the same for both types: done on the bits as int32
inline __m512i bits(__m512i x) { return x; }
inline __m512i bits(__m512 x) { return _mm512_castps_si512(x); }
template <typename V>
inline V as(__m512i x) {
  if constexpr (std::is_same_v<V, __m512>) return _mm512_castsi512_ps(x);
  else return x;
}
inline __m512i add(__m512i x, __m512i y) { return _mm512_add_epi32(x, y); }
inline __m512 add(__m512 x, __m512 y) { return _mm512_add_ps(x, y); }
// x's lanes picked by `lo` plus y's by `hi` (two shuffles of the pair, added)
template <typename V, typename Lo, typename Hi>
__attribute__((always_inline)) inline V fold(V x, V y, Lo lo, Hi hi) {
  return add(as<V>(lo(bits(x), bits(y))), as<V>(hi(bits(x), bits(y))));
}
}  // namespace tree

template <typename V>
__attribute__((always_inline)) inline V score_pair(V a, V b) {
  return tree::fold(a, b, [](__m512i x, __m512i y) { return _mm512_unpacklo_epi32(x, y); },
                    [](__m512i x, __m512i y) { return _mm512_unpackhi_epi32(x, y); });
}

template <typename V>
__attribute__((always_inline)) inline V score_16(const V* t) {
  auto lo64 = [](__m512i x, __m512i y) { return _mm512_unpacklo_epi64(x, y); };
  auto hi64 = [](__m512i x, __m512i y) { return _mm512_unpackhi_epi64(x, y); };
  auto even = [](__m512i x, __m512i y) { return _mm512_shuffle_i32x4(x, y, 0x88); };  // blocks 0, 2 of each
  auto odd = [](__m512i x, __m512i y) { return _mm512_shuffle_i32x4(x, y, 0xDD); };   // blocks 1, 3 of each
  V g[4];
  for (int i = 0; i < 4; ++i)  // level 2, inside each block: keys 4i .. 4i + 3, the block's share of each
    g[i] = tree::fold(t[2 * i], t[2 * i + 1], lo64, hi64);
  // levels 3 and 4, across blocks: block i <- keys 4i .. 4i + 3, whole sums
  return tree::fold(tree::fold(g[0], g[1], even, odd), tree::fold(g[2], g[3], even, odd), even, odd);
}

}  // namespace sparse_attn_cpu

#endif  // __AVX512F__
