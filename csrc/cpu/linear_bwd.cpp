// Chunked linear attention backward on the CPU: the gradients of linear.cpp's forward
//
// Per chunk (w_ts = exp(b_t - b_s) for s < t, e_t = exp(b_t), wk_s = exp(sum of g over (s, last]),
// dl = exp(b_last), R the gradient of the state leaving the chunk):
//
//   dq_t = scale (e_t S_prev do_t + sum_{s<t} w_ts (do_t . v_s) k_s) + scale (do_t . v_t) k_t
//   dk_s = scale sum_{t>s} w_ts (do_t . v_s) q_t + wk_s R v_s        + scale (do_s . v_s) q_s
//   dv_s = scale sum_{t>=s} w_ts (q_t . k_s) do_t + wk_s R^T k_s
//   R_prev = dl R + scale sum_t e_t q_t do_t^T,            d(initial state) = R before the first chunk
//
// Forward-in-time sweep (dq): the transposed state S^T (Dv, D) is rebuilt chunk by chunk
// (S^T = dl S^T + V^T (K wk)), X = dO S^T, dA = dO V^T on the lower triangle, dq = scale e_t X +
// (scale w o dA) K. Reverse sweep (dk, dv, d(initial state)): R (D, Dv); A^T = K Q^T on the upper
// triangle (the rows of dv's product), dv = wk (K R) + (scale w o A^T) dO; dk^T = Q^T (scale w o
// dA) + R (V wk)^T (computed transposed: R is the A operand, no transpose of the state), then
// transposed back per chunk. Nothing of size S x S is formed.
//
// d(decay): the loss depends on the decays through the pair terms T_ts = scale exp(B_t - B_s)
// (q_t . k_s)(do_t . v_s), s < t (B the global cumulative log-decay; the initial state and the
// returned state's gradient are pairs with s before the first token or t after the last), so
// dg_r = sum of T_ts over the pairs that straddle r, s < r <= t. Per chunk (r local) that is
//   the chunk's own pairs M[t][s] = A[t][s] dA_raw[t][s]: a running sum over r of the column sums
//     minus the row sums of M (C^2 work per chunk);
//   + sum_{t >= r} q_t . (scale e_t S_prev do_t)       (earlier keys, the chunk's queries)
//   + sum_{s < r} wk_s v_s . (K R)_s                   (the chunk's keys, later queries)
//   + dl <R, S_prev>                                    (pairs across the whole chunk),
// all summed in double, every term a genuine sum of pair terms. The textbook form, a reverse
// cumulative sum of dL/dB_t = q_t . dq_t - k_t . dk_t, adds float32 terms that cancel pair by
// pair: measured 3e-6 .. 7e-5 relative error for a per-head decay at S = 300, against the
// contract's 1e-5 (this form: ~1e-7). The forward sweep keeps S_prev^T of every chunk for the
// last term (S / C states of D x Dv per task, only when d(decay) is wanted); a per-head decay's
// gradient is the double sum of dg over the tokens (`dgsum`).
// GQA: one task per (batch, kv head) loops its G query heads, so the dk, dv sums over the group
// need no atomics; when that leaves threads idle (B * Hkv < threads), one task per (batch, query
// head) writes per-head dk, dv buffers, summed over each group afterwards.
// load), float32 state and output. The backward (`linear_bwd`) is the second half of this file.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/huge_pages.h"
#include "cpu/linear_common.h"
#include "cpu/vec.h"
#include "cpu/dtype_tag.h"

namespace sparse_attn_cpu {
namespace {

using linear_detail::chunk_decays;
using linear_detail::kLog2e;
using linear_detail::transpose_rows;

struct LinearBwdParams {
  int64_t B, H, Hkv, S, D, Dv, C;
  const void *q, *k, *v, *dout;
  int64_t qs[3], ks[3], vs[3], dos[3];
  const float* g;
  int64_t gs[3];
  const float* s0;      // (B, H, D, Dv) or nullptr
  const float* dsf;     // (B, H, D, Dv) or nullptr
  float *dq, *dk, *dv, *dg, *ds0;  // dq (B, H, S, D); dk, dv (B, Hkv, S, .) zeroed; dg (B, H, S); ds0 (B, H, D, Dv)
  double* dgsum;                   // (B, H): sum of dg over the tokens (a per-head decay's gradient)
  float scale;
  bool need_dg;      // d(decay) wanted (g given and requiring grad)
  bool kv_per_head;  // dk, dv are (B, H, S, .) buffers, one per query head (summed over groups after)
};

struct BwdScratch {
  int64_t C, Cp, Dp, Wp;
  std::vector<float> q, k, kw, v, dO, qt, qts, vt, vtw, st, r, x, p, at, dkt, dkr, w, zeros, ones,
      ro, ew, dl, diag, rt, states, raw, kx;
  std::vector<double> bc, dbq, rsum, csum;
  std::vector<const float*> qrow, krow, vrow, dorow, prow, vtrow, qtrow, qtsrow, rrow_c, dktrow_c;
  std::vector<float*> prow_w, xrow, strow, rrow, dktrow;

  BwdScratch(int64_t C_, int64_t D, int64_t Dv, int64_t S)
      : C(C_), Cp(round_up(C_, kVec)), Dp(round_up(D, kVec)), Wp(round_up(Dv, kVec)) {
    const int64_t Xw = std::max(Dp, Wp);
    q.assign(C * Dp, 0.f), k.assign(C * Dp, 0.f), kw.assign(C * Dp, 0.f);
    v.assign(C * Wp, 0.f), dO.assign(C * Wp, 0.f);
    qt.assign(Dp * Cp, 0.f), qts.assign(Dp * Cp, 0.f), vt.assign(Wp * Cp, 0.f), vtw.assign(Wp * Cp, 0.f);
    st.assign(Wp * Dp, 0.f), r.assign(Dp * Wp, 0.f);
    x.assign(C * Xw, 0.f), p.assign(C * Cp, 0.f), at.assign(C * Cp, 0.f);
    dkt.assign(Dp * Cp, 0.f), dkr.assign(C * Dp, 0.f), w.assign(C * Cp, 0.f);
    zeros.assign(Cp, 0.f), ones.assign(std::max<int64_t>(Xw, Cp), 1.f);
    ro.assign(C, 0.f), ew.assign(C, 1.f), dl.assign(std::max<int64_t>(Xw, Cp), 1.f), diag.assign(C, 0.f);
    bc.assign(C, 0.0), dbq.assign(std::max<int64_t>(S, 1), 0.0);
    rt.assign(Wp * Dp, 0.f), raw.assign(C * Cp, 0.f), kx.assign(C, 0.f);
    rsum.assign(C, 0.0), csum.assign(C, 0.0);
    // row pointers: n rows of ld floats from base
    auto rows = [](auto& out, float* base, int64_t n, int64_t ld) {
      for (int64_t i = 0; i < n; ++i) out.push_back(base + i * ld);
    };
    rows(qrow, q.data(), C, Dp), rows(krow, k.data(), C, Dp), rows(vrow, v.data(), C, Wp);
    rows(dorow, dO.data(), C, Wp), rows(prow, p.data(), C, Cp), rows(prow_w, p.data(), C, Cp);
    rows(xrow, x.data(), C, Xw), rows(vtrow, vt.data(), Wp, Cp), rows(strow, st.data(), Wp, Dp);
    rows(qtrow, qt.data(), Dp, Cp), rows(qtsrow, qts.data(), Dp, Cp), rows(rrow, r.data(), Dp, Wp);
    rows(rrow_c, r.data(), Dp, Wp), rows(dktrow, dkt.data(), Dp, Cp), rows(dktrow_c, dkt.data(), Dp, Cp);
  }
};

// Loads the chunk [c0, c0 + cl) of one (batch, query head): q, k rows (padded to Dp with zeros),
// v, dO rows (padded to Wp), v transposed; with `need_qt`, q transposed too. Then the decays:
// bc (inclusive cumulative, double), ro = scale e_t, ew = wk_t, dl = exp(b_last), and w[t][s] =
// scale w_ts for s < t (0 elsewhere).
template <int DT>
float load_chunk(const LinearBwdParams& P, BwdScratch& sc, const typename Elem<DT>::T* qb,
                 const typename Elem<DT>::T* kb, const typename Elem<DT>::T* vb, const typename Elem<DT>::T* db,
                 const float* gb, int64_t c0, int64_t cl, bool need_qt) {
  const int64_t D = P.D, Dv = P.Dv, Dp = sc.Dp, Wp = sc.Wp, Cp = sc.Cp;
  for (int64_t t = 0; t < cl; ++t) {
    load_row<DT>(sc.q.data() + t * Dp, qb + (c0 + t) * P.qs[2], D, 1, 1.f);
    load_row<DT>(sc.k.data() + t * Dp, kb + (c0 + t) * P.ks[2], D, 1, 1.f);
    load_row<DT>(sc.v.data() + t * Wp, vb + (c0 + t) * P.vs[2], Dv, 1, 1.f);
    load_row<DT>(sc.dO.data() + t * Wp, db + (c0 + t) * P.dos[2], Dv, 1, 1.f);
  }
  transpose_rows(sc.vrow.data(), cl, Dv, sc.vt.data(), Cp);
  if (need_qt) transpose_rows(sc.qrow.data(), cl, D, sc.qt.data(), Cp);
  if (cl < Cp) {  // a last, partial chunk: the columns past it are read (and must be finite)
    for (int64_t j = 0; j < Dv; ++j) std::fill(sc.vt.data() + j * Cp + cl, sc.vt.data() + (j + 1) * Cp, 0.f);
    if (need_qt)
      for (int64_t d = 0; d < D; ++d) std::fill(sc.qt.data() + d * Cp + cl, sc.qt.data() + (d + 1) * Cp, 0.f);
  }
  float elast = 1.f;
  if (gb != nullptr) {
    elast = chunk_decays(gb + c0 * P.gs[2], P.gs[2], cl, P.scale, sc.bc.data(), sc.ro.data(), sc.ew.data());
    for (int64_t t = 0; t < cl; ++t) {
      float* wr = sc.w.data() + t * Cp;
      const int64_t tv = round_up(std::max<int64_t>(t, 1), kVec);
      for (int64_t s = 0; s < t; ++s) wr[s] = static_cast<float>((sc.bc[t] - sc.bc[s]) * kLog2e);
      for (int64_t s = t; s < tv; ++s) wr[s] = -200.f;
      exp2_sub_cols(wr, sc.zeros.data(), tv);
      for (int64_t s = 0; s < t; ++s) wr[s] *= P.scale;
    }
  } else {
    std::fill(sc.ro.begin(), sc.ro.begin() + cl, P.scale);
    std::fill(sc.ew.begin(), sc.ew.begin() + cl, 1.f);
    for (int64_t t = 0; t < cl; ++t) std::fill(sc.w.data() + t * Cp, sc.w.data() + t * Cp + t, P.scale);
  }
  return elast;
}

// dA = dO V^T on the lower triangle, weighted: p[t][s] = w[t][s] (do_t . v_s) for s < t, 0 for s >= t
// (up to Cp); diag[t] = scale (do_t . v_t); with keep_raw, raw[t][s] = do_t . v_s for s < t.
inline void weighted_dA(const LinearBwdParams& P, BwdScratch& sc, int64_t cl, bool keep_raw) {
  const int64_t Cp = sc.Cp;
  for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, cl - r0);
    const int64_t n = std::min(Cp, round_up(r0 + mr, kVec));
    gemm_rows<false>(mr, n, P.Dv, sc.dorow.data() + r0, sc.vt.data(), Cp, sc.prow_w.data() + r0, nullptr);
  }
  for (int64_t t = 0; t < cl; ++t) {
    float* pr = sc.p.data() + t * Cp;
    const float* wr = sc.w.data() + t * Cp;
    sc.diag[t] = P.scale * pr[t];
    if (keep_raw) std::copy_n(pr, t, sc.raw.data() + t * Cp);
    for (int64_t s = 0; s < t; ++s) pr[s] *= wr[s];
    std::fill(pr + t, pr + Cp, 0.f);
  }
  for (int64_t t = cl; t < sc.C; ++t) std::fill(sc.p.data() + t * Cp, sc.p.data() + (t + 1) * Cp, 0.f);
}

inline double dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// One (batch, query head): the forward sweep (dq, and q . dq' into dbq), then the reverse sweep
// (dk, dv added into the kv head's rows; d(initial state); dg).
template <int DT>
void bwd_head(const LinearBwdParams& P, int64_t b, int64_t h, BwdScratch& sc) {
  using In = typename Elem<DT>::T;
  const int64_t hk = h / (P.H / P.Hkv), D = P.D, Dv = P.Dv, Dp = sc.Dp, Wp = sc.Wp, Cp = sc.Cp;
  const int64_t bh = b * P.H + h, bhk = P.kv_per_head ? bh : b * P.Hkv + hk;
  const In* qb = static_cast<const In*>(P.q) + b * P.qs[0] + h * P.qs[1];
  const In* kb = static_cast<const In*>(P.k) + b * P.ks[0] + hk * P.ks[1];
  const In* vb = static_cast<const In*>(P.v) + b * P.vs[0] + hk * P.vs[1];
  const In* db = static_cast<const In*>(P.dout) + b * P.dos[0] + h * P.dos[1];
  const float* gb = P.g == nullptr ? nullptr : P.g + b * P.gs[0] + h * P.gs[1];
  const int64_t Xw = std::max(Dp, Wp);
  const bool need_dg = gb != nullptr && P.need_dg;
  const int64_t nch = (P.S + P.C - 1) / P.C;
  if (need_dg && static_cast<int64_t>(sc.states.size()) < nch * Dv * Dp) sc.states.resize(nch * Dv * Dp);

  // ---- forward sweep: dq (and, for d(decay), the transposed state leaving each chunk)
  std::fill(sc.st.begin(), sc.st.end(), 0.f);
  if (P.s0 != nullptr)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < Dv; ++j) sc.st[j * Dp + d] = P.s0[(bh * D + d) * Dv + j];
  for (int64_t c0 = 0; c0 < P.S; c0 += P.C) {
    const int64_t cl = std::min(P.C, P.S - c0);
    const float elast = load_chunk<DT>(P, sc, qb, kb, vb, db, gb, c0, cl, false);
    // X = dO S^T, then dq = scale e_t X + (w o dA) K
    gemm_rows<false>(cl, Dp, Dv, sc.dorow.data(), sc.st.data(), Dp, sc.xrow.data(), nullptr);
    weighted_dA(P, sc, cl, false);
    if (need_dg)  // q_t . (scale e_t S_prev do_t): the pairs (t, s < c0)
      for (int64_t t = 0; t < cl; ++t) sc.dbq[c0 + t] = sc.ro[t] * dot(sc.q.data() + t * Dp, sc.x.data() + t * Xw, D);
    for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, cl - r0);
      gemm_rows<true>(mr, Dp, r0 + mr, sc.prow.data() + r0, sc.k.data(), Dp, sc.xrow.data() + r0, sc.ro.data() + r0);
    }
    for (int64_t t = 0; t < cl; ++t) {
      const float* xr = sc.x.data() + t * Xw;
      const float* kr = sc.k.data() + t * Dp;
      float* out = P.dq + (bh * P.S + c0 + t) * D;
      const float dg = sc.diag[t];
      for (int64_t d = 0; d < D; ++d) out[d] = xr[d] + dg * kr[d];
    }
    // S^T = dl S^T + V^T (K wk)
    if (need_dg) std::copy_n(sc.st.data(), Dv * Dp, sc.states.data() + (c0 / P.C) * Dv * Dp);  // S_prev^T
    const float* kw = sc.k.data();
    if (gb != nullptr) {
      for (int64_t t = 0; t < cl; ++t)
        for (int64_t d = 0; d < Dp; ++d) sc.kw[t * Dp + d] = sc.k[t * Dp + d] * sc.ew[t];
      kw = sc.kw.data();
    }
    std::fill(sc.dl.begin(), sc.dl.end(), elast);
    gemm_rows<true>(Dv, Dp, cl, sc.vtrow.data(), kw, Dp, sc.strow.data(), sc.dl.data());
  }

  // ---- reverse sweep: dk, dv, d(initial state), dg
  double total = 0.0;  // sum of dg over the tokens, in double
  std::fill(sc.r.begin(), sc.r.end(), 0.f);
  if (P.dsf != nullptr) {
    const float* dsf = P.dsf + bh * D * Dv;
    for (int64_t d = 0; d < D; ++d) std::copy_n(dsf + d * Dv, Dv, sc.r.data() + d * Wp);
  }
  float* atp[kMR];
  const float* atc[kMR];
  for (int64_t ci = nch - 1; ci >= 0; --ci) {
    const int64_t c0 = ci * P.C, cl = std::min(P.C, P.S - c0);
    const float elast = load_chunk<DT>(P, sc, qb, kb, vb, db, gb, c0, cl, true);
    // the pairs that straddle the whole chunk (s < c0, t past its end): dl <R, S_prev>
    double bnd = 0.0;
    if (need_dg) {
      transpose_rows(sc.rrow_c.data(), D, Dv, sc.rt.data(), Dp);
      const float* sst = sc.states.data() + ci * Dv * Dp;
      for (int64_t j = 0; j < Dv; ++j) bnd += dot(sc.rt.data() + j * Dp, sst + j * Dp, D);
      bnd *= elast;
    }
    // A^T = K Q^T on the upper triangle: at[s][t] = w[t][s] (k_s . q_t) for t > s, scale (k_s . q_s)
    // on the diagonal, 0 for t < s (from the row tile's first row on)
    for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, cl - r0);
      const int64_t cs = r0 / kVec * kVec;
      for (int64_t i = 0; i < mr; ++i) atp[i] = sc.at.data() + (r0 + i) * Cp + cs;
      gemm_rows<false>(mr, Cp - cs, D, sc.krow.data() + r0, sc.qt.data() + cs, Cp, atp, nullptr);
      for (int64_t i = 0; i < mr; ++i) {
        const int64_t s = r0 + i;
        float* ar = sc.at.data() + s * Cp;
        for (int64_t t = r0; t < s; ++t) ar[t] = 0.f;
        ar[s] *= P.scale;
        for (int64_t t = s + 1; t < cl; ++t) ar[t] *= sc.w[t * Cp + s];
      }
    }
    weighted_dA(P, sc, cl, need_dg);
    // dv = wk (K R) + (A^T) dO
    gemm_rows<false>(cl, Wp, D, sc.krow.data(), sc.r.data(), Wp, sc.xrow.data(), nullptr);
    if (need_dg) {
      // dg_r = sum of the pair terms T_ts with s < r <= t (module comment). In the chunk, r local:
      // intra-chunk pairs (s < r <= t, both in it), pairs from earlier keys to the chunk's queries
      // t >= r (dbq), pairs from the chunk's keys s < r to later queries (wk_s v_s . (K R)_s), and
      // the pairs across the whole chunk (bnd)
      for (int64_t t = 0; t < cl; ++t) {
        sc.kx[t] = sc.ew[t] * dot(sc.v.data() + t * Wp, sc.x.data() + t * Xw, Dv);
        sc.rsum[t] = 0.0, sc.csum[t] = 0.0;
      }
      for (int64_t t = 1; t < cl; ++t) {  // M[t][s] = at[s][t] (do_t . v_s), s < t
        const float* rr = sc.raw.data() + t * Cp;
        double acc = 0.0;
        for (int64_t s2 = 0; s2 < t; ++s2) {
          const double m = static_cast<double>(sc.at[s2 * Cp + t]) * rr[s2];
          acc += m;
          sc.csum[s2] += m;
        }
        sc.rsum[t] = acc;
      }
      double intra = 0.0, later_q = 0.0, earlier_k = 0.0;
      for (int64_t t = 0; t < cl; ++t) later_q += sc.dbq[c0 + t];
      for (int64_t r = 0; r < cl; ++r) {  // intra(r) = sum of M[t][s] over s < r <= t
        const double dgr = intra + later_q + earlier_k + bnd;
        P.dg[bh * P.S + c0 + r] = static_cast<float>(dgr);
        total += dgr;
        intra += sc.csum[r] - sc.rsum[r];
        later_q -= sc.dbq[c0 + r];
        earlier_k += sc.kx[r];
      }
    }
    for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, cl - r0);
      for (int64_t i = 0; i < mr; ++i) atc[i] = sc.at.data() + (r0 + i) * Cp + r0;
      gemm_rows<true>(mr, Wp, cl - r0, atc, sc.dO.data() + r0 * Wp, Wp, sc.xrow.data() + r0, sc.ew.data() + r0);
    }
    for (int64_t t = 0; t < cl; ++t) {
      float* out = P.dv + (bhk * P.S + c0 + t) * Dv;
      const float* xr = sc.x.data() + t * Xw;
      for (int64_t j = 0; j < Dv; ++j) out[j] += xr[j];
    }
    // dk^T = Q^T (w o dA) + R (V wk)^T, then back to rows
    gemm_rows<false>(D, Cp, cl, sc.qtrow.data(), sc.p.data(), Cp, sc.dktrow.data(), nullptr);
    for (int64_t j = 0; j < Dv; ++j) {
      const float* src = sc.vt.data() + j * Cp;
      float* dst = sc.vtw.data() + j * Cp;
      for (int64_t t = 0; t < Cp; ++t) dst[t] = src[t] * (t < cl ? sc.ew[t] : 0.f);
    }
    gemm_rows<true>(D, Cp, Dv, sc.rrow_c.data(), sc.vtw.data(), Cp, sc.dktrow.data(), sc.ones.data());
    transpose_rows(sc.dktrow_c.data(), D, cl, sc.dkr.data(), Dp);
    for (int64_t t = cl - 1; t >= 0; --t) {
      const float* qr = sc.q.data() + t * Dp;
      float* dkr = sc.dkr.data() + t * Dp;
      float* out = P.dk + (bhk * P.S + c0 + t) * D;
      const float dg = sc.diag[t];
      for (int64_t d = 0; d < D; ++d) out[d] += dkr[d] + dg * qr[d];
    }
    // R = dl R + (Q scale e)^T dO
    for (int64_t d = 0; d < D; ++d) {
      const float* src = sc.qt.data() + d * Cp;
      float* dst = sc.qts.data() + d * Cp;
      for (int64_t t = 0; t < cl; ++t) dst[t] = src[t] * sc.ro[t];
    }
    std::fill(sc.dl.begin(), sc.dl.end(), elast);
    gemm_rows<true>(D, Wp, cl, sc.qtsrow.data(), sc.dO.data(), Wp, sc.rrow.data(), sc.dl.data());
  }
  for (int64_t d = 0; d < D; ++d) std::copy_n(sc.r.data() + d * Wp, Dv, P.ds0 + (bh * D + d) * Dv);
  if (need_dg) P.dgsum[bh] = total;
}

template <int DT>
void bwd_all(const LinearBwdParams& P) {
  // a task per (batch, kv head) looping its G query heads (dk, dv summed in place); per (batch,
  // query head) into per-head dk, dv buffers when that leaves threads idle (kv_per_head)
  const int64_t G = P.kv_per_head ? 1 : P.H / P.Hkv;
  at::parallel_for(0, P.B * P.H / G, 1, [&](int64_t lo, int64_t hi) {
    BwdScratch sc(std::min(P.C, std::max<int64_t>(P.S, 1)), P.D, P.Dv, P.S);
    for (int64_t u = lo; u < hi; ++u)
      for (int64_t i = 0; i < G; ++i) bwd_head<DT>(P, u / (P.H / G), (u % (P.H / G)) * G + i, sc);
  });
}

}  // namespace
}  // namespace sparse_attn_cpu

// The backward of linear_fwd (same q, k, v, decay, initial_state, scale, chunk), for the output
// gradient dout `(B, H, S, Dv)` (q's dtype, last dim contiguous) and the final state's gradient
// dstate `(B, H, D, Dv)` or None (zero). decay_grad: compute d(decay) (with a decay; it costs a
// stored state per chunk). Returns float32 (dq `(B, H, S, D)`, dk `(B, Hkv, S, D)`, dv
// `(B, Hkv, S, Dv)`, dg `(B, H, S)` (None without a decay or decay_grad), d(initial state)
// `(B, H, D, Dv)`, float64 `(B, H)` sums of dg over the tokens (None with dg), for a per-head
// decay); dk, dv are summed over each kv head's query heads (GQA).
std::vector<torch::Tensor> linear_bwd(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                      c10::optional<torch::Tensor> decay, c10::optional<torch::Tensor> initial_state,
                                      torch::Tensor dout, c10::optional<torch::Tensor> dstate, double scale,
                                      int64_t chunk, bool decay_grad) {
  using namespace sparse_attn_cpu;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && dout.dim() == 4,
              "linear_bwd: q, k, v, dout must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && dout.device().is_cpu(),
              "linear_bwd: CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "linear_bwd: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && dout.scalar_type() == dt,
              "linear_bwd: q, k, v, dout must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), Dv = v.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && Hkv > 0 && H % Hkv == 0 && k.size(2) == S && k.size(3) == D,
              "linear_bwd: k must be (B, Hkv, S, D) with H % Hkv == 0");
  TORCH_CHECK(v.size(0) == B && v.size(1) == Hkv && v.size(2) == S, "linear_bwd: v must be (B, Hkv, S, Dv)");
  TORCH_CHECK(dout.size(0) == B && dout.size(1) == H && dout.size(2) == S && dout.size(3) == Dv,
              "linear_bwd: dout must be (B, H, S, Dv)");
  TORCH_CHECK(chunk > 0, "linear_bwd: chunk must be positive");
  if (S > 0 && D > 1) TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "linear_bwd: q, k need a contiguous last dim");
  if (S > 0 && Dv > 1)
    TORCH_CHECK(v.stride(3) == 1 && dout.stride(3) == 1, "linear_bwd: v, dout need a contiguous last dim");
  auto f32 = q.options().dtype(torch::kFloat32);
  const bool has_g = decay.has_value() && decay->defined();
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const bool kv_per_head = H > Hkv && B * Hkv < nthreads && B > 0 && S > 0 && D > 0 && Dv > 0;
  const int64_t Hb = kv_per_head ? H : Hkv;
  auto dq = torch::empty({B, H, S, D}, f32);
  auto dk = torch::zeros({B, Hb, S, D}, f32);
  auto dv = torch::zeros({B, Hb, S, Dv}, f32);
  auto dg = has_g && decay_grad ? torch::zeros({B, H, S}, f32) : torch::Tensor();
  auto dgsum = has_g && decay_grad ? torch::zeros({B, H}, f32.dtype(torch::kFloat64)) : torch::Tensor();
  auto ds0 = torch::zeros({B, H, D, Dv}, f32);
  torch::Tensor s0, dsf, g;
  if (dstate.has_value() && dstate->defined()) {
    dsf = dstate->to(torch::kFloat32).contiguous();
    TORCH_CHECK(dsf.dim() == 4 && dsf.size(0) == B && dsf.size(1) == H && dsf.size(2) == D && dsf.size(3) == Dv,
                "linear_bwd: dstate must be (B, H, D, Dv)");
  }
  if (B == 0 || H == 0 || D == 0 || Dv == 0) return {dq, dk, dv, dg, ds0, dgsum};
  if (S == 0) {  // the state passes through unchanged
    if (dsf.defined()) ds0.copy_(dsf);
    dq.zero_();
    return {dq, dk, dv, dg, ds0, dgsum};
  }
  LinearBwdParams P{};
  if (initial_state.has_value() && initial_state->defined()) {
    s0 = initial_state->to(torch::kFloat32).contiguous();
    TORCH_CHECK(s0.dim() == 4 && s0.size(0) == B && s0.size(1) == H && s0.size(2) == D && s0.size(3) == Dv,
                "linear_bwd: initial_state must be (B, H, D, Dv)");
    P.s0 = s0.data_ptr<float>();
  }
  if (has_g) {
    g = *decay;
    TORCH_CHECK(g.scalar_type() == torch::kFloat32 && g.dim() == 3 && g.size(0) == B && g.size(1) == H &&
                    g.size(2) == S, "linear_bwd: decay must be float32 (B, H, S)");
    P.g = g.data_ptr<float>();
    for (int i = 0; i < 3; ++i) P.gs[i] = g.stride(i);
    if (decay_grad) {
      P.dg = dg.data_ptr<float>();
      P.dgsum = dgsum.data_ptr<double>();
      P.need_dg = true;
    }
  }
  P.B = B, P.H = H, P.Hkv = Hkv, P.S = S, P.D = D, P.Dv = Dv, P.C = chunk;
  P.q = q.data_ptr(), P.k = k.data_ptr(), P.v = v.data_ptr(), P.dout = dout.data_ptr();
  for (int i = 0; i < 3; ++i)
    P.qs[i] = q.stride(i), P.ks[i] = k.stride(i), P.vs[i] = v.stride(i), P.dos[i] = dout.stride(i);
  P.dsf = dsf.defined() ? dsf.data_ptr<float>() : nullptr;
  P.dq = dq.data_ptr<float>(), P.dk = dk.data_ptr<float>(), P.dv = dv.data_ptr<float>();
  P.ds0 = ds0.data_ptr<float>();
  P.scale = static_cast<float>(scale);
  P.kv_per_head = kv_per_head;
  with_float_tag(dt, [&](auto tag) { bwd_all<decltype(tag)::value>(P); });
  if (kv_per_head) {  // the group's query heads are adjacent: h = hk * G + i
    dk = dk.view({B, Hkv, H / Hkv, S, D}).sum(2);
    dv = dv.view({B, Hkv, H / Hkv, S, Dv}).sum(2);
  }
  return {dq, dk, dv, dg, ds0, dgsum};
}

