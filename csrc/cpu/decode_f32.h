// The decode kernel's float32 products for a few query rows, K/V read in their dtype (float32,
// bfloat16, float16) and converted in registers 8 elements at a time (vec.h's v8 layer):
//   scores:  q . k as dot products vectorised over the head dim, for a tile of rows x keys at once
//            (register-blocked: at most 8 accumulators), reduced by v8::hsum;
//   P . V:   accumulators of 16 output columns x the tile's rows stay in registers while the
//            segment's keys stream by.
// Every function takes the rows' addresses as a `Rows` (decode_rows.h: a strided tensor or a
// paged cache's address table) and does the same arithmetic for both. The bfloat16 products with
// vdpbf16ps (AVX-512 BF16) are in decode_bf16.h and vec_bf16.h.
#pragma once

#include <cstdint>

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
}

// o_r = corr_r * o_r + sum_j p_r[j] v_j, r < RT; 16 (then 8, then 1) output columns at a time;
// value j's row starts at vr[j]. Every p_r[j] multiplies its row, zeros included (a masked key's
// non-finite V row therefore makes the row NaN, never silently nothing: docs/semantics.md)
template <int DT, int RT, typename Rows>
inline void pv_rows(int64_t nk, int64_t Dv, const float* const* p, Rows vr, float* const* o, const float* corr) {
  int64_t c = 0;
  for (; c + 16 <= Dv; c += 16) {
    v8::f8 a0[RT], a1[RT];
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      a0[r] = v8::load(o[r] + c) * v8::splat(corr[r]);
      a1[r] = v8::load(o[r] + c + 8) * v8::splat(corr[r]);
    }
    for (int64_t j = 0; j < nk; ++j) {
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
