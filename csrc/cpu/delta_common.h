// What the delta rule's chunked forward (delta.cpp) and backward (delta_bwd.cpp) share: the
// parameters, the per-thread scratch, and the preparation of one chunk (everything of a chunk that
// does not depend on the entering state: the decays, the triangles A and P, T = (I + A)^{-1} and
// the solved right-hand sides X = T R = [Wv, -W]). delta.cpp's comment has the formulas.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/linear_common.h"
#include "cpu/vec.h"

namespace sparse_attn_cpu {
namespace delta_detail {

using linear_detail::chunk_decays;
using linear_detail::kLog2e;
using linear_detail::transpose_rows;

constexpr float kGFloor = -1000.f;
constexpr float kL2Eps = 1e-6f;

struct DeltaParams {
  int64_t B, Hk, Hv, S, D, Dv, C;
  int dtype;                      // 0 float32, 1 bfloat16, 2 float16 (q, k, v)
  const void *q, *k, *v;
  int64_t qs[3], ks[3], vs[3];    // strides of batch, head, token (the last dim is contiguous)
  const float* beta;              // (B, Hv, S)
  int64_t bs[3];
  const float* g;                 // (B, Hv, S) or (B, Hv, S, D) log-decays, or nullptr
  int64_t gs[3];
  bool per_channel;               // g has a last dim of D (contiguous)
  float* state;                   // (B, Hv, D, Dv) contiguous: the initial state in, the final out
  float* out;                     // (B, Hv, S, Dv) contiguous
  float scale;
  bool l2;                        // qk_l2norm
};

// dst[0:n] = float(src[0:n]), then divided by (its norm + eps) if l2
template <int DT>
inline void load_qk(float* dst, const typename Elem<DT>::T* src, int64_t n, bool l2) {
  load_row<DT>(dst, src, n, 1, 1.f);
  if (!l2) return;
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += dst[i] * dst[i];
  const float inv = 1.f / (std::sqrt(ss) + kL2Eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] *= inv;
}

// ------------------------------------------------------------------------------ per-thread scratch
// Row-major buffers of one chunk; widths padded to whole vectors (Cp, Dp, Dvp), pads kept at zero
// where a product reads them. q, k rows have stride Dp (zero-padded) so they serve as B operands too.
struct Scratch {
  int64_t C, Cp, D, Dp, Dvp, Xw;
  std::vector<float> q, k, kt, kw, a, gam, p, t, x, r, o, tmp, zeros, ones, gl, ro, ed, ew, rs, beta;
  std::vector<double> bc;
  std::vector<const float*> qrow, krow, prow, trow, ktrow, kwrow, wrow, xrow_c, rrow;
  std::vector<float*> arow, prow_w, xrow, orow;

  Scratch(int64_t C_, int64_t D_, int64_t Dv_)
      : C(C_), Cp(round_up(C_, kVec)), D(D_), Dp(round_up(D_, kVec)), Dvp(round_up(Dv_, kVec)) {
    Xw = Dvp + Dp;
    q.assign(C * Dp, 0.f);
    k.assign(C * Dp, 0.f);
    kt.assign(D * Cp, 0.f);
    kw.assign(D * Cp, 0.f);
    a.assign(C * Cp, 0.f);
    gam.assign(C * Cp, 0.f);
    p.assign(C * Cp, 0.f);
    t.assign(C * Cp, 0.f);
    x.assign(C * Xw, 0.f);
    r.assign(C * Xw, 0.f);
    o.assign(C * Dvp, 0.f);
    tmp.assign(Cp, 0.f);
    zeros.assign(Cp, 0.f);
    ones.assign(std::max(C, D), 1.f);
    gl.assign(C, 0.f);
    ro.assign(C, 0.f);
    ed.assign(C, 0.f);
    ew.assign(C, 0.f);
    rs.assign(D, 0.f);
    beta.assign(C, 0.f);
    bc.assign(C, 0.0);
    for (int64_t i = 0; i < C; ++i) {
      qrow.push_back(q.data() + i * Dp);
      krow.push_back(k.data() + i * Dp);
      arow.push_back(a.data() + i * Cp);
      prow.push_back(p.data() + i * Cp);
      prow_w.push_back(p.data() + i * Cp);
      trow.push_back(t.data() + i * Cp);
      xrow.push_back(x.data() + i * Xw);
      xrow_c.push_back(x.data() + i * Xw);
      rrow.push_back(r.data() + i * Xw);
      wrow.push_back(x.data() + i * Xw + Dvp);  // -W, the solved keys
      orow.push_back(o.data() + i * Dvp);
    }
    for (int64_t d = 0; d < D; ++d) {
      ktrow.push_back(kt.data() + d * Cp);
      kwrow.push_back(kw.data() + d * Cp);
    }
  }
};

// rows r0.. of C = A B^T over the lower triangle: the micro-kernel's B is kt (D x Cp)
inline void lower_products(int64_t cl, int64_t D, int64_t Cp, const float* const* rows, const float* kt,
                           float* const* dst) {
  for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, cl - r0);
    const int64_t n = std::min(Cp, round_up(r0 + mr, kVec));
    gemm_rows<false>(mr, n, D, rows + r0, kt, Cp, dst + r0, nullptr);
  }
}

// The input rows of one (batch, value head): value head h reads q/k head h / (Hv / Hk).
template <int DT>
struct Unit {
  using In = typename Elem<DT>::T;
  const In *qb, *kb, *vb;
  const float *betab, *gb;
  int64_t bh;
  Unit(const DeltaParams& P, int64_t bh_) : bh(bh_) {
    const int64_t b = bh / P.Hv, h = bh % P.Hv, hk = h / (P.Hv / P.Hk);
    qb = static_cast<const In*>(P.q) + b * P.qs[0] + hk * P.qs[1];
    kb = static_cast<const In*>(P.k) + b * P.ks[0] + hk * P.ks[1];
    vb = static_cast<const In*>(P.v) + b * P.vs[0] + h * P.vs[1];
    betab = P.beta + b * P.bs[0] + h * P.bs[1];
    gb = P.g == nullptr ? nullptr : P.g + b * P.gs[0] + h * P.gs[1];
  }
};

// Chunk [c0, c0 + cl): loads q, k (kt: k transposed) and beta; the decays (bc, ed = exp(b),
// ro = scale ed, ew = exp(b_last - b); returns exp(b_last)); gam = exp(b_t - b_s) (s < t);
// a = (K K^T) * gam (strict lower, WITHOUT beta: the backward needs it so); p = scale (Q K^T) * gam
// (lower, zero above); T = (I + diag(beta) a)^{-1}; R = [beta V, -beta exp(b) K]; X = T R.
template <int DT>
float prepare_chunk(const DeltaParams& P, const Unit<DT>& u, int64_t c0, int64_t cl, Scratch& sc) {
  const int64_t D = P.D, Dv = P.Dv, Cp = sc.Cp, Dp = sc.Dp, Dvp = sc.Dvp, Xw = sc.Xw;
  for (int64_t t = 0; t < cl; ++t) {
    load_qk<DT>(sc.q.data() + t * Dp, u.qb + (c0 + t) * P.qs[2], D, P.l2);
    load_qk<DT>(sc.k.data() + t * Dp, u.kb + (c0 + t) * P.ks[2], D, P.l2);
    sc.beta[t] = u.betab[(c0 + t) * P.bs[2]];
  }
  transpose_rows(sc.krow.data(), cl, D, sc.kt.data(), Cp);
  if (cl < Cp)
    for (int64_t d = 0; d < D; ++d) std::fill(sc.kt.data() + d * Cp + cl, sc.kt.data() + (d + 1) * Cp, 0.f);

  float elast = 1.f;
  if (u.gb != nullptr) {
    for (int64_t t = 0; t < cl; ++t) sc.gl[t] = std::max(u.gb[(c0 + t) * P.gs[2]], kGFloor);
    elast = chunk_decays(sc.gl.data(), 1, cl, 1.f, sc.bc.data(), sc.ed.data(), sc.ew.data());
    for (int64_t t = 0; t < cl; ++t) sc.ro[t] = P.scale * sc.ed[t];
  } else {
    std::fill_n(sc.ed.begin(), cl, 1.f);
    std::fill_n(sc.ew.begin(), cl, 1.f);
    std::fill_n(sc.ro.begin(), cl, P.scale);
  }

  // K K^T and Q K^T on the lower triangle, then the decay weights and the scale
  lower_products(cl, D, Cp, sc.krow.data(), sc.kt.data(), sc.arow.data());
  lower_products(cl, D, Cp, sc.qrow.data(), sc.kt.data(), sc.prow_w.data());
  for (int64_t t = 0; t < cl; ++t) {
    float* ar = sc.a.data() + t * Cp;
    float* pr = sc.p.data() + t * Cp;
    float* gr = sc.gam.data() + t * Cp;
    if (u.gb != nullptr && t > 0) {
      const double b_t = sc.bc[t];
      for (int64_t s = 0; s < t; ++s) gr[s] = static_cast<float>((b_t - sc.bc[s]) * kLog2e);
      const int64_t tv = round_up(t, kVec);
      for (int64_t s = t; s < tv; ++s) gr[s] = -200.f;
      exp2_sub_cols(gr, sc.zeros.data(), tv);
    } else {
      std::fill(gr, gr + t, 1.f);
    }
    for (int64_t s = 0; s < t; ++s) {
      ar[s] *= gr[s];
      pr[s] *= P.scale * gr[s];
    }
    gr[t] = 1.f;
    pr[t] *= P.scale;
    std::fill(pr + t + 1, pr + Cp, 0.f);
    // the right-hand sides: [beta v_t, -beta exp(b_t) k_t], zero-padded
    const float bt = sc.beta[t];
    float* rr = sc.r.data() + t * Xw;
    load_row<DT>(rr, u.vb + (c0 + t) * P.vs[2], Dv, 1, bt);
    std::fill(rr + Dv, rr + Dvp, 0.f);
    const float kmul = -bt * sc.ed[t];
    const float* kr = sc.k.data() + t * Dp;
    for (int64_t d = 0; d < D; ++d) rr[Dvp + d] = kr[d] * kmul;
    std::fill(rr + Dvp + D, rr + Xw, 0.f);
  }
  // T = (I + diag(beta) a)^{-1} by forward substitution: T_t = e_t - beta_t sum_{r<t} a_tr T_r
  for (int64_t t = 0; t < cl; ++t) {
    float* tr = sc.t.data() + t * Cp;
    std::fill(tr, tr + Cp, 0.f);
    const float* ar = sc.a.data() + t * Cp;
    const float bt = sc.beta[t];
    for (int64_t r = 0; r < t; ++r) {
      const float c = bt * ar[r];
      const float* trr = sc.t.data() + r * Cp;
#pragma omp simd
      for (int64_t s = 0; s <= r; ++s) tr[s] -= c * trr[s];
    }
    tr[t] = 1.f;
  }
  // X = T R (lower triangular: row tile r0 reads rows < r0 + mr of R)
  for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, cl - r0);
    gemm_rows<false>(mr, Xw, r0 + mr, sc.trow.data() + r0, sc.r.data(), Xw, sc.xrow.data() + r0, nullptr);
  }
  return elast;
}

}  // namespace delta_detail
}  // namespace sparse_attn_cpu
