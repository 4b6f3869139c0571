// The decode kernel's float32 products for a few query rows, K/V read in their dtype (float32,
// bfloat16, float16) and converted in registers 8 elements at a time (vec.h's v8 layer):
//   scores:  q . k as dot products vectorised over the head dim, for a tile of rows x keys at once
//            (register-blocked: at most 8 accumulators), reduced by v8::hsum;
//   P . V:   accumulators of 16 output columns x the tile's rows stay in registers while the
//            segment's keys stream by.
// Every function takes the rows' addresses as a `Rows` (decode_rows.h: a strided tensor or a
// paged cache's address table) and does the same arithmetic for both. The bfloat16 products with
// vdpbf16ps (AVX-512 BF16) are in decode_bf16.h and vec_bf16.h. AVX-512 builds (with BW and VL)
// run qk_rows, qk_rows_held and pv_stripe on 16-lane vectors instead (decode_f32_avx512.h): the
// scores' bits then differ from the 8-lane tiles' (within the contract), P . V's do not.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/decode_f32_avx512.h"
#include "cpu/vec.h"

namespace sparse_attn_decode {

using sparse_attn_cpu::Elem;
namespace v8 = sparse_attn_cpu::v8;

constexpr int kRT = 4;  // rows per register tile

// s[r][j0 + jj] = q_r . k_{jj}, r < RT, jj < KT (q rows float32, zero-padded to a multiple of 8);
// key jj's row starts at kr[jj]
template <int DT, int RT, int KT, typename Rows>
inline void qk_tile(int64_t D, const float* const* q, Rows kr, float* const* s, int64_t j0) {
  static_assert(RT * KT <= 8, "tile of at most 8 dot products");
  v8::f8 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = v8::zero();
  const int64_t D8 = D / 8 * 8;
  for (int64_t c = 0; c < D8; c += 8) {
    v8::f8 kv[KT];
#pragma GCC unroll 8
    for (int jj = 0; jj < KT; ++jj) kv[jj] = v8::convert<DT>(kr[jj] + c);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const v8::f8 qv = v8::load(q[r] + c);
#pragma GCC unroll 8
      for (int jj = 0; jj < KT; ++jj) acc[r * KT + jj] += qv * kv[jj];
    }
  }
  float out[8];
  v8::hsum(acc, out);
  for (int64_t c = D8; c < D; ++c)
    for (int jj = 0; jj < KT; ++jj) {
      const float kc = Elem<DT>::get(kr[jj], c);
      for (int r = 0; r < RT; ++r) out[r * KT + jj] += q[r][c] * kc;
    }
  for (int r = 0; r < RT; ++r)
    for (int jj = 0; jj < KT; ++jj) s[r][j0 + jj] = out[r * KT + jj];
}

// s[r][0 : nk) = q_r . k_j, r < RT; ahead(j, n) is called before keys [j, j + n) (the caller's
// paced prefetch)
template <int DT, int RT, typename Rows, typename Ahead>
inline void qk_rows(int64_t nk, int64_t D, const float* const* q, Rows kr, float* const* s, Ahead&& ahead) {
#ifdef SPARSE_ATTN_F32_Z16
  return f32z::qk_rows<DT, RT>(nk, D, q, kr, s, ahead);  // 16-lane dot products (decode_f32_avx512.h)
#else
  constexpr int KT = RT == 1 ? 8 : (RT == 2 ? 4 : 2);
  int64_t j = 0;
  for (; j + KT <= nk; j += KT) {
    ahead(j, KT);
    qk_tile<DT, RT, KT>(D, q, kr + j, s, j);
  }
  for (; j < nk; ++j) {
    ahead(j, 1);
    qk_tile<DT, RT, 1>(D, q, kr + j, s, j);
  }
#endif
}

// Few rows of a small head (the tiny-model shape: G = 2 rows per kv head, D = 64): qk_rows reloads
// q from memory in every product of every tile (its D is a runtime number), so a q . K^T tile of
// RT x KT dot products issued 12 loads per 8 FMAs and waited on the load ports. With 32 vector
// registers (AVX-512, also for 256-bit vectors) the rows' q fit beside the accumulators: NQ = D / 8
// vectors per row, loaded once per segment. Same products, same order, same hsum: the same bits as
// qk_rows.
#if defined(__AVX512F__)
constexpr int kHeldQVectors = 16;  // q vectors held (RT x NQ), of 32 registers: 8 accumulators + K
#else
constexpr int kHeldQVectors = 0;  // 16 registers: qk_rows
#endif

// whether qk_rows_held<RT, D / 8> serves RT rows of head dim D
inline bool qk_held(int64_t rt, int64_t d) {
  return (rt == 1 || rt == 2) && (d == 32 || d == 64 || d == 128) && rt * (d / 8) <= kHeldQVectors;
}

// f(rows, vectors) with both as compile-time numbers, for what qk_held accepts
template <typename F>
inline void with_held(int64_t rt, int64_t d, F&& f) {
  using I = std::integral_constant<int, 1>;
  using II = std::integral_constant<int, 2>;
  if (rt == 2) {
    d == 32 ? f(II{}, std::integral_constant<int, 4>{}) : f(II{}, std::integral_constant<int, 8>{});
  } else {
    d == 32 ? f(I{}, std::integral_constant<int, 4>{})
            : d == 64 ? f(I{}, std::integral_constant<int, 8>{}) : f(I{}, std::integral_constant<int, 16>{});
  }
}

template <int DT, int RT, int NQ, typename Rows, typename Ahead>
inline void qk_rows_held(int64_t nk, const float* const* q, Rows kr, float* const* s, Ahead&& ahead) {
  static_assert(RT * NQ <= 16, "q rows held in registers");
#ifdef SPARSE_ATTN_F32_Z16
  return f32z::qk_rows_held<DT, RT, NQ / 2>(nk, q, kr, s, ahead);  // NQ / 2 16-lane vectors a row
#else
  constexpr int KT = RT == 1 ? 8 : (RT == 2 ? 4 : 2);  // as qk_rows: RT x KT <= 8 accumulators
  v8::f8 qv[RT][NQ];
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NQ; ++c) qv[r][c] = v8::load(q[r] + 8 * c);
  // keys [j, j + kt) into s: kt = KT, then single keys at the end (qk_rows' tail tiles)
  auto tile = [&](int64_t j, auto kt) __attribute__((always_inline)) {
    constexpr int T = decltype(kt)::value;
    v8::f8 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = v8::zero();
#pragma GCC unroll 16
    for (int c = 0; c < NQ; ++c) {
#pragma GCC unroll 8
      for (int jj = 0; jj < T; ++jj) {
        const v8::f8 kv = v8::convert<DT>(kr[j + jj] + 8 * c);
#pragma GCC unroll 4
        for (int r = 0; r < RT; ++r) acc[r * T + jj] += qv[r][c] * kv;
      }
    }
    float out[8];
    v8::hsum(acc, out);
    for (int r = 0; r < RT; ++r) std::memcpy(s[r] + j, out + r * T, T * sizeof(float));
  };
  int64_t j = 0;
  for (; j + KT <= nk; j += KT) {
    ahead(j, KT);
    tile(j, std::integral_constant<int, KT>{});
  }
  for (; j < nk; ++j) {
    ahead(j, 1);
    tile(j, std::integral_constant<int, 1>{});
  }
#endif
}

// P . V for few rows over whole 64-column stripes: RT x NV accumulators (NV = 8: 64 columns for
// RT <= 2; 4 for RT <= 4), so each key's row pointer and probabilities are loaded once per stripe,
// not once per 16 columns (pv_rows). The same products in the same order: the same bits.
template <int DT, int RT, int NV, typename Rows, typename Ahead>
inline void pv_stripe(int64_t nk, int64_t c, const float* const* p, Rows vr, float* const* o, const float* corr,
                      Ahead&& ahead) {
#ifdef SPARSE_ATTN_F32_Z16
  return f32z::pv_stripe<DT, RT, NV / 2>(nk, c, p, vr, o, corr, ahead);  // 16-lane vectors, the same bits
#else
  v8::f8 a[RT][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[r][v] = v8::load(o[r] + c + 8 * v) * v8::splat(corr[r]);
  for (int64_t j = 0; j < nk; ++j) {
    ahead(j);
    const typename Elem<DT>::T* vc = vr[j] + c;
    v8::f8 x[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) x[v] = v8::convert<DT>(vc + 8 * v);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const v8::f8 pr = v8::splat(p[r][j]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[r][v] += pr * x[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) v8::store(o[r] + c + 8 * v, a[r][v]);
#endif
}

// o_r = corr_r * o_r + sum_j p_r[j] v_j, r < RT; 16 (then 8, then 1) output columns at a time;
// value j's row starts at vr[j]. Every p_r[j] multiplies its row, zeros included (a masked key's
// non-finite V row therefore makes the row NaN, never silently nothing: docs/semantics.md).
// ahead(j) is called before key j in the first pass over the keys (the caller's prefetch of the
// next segment's K; not for Dv < 8)
template <int DT, int RT, typename Rows, typename Ahead>
inline void pv_rows(int64_t nk, int64_t Dv, const float* const* p, Rows vr, float* const* o, const float* corr,
                    Ahead&& ahead) {
  int64_t c = 0;
  if constexpr (kHeldQVectors > 0) {  // 32 registers: stripes of 64 (RT <= 2) or 32 columns
    constexpr int NV = RT <= 2 ? 8 : 4;
    auto none = [](int64_t) {};
    for (; c + 8 * NV <= Dv; c += 8 * NV)
      c == 0 ? pv_stripe<DT, RT, NV>(nk, c, p, vr, o, corr, ahead) : pv_stripe<DT, RT, NV>(nk, c, p, vr, o, corr, none);
  }
  for (; c + 16 <= Dv; c += 16) {
    v8::f8 a0[RT], a1[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      a0[r] = v8::load(o[r] + c) * v8::splat(corr[r]);
      a1[r] = v8::load(o[r] + c + 8) * v8::splat(corr[r]);
    }
    for (int64_t j = 0; j < nk; ++j) {
      if (c == 0) ahead(j);
      const typename Elem<DT>::T* vc = vr[j] + c;
      const v8::f8 v0 = v8::convert<DT>(vc), v1 = v8::convert<DT>(vc + 8);
#pragma GCC unroll 4
      for (int r = 0; r < RT; ++r) {
        const v8::f8 pr = v8::splat(p[r][j]);
        a0[r] += pr * v0;
        a1[r] += pr * v1;
      }
    }
    for (int r = 0; r < RT; ++r) {
      v8::store(o[r] + c, a0[r]);
      v8::store(o[r] + c + 8, a1[r]);
    }
  }
  for (; c + 8 <= Dv; c += 8) {
    v8::f8 a0[RT];
    for (int r = 0; r < RT; ++r) a0[r] = v8::load(o[r] + c) * v8::splat(corr[r]);
    for (int64_t j = 0; j < nk; ++j) {
      if (c == 0) ahead(j);
      const v8::f8 v0 = v8::convert<DT>(vr[j] + c);
      for (int r = 0; r < RT; ++r) a0[r] += v8::splat(p[r][j]) * v0;
    }
    for (int r = 0; r < RT; ++r) v8::store(o[r] + c, a0[r]);
  }
  for (; c < Dv; ++c)
    for (int r = 0; r < RT; ++r) {
      float a = o[r][c] * corr[r];
      for (int64_t j = 0; j < nk; ++j) a += p[r][j] * Elem<DT>::get(vr[j], c);
      o[r][c] = a;
    }
}

}  // namespace sparse_attn_decode
