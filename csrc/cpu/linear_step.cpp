// Decode step of linear attention on the CPU (the contract's "Linear attention"): one token, or a
// few (speculative decode), against a float32 state:
//
//     S_t = exp(g_t) S_{t-1} + k_t v_t^T,      o_t = scale q_t^T S_t
//
// Why its own kernel: a step is memory-bound on the (D, Dv) state, so the only thing that matters
// is touching it once. Row i of the state evolves on its own, s_i <- a_t s_i + k_t[i] v_t, and
// o_t = scale sum_i q_t[i] s_i, so each (batch, head) walks its state in blocks of columns, row by
// row, with the block's values in registers across the S tokens and the output block accumulated
// in registers (S = 1) or in L1 (S > 1): the state is read once and written once per call, whatever
// S is, and may be written where it was read (in place, when the caller hands the same tensor).
//
// Work is split over (batch, head). GQA: k, v keep their Hkv heads. q, k, v float32 / bfloat16 /
// float16 (converted on load); float32 state and output.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/step_common.h"
#include "cpu/vec.h"

namespace sparse_attn_cpu {
namespace {

// Scalar form of one column block (the tail of Dv that fills no vector, and the portable build).
inline void step_cols_scalar(int64_t D, int64_t S, int64_t Dv, const float* sin, float* sout, int64_t c0, int64_t c1,
                             const StepTokens& tk) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t t = 0; t < S; ++t) tk.o[t * tk.ldv + c] = 0.f;
  for (int64_t i = 0; i < D; ++i)
    for (int64_t c = c0; c < c1; ++c) {
      float s = sin != nullptr ? sin[i * Dv + c] : 0.f;
      for (int64_t t = 0; t < S; ++t) {
        s = s * tk.a[t] + tk.k[t * D + i] * tk.v[t * tk.ldv + c];
        tk.o[t * tk.ldv + c] += tk.q[t * D + i] * s;
      }
      sout[i * Dv + c] = s;
    }
}

#ifdef SPARSE_ATTN_VECTOR_TYPES
// NV vectors of columns from c0, all D rows, all S tokens. ONE: S == 1, the output in registers.
template <int NV, bool ONE>
inline void step_cols(int64_t D, int64_t S, int64_t Dv, const float* sin, float* sout, int64_t c0,
                      const StepTokens& tk) {
  vfloat acc[NV], v0[NV];
  const float a0 = tk.a[0];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    acc[j] = vfloat{};
    v0[j] = vload(tk.v + c0 + j * kVec);
  }
  if (!ONE)
    for (int64_t t = 0; t < S; ++t)
      for (int j = 0; j < NV; ++j) vstore(tk.o + t * tk.ldv + c0 + j * kVec, vfloat{});
  for (int64_t i = 0; i < D; ++i) {
    vfloat s[NV];
    const float* sr = sin != nullptr ? sin + i * Dv + c0 : nullptr;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) s[j] = sr != nullptr ? vload(sr + j * kVec) : vfloat{};
    if (ONE) {
      const float kk = tk.k[i], qq = tk.q[i];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        s[j] = s[j] * a0 + kk * v0[j];
        acc[j] += qq * s[j];
      }
    } else {
      for (int64_t t = 0; t < S; ++t) {
        const float kk = tk.k[t * D + i], qq = tk.q[t * D + i], at = tk.a[t];
        float* ot = tk.o + t * tk.ldv + c0;
        const float* vt = tk.v + t * tk.ldv + c0;
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) {
          s[j] = s[j] * at + kk * vload(vt + j * kVec);
          vstore(ot + j * kVec, vload(ot + j * kVec) + qq * s[j]);
        }
      }
    }
    float* dr = sout + i * Dv + c0;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vstore(dr + j * kVec, s[j]);
  }
  if (ONE)
    for (int j = 0; j < NV; ++j) vstore(tk.o + c0 + j * kVec, acc[j]);
}

template <bool ONE>
inline void step_block(int nv, int64_t D, int64_t S, int64_t Dv, const float* sin, float* sout, int64_t c0,
                       const StepTokens& tk) {
  switch (nv) {
    case 4: step_cols<4, ONE>(D, S, Dv, sin, sout, c0, tk); break;
    case 3: step_cols<3, ONE>(D, S, Dv, sin, sout, c0, tk); break;
    case 2: step_cols<2, ONE>(D, S, Dv, sin, sout, c0, tk); break;
    default: step_cols<1, ONE>(D, S, Dv, sin, sout, c0, tk); break;
  }
}
#endif

// One (batch, head): its S tokens into scratch (q pre-scaled), then the state block by block.
template <int DT>
void step_unit(const LinearStepParams& P, int64_t bh, StepScratch& sc) {
  using In = typename Elem<DT>::T;
  const int64_t b = bh / P.H, h = bh % P.H, hk = h / (P.H / P.Hkv), D = P.D, Dv = P.Dv, S = P.S;
  const In* qb = static_cast<const In*>(P.q) + b * P.qs[0] + h * P.qs[1];
  const In* kb = static_cast<const In*>(P.k) + b * P.ks[0] + hk * P.ks[1];
  const In* vb = static_cast<const In*>(P.v) + b * P.vs[0] + hk * P.vs[1];
  StepTokens tk = sc.tokens(S, D, Dv);
  for (int64_t t = 0; t < S; ++t) {
    load_row<DT>(tk.q + t * D, qb + t * P.qs[2], D, 1, P.scale);
    load_row<DT>(tk.k + t * D, kb + t * P.ks[2], D, 1, 1.f);
    load_row<DT>(tk.v + t * tk.ldv, vb + t * P.vs[2], Dv, 1, 1.f);
    tk.a[t] = P.g == nullptr ? 1.f : std::exp(P.g[b * P.gs[0] + h * P.gs[1] + t * P.gs[2]]);
  }
  const float* sin = P.s_in == nullptr ? nullptr : P.s_in + bh * D * Dv;
  float* sout = P.s_out + bh * D * Dv;
  int64_t c0 = 0;
#ifdef SPARSE_ATTN_VECTOR_TYPES
  constexpr int kBlock = 4;  // vectors of columns per block: 4 state + 4 value + 4 output registers
  for (; c0 + kVec <= Dv; c0 += kBlock * kVec) {
    const int nv = static_cast<int>(std::min<int64_t>(kBlock, (Dv - c0) / kVec));
    if (S == 1)
      step_block<true>(nv, D, S, Dv, sin, sout, c0, tk);
    else
      step_block<false>(nv, D, S, Dv, sin, sout, c0, tk);
    if (nv < kBlock) {
      c0 += nv * kVec;
      break;
    }
  }
#endif
  if (c0 < Dv) step_cols_scalar(D, S, Dv, sin, sout, c0, Dv, tk);
  float* ob = P.out + bh * S * Dv;
  for (int64_t t = 0; t < S; ++t) std::copy_n(tk.o + t * tk.ldv, Dv, ob + t * Dv);
}

template <int DT>
void step_all(const LinearStepParams& P) {
  at::parallel_for(0, P.B * P.H, 1, [&](int64_t lo, int64_t hi) {
    StepScratch sc;
    for (int64_t u = lo; u < hi; ++u) step_unit<DT>(P, u, sc);
  });
}

}  // namespace

void linear_step_run(const LinearStepParams& P, int dtype_tag) {
  if (dtype_tag == 0)
    step_all<0>(P);
  else if (dtype_tag == 1)
    step_all<1>(P);
  else
    step_all<2>(P);
}

}  // namespace sparse_attn_cpu
