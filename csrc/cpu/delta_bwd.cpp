// Backward of the chunked delta rule on the CPU (scalar decays). Per (batch, value head): a forward
// sweep keeps the state entering every chunk (n x D x Dv floats per thread), then a reverse sweep
// recomputes each chunk (delta_common.h: prepare_chunk, U = Wv - W S0) and differentiates it.
// With dO the output's gradient and dS that of the state leaving the chunk (forward formulas in
// delta.cpp; Kend = exp(b_last - b) * K, Qd = exp(b) * Q, W' = -W):
//
//     dU   = P^T dO + Kend dS
//     dX   = [dU, dU S0^T]                               (X = [Wv, W'],  U = Wv + W' S0)
//     dR   = T^T dX,   dT = dX R^T                       (X = T R)
//     dA   = -T^T dT T^T  (strict lower)                 (T = (I + A)^{-1}, A = diag(beta) G)
//     dS0  = exp(b_last) dS + (scale Qd)^T dO + W'^T dU
//
// then the chain through R = [beta V, -beta exp(b) K], G = (K K^T) * Gamma, P = scale (Q K^T) * Gamma
// (Gamma_ts = exp(b_t - b_s)), Qd, Kend and exp(b_last) gives dq, dk, dv, d(beta) and d(b); d(g) is
// the reverse cumulative sum of d(b) within the chunk. q and k arrive normalised (qk_l2norm is
// differentiated in Python); value heads get their own dq, dk rows, summed over the group in Python.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/delta_common.h"
#include "cpu/vec.h"

namespace sparse_attn_cpu {
namespace {

using namespace delta_detail;

struct Grads {
  const float* dout;    // (B, Hv, S, Dv) contiguous
  const float* dstate;  // (B, Hv, D, Dv) contiguous, or nullptr
  float *dq, *dk;       // (B, Hv, S, D)
  float* dv;            // (B, Hv, S, Dv)
  float* dbeta;         // (B, Hv, S)
  float* dg;            // (B, Hv, S), or nullptr
  float* ds0;           // (B, Hv, D, Dv)
};

// A row-major buffer with the row pointers the micro-kernel takes.
struct Mat {
  std::vector<float> m;
  std::vector<float*> w;
  std::vector<const float*> r;
  int64_t ld = 0;
  void init(int64_t rows, int64_t ld_) {
    ld = ld_;
    m.assign(rows * ld, 0.f);
    for (int64_t i = 0; i < rows; ++i) {
      w.push_back(m.data() + i * ld);
      r.push_back(m.data() + i * ld);
    }
  }
  float* operator[](int64_t i) { return m.data() + i * ld; }
  float* data() { return m.data(); }
};

struct BwdScratch {
  Mat dO, dU, dX, dR, rt, tt, pt, dT, m1, dA, dP, e1, e2, e1t, e2t, ut, s0t, dst, v1, dke, dq, dk, kend, qdt, wt, vr,
      st, ds, ds2;
  std::vector<double> db;
  std::vector<float> saved;
  BwdScratch(const Scratch& sc, int64_t Dv) {
    const int64_t C = sc.C, Cp = sc.Cp, D = sc.D, Dp = sc.Dp, Dvp = sc.Dvp, Xw = sc.Xw;
    for (Mat* x : {&dO, &dU}) x->init(C, Dvp);
    for (Mat* x : {&dX, &dR}) x->init(C, Xw);
    rt.init(Xw, Cp);
    for (Mat* x : {&tt, &pt, &dT, &m1, &dA, &dP, &e1, &e2, &e1t, &e2t}) x->init(C, Cp);
    ut.init(Dvp, Cp);
    for (Mat* x : {&s0t, &dst}) x->init(Dvp, Dp);
    for (Mat* x : {&v1, &dke, &dq, &dk, &kend}) x->init(C, Dp);
    for (Mat* x : {&qdt, &wt}) x->init(D, Cp);
    vr.init(C, Dvp);
    for (Mat* x : {&st, &ds, &ds2}) x->init(D, Dvp);
    db.assign(C, 0.0);
    (void)Dv;
  }
};

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <int DT>
void bwd_unit(const DeltaParams& P, const Grads& G, int64_t bh, Scratch& sc, BwdScratch& bs) {
  const Unit<DT> u(P, bh);
  const int64_t D = P.D, Dv = P.Dv, Cp = sc.Cp, Dp = sc.Dp, Dvp = sc.Dvp, Xw = sc.Xw, S = P.S;
  const int64_t nchunks = (S + P.C - 1) / P.C;
  const bool decays = u.gb != nullptr;
  bs.saved.resize(nchunks * D * Dvp);
  // forward sweep: the state entering every chunk
  for (int64_t d = 0; d < D; ++d) {
    std::fill(bs.st[d], bs.st[d] + Dvp, 0.f);
    std::copy_n(P.state + (bh * D + d) * Dv, Dv, bs.st[d]);
  }
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t c0 = c * P.C, cl = std::min(P.C, S - c0);
    std::copy_n(bs.st.data(), D * Dvp, bs.saved.data() + c * D * Dvp);
    const float elast = prepare_chunk<DT>(P, u, c0, cl, sc);
    gemm_rows<true>(cl, Dvp, D, sc.wrow.data(), bs.st.data(), Dvp, sc.xrow.data(), sc.ones.data());
    for (int64_t d = 0; d < D; ++d) {
      const float* src = sc.kt.data() + d * Cp;
      float* dst = sc.kw.data() + d * Cp;
      for (int64_t s = 0; s < cl; ++s) dst[s] = src[s] * sc.ew[s];
    }
    std::fill(sc.rs.begin(), sc.rs.end(), elast);
    gemm_rows<true>(D, Dvp, cl, sc.kwrow.data(), sc.x.data(), Xw, bs.st.w.data(), sc.rs.data());
  }
  // dS: the returned state's gradient
  for (int64_t d = 0; d < D; ++d) {
    std::fill(bs.ds[d], bs.ds[d] + Dvp, 0.f);
    if (G.dstate != nullptr) std::copy_n(G.dstate + (bh * D + d) * Dv, Dv, bs.ds[d]);
  }
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t c0 = c * P.C, cl = std::min(P.C, S - c0);
    float* s0 = bs.saved.data() + c * D * Dvp;
    std::vector<const float*> s0row(D);
    for (int64_t d = 0; d < D; ++d) s0row[d] = s0 + d * Dvp;
    const float elast = prepare_chunk<DT>(P, u, c0, cl, sc);
    gemm_rows<true>(cl, Dvp, D, sc.wrow.data(), s0, Dvp, sc.xrow.data(), sc.ones.data());  // U, in x[:, :Dvp]
    for (int64_t t = 0; t < cl; ++t) {
      std::copy_n(G.dout + (bh * S + c0 + t) * Dv, Dv, bs.dO[t]);
      load_row<DT>(bs.vr[t], u.vb + (c0 + t) * P.vs[2], Dv, 1, 1.f);
      for (int64_t d = 0; d < D; ++d) bs.kend[t][d] = sc.k[t * Dp + d] * sc.ew[t];
    }
    // dU = P^T dO + Kend dS
    transpose_rows(sc.prow.data(), cl, cl, bs.pt.data(), Cp);
    gemm_rows<false>(cl, Dvp, cl, bs.pt.r.data(), bs.dO.data(), Dvp, bs.dU.w.data(), nullptr);
    gemm_rows<true>(cl, Dvp, D, bs.kend.r.data(), bs.ds.data(), Dvp, bs.dU.w.data(), sc.ones.data());
    // dX = [dU, dU S0^T]
    transpose_rows(s0row.data(), D, Dv, bs.s0t.data(), Dp);
    for (int64_t t = 0; t < cl; ++t) std::copy_n(bs.dU[t], Dvp, bs.dX[t]);
    {
      std::vector<float*> dxw(cl);
      for (int64_t t = 0; t < cl; ++t) dxw[t] = bs.dX[t] + Dvp;
      gemm_rows<false>(cl, Dp, Dv, bs.dU.r.data(), bs.s0t.data(), Dp, dxw.data(), nullptr);
    }
    // dR = T^T dX, dT = dX R^T
    transpose_rows(sc.trow.data(), cl, cl, bs.tt.data(), Cp);
    gemm_rows<false>(cl, Xw, cl, bs.tt.r.data(), bs.dX.data(), Xw, bs.dR.w.data(), nullptr);
    transpose_rows(sc.rrow.data(), cl, Xw, bs.rt.data(), Cp);
    gemm_rows<false>(cl, Cp, Xw, bs.dX.r.data(), bs.rt.data(), Cp, bs.dT.w.data(), nullptr);
    // dA = -T^T (dT T^T)
    gemm_rows<false>(cl, Cp, cl, bs.dT.r.data(), bs.tt.data(), Cp, bs.m1.w.data(), nullptr);
    gemm_rows<false>(cl, Cp, cl, bs.tt.r.data(), bs.m1.data(), Cp, bs.dA.w.data(), nullptr);
    // dP = dO U^T
    transpose_rows(sc.xrow_c.data(), cl, Dv, bs.ut.data(), Cp);
    gemm_rows<false>(cl, Cp, Dv, bs.dO.r.data(), bs.ut.data(), Cp, bs.dP.w.data(), nullptr);

    std::fill_n(bs.db.begin(), cl, 0.0);
    for (int64_t t = 0; t < cl; ++t) {
      std::fill(bs.dq[t], bs.dq[t] + Dp, 0.f);
      std::fill(bs.dk[t], bs.dk[t] + Dp, 0.f);
    }
    // the triangles: e1 = dG * Gamma (strict lower; dG = beta_t dA_ts, dA = -m), e2 = scale dP * Gamma (lower)
    for (int64_t t = 0; t < cl; ++t) {
      const float bt = sc.beta[t];
      const float* a = sc.a.data() + t * Cp;   // G_ts = (k_t . k_s) Gamma_ts
      const float* gm = sc.gam.data() + t * Cp;
      const float* pr = sc.p.data() + t * Cp;
      const float* da = bs.dA[t];
      const float* dp = bs.dP[t];
      float* e1 = bs.e1[t];
      float* e2 = bs.e2[t];
      double dbeta = 0.0;
      for (int64_t s = 0; s < t; ++s) {
        const float dA = -da[s];
        dbeta += static_cast<double>(dA) * a[s];
        const float dG = bt * dA;
        e1[s] = dG * gm[s];
        e2[s] = P.scale * dp[s] * gm[s];
        if (decays) {
          const double dl = static_cast<double>(dG) * a[s] + static_cast<double>(dp[s]) * pr[s];
          bs.db[t] += dl;
          bs.db[s] -= dl;
        }
      }
      std::fill(e1 + t, e1 + Cp, 0.f);
      e2[t] = P.scale * dp[t];
      std::fill(e2 + t + 1, e2 + Cp, 0.f);
      // R = [beta v, -beta exp(b) k]
      const float* dr = bs.dR[t];
      const float* kr = sc.k.data() + t * Dp;
      const float ed = sc.ed[t];
      dbeta += dot(dr, bs.vr[t], Dv);
      const float dkr = dot(dr + Dvp, kr, D);
      dbeta -= static_cast<double>(ed) * dkr;
      if (decays) bs.db[t] -= static_cast<double>(bt) * ed * dkr;
      float* dk = bs.dk[t];
      for (int64_t d = 0; d < D; ++d) dk[d] -= bt * ed * dr[Dvp + d];
      float* dvo = G.dv + (bh * S + c0 + t) * Dv;
      for (int64_t j = 0; j < Dv; ++j) dvo[j] = bt * dr[j];
      G.dbeta[bh * S + c0 + t] = static_cast<float>(dbeta);
    }
    // dk += e1 K + e1^T K + e2^T Q;  dq += e2 K
    transpose_rows(bs.e1.r.data(), cl, cl, bs.e1t.data(), Cp);
    transpose_rows(bs.e2.r.data(), cl, cl, bs.e2t.data(), Cp);
    std::vector<float> one(cl, 1.f);
    gemm_rows<true>(cl, Dp, cl, bs.e1.r.data(), sc.k.data(), Dp, bs.dk.w.data(), one.data());
    gemm_rows<true>(cl, Dp, cl, bs.e1t.r.data(), sc.k.data(), Dp, bs.dk.w.data(), one.data());
    gemm_rows<true>(cl, Dp, cl, bs.e2t.r.data(), sc.q.data(), Dp, bs.dk.w.data(), one.data());
    gemm_rows<true>(cl, Dp, cl, bs.e2.r.data(), sc.k.data(), Dp, bs.dq.w.data(), one.data());
    // O = ro (Q S0) + ...: dq += ro dO S0^T
    gemm_rows<false>(cl, Dp, Dv, bs.dO.r.data(), bs.s0t.data(), Dp, bs.v1.w.data(), nullptr);
    // Kend: dKend = U dS^T
    transpose_rows(bs.ds.r.data(), D, Dv, bs.dst.data(), Dp);
    gemm_rows<false>(cl, Dp, Dv, sc.xrow_c.data(), bs.dst.data(), Dp, bs.dke.w.data(), nullptr);
    double dblast = 0.0;
    for (int64_t t = 0; t < cl; ++t) {
      const float* qr = sc.q.data() + t * Dp;
      const float* kr = sc.k.data() + t * Dp;
      const float ro = sc.ro[t], ew = sc.ew[t];
      float* dq = bs.dq[t];
      float* dk = bs.dk[t];
      const float* v1 = bs.v1[t];
      const float* dke = bs.dke[t];
      for (int64_t d = 0; d < D; ++d) {
        dq[d] += ro * v1[d];
        dk[d] += ew * dke[d];
      }
      if (decays) {
        bs.db[t] += static_cast<double>(ro) * dot(qr, v1, D);
        const double ct = static_cast<double>(ew) * dot(kr, dke, D);
        dblast += ct;
        bs.db[t] -= ct;
      }
      std::copy_n(dq, D, G.dq + (bh * S + c0 + t) * D);
      std::copy_n(dk, D, G.dk + (bh * S + c0 + t) * D);
    }
    if (decays) {
      double sd = 0.0;
      for (int64_t d = 0; d < D; ++d) sd += dot(bs.ds[d], s0 + d * Dvp, Dv);
      dblast += static_cast<double>(elast) * sd;
      bs.db[cl - 1] += dblast;
      if (G.dg != nullptr) {
        double acc = 0.0;
        for (int64_t t = cl - 1; t >= 0; --t) {
          acc += bs.db[t];
          G.dg[bh * S + c0 + t] = static_cast<float>(acc);
        }
      }
    }
    // dS_prev = exp(b_last) dS + (ro Q)^T dO + W'^T dU
    for (int64_t t = 0; t < cl; ++t)
      for (int64_t d = 0; d < D; ++d) bs.qdt[d][t] = sc.q[t * Dp + d] * sc.ro[t];
    transpose_rows(sc.wrow.data(), cl, D, bs.wt.data(), Cp);
    std::fill(sc.rs.begin(), sc.rs.end(), elast);
    gemm_rows<true>(D, Dvp, cl, bs.qdt.r.data(), bs.dO.data(), Dvp, bs.ds.w.data(), sc.rs.data());
    gemm_rows<true>(D, Dvp, cl, bs.wt.r.data(), bs.dU.data(), Dvp, bs.ds.w.data(), sc.ones.data());
  }
  for (int64_t d = 0; d < D; ++d) std::copy_n(bs.ds[d], Dv, G.ds0 + (bh * D + d) * Dv);
}

template <int DT>
void bwd_all(const DeltaParams& P, const Grads& G) {
  at::parallel_for(0, P.B * P.Hv, 1, [&](int64_t lo, int64_t hi) {
    Scratch sc(std::min(P.C, std::max<int64_t>(P.S, 1)), P.D, P.Dv);
    BwdScratch bs(sc, P.Dv);
    for (int64_t u = lo; u < hi; ++u) bwd_unit<DT>(P, G, u, sc, bs);
  });
}

}  // namespace
}  // namespace sparse_attn_cpu

// defined in delta.cpp: validates the inputs and fills the parameters (state = a copy of
// initial_state or zeros)
std::tuple<torch::Tensor, torch::Tensor> delta_setup(sparse_attn_cpu::delta_detail::DeltaParams& P,
                                                     const torch::Tensor& q, const torch::Tensor& k,
                                                     const torch::Tensor& v, const torch::Tensor& beta,
                                                     const c10::optional<torch::Tensor>& decay,
                                                     const c10::optional<torch::Tensor>& initial_state,
                                                     double scale, bool l2, const char* fn);

// Gradients of the chunked forward (same inputs; q, k already normalised if qk_l2norm), float32:
// (dq (B, Hv, S, D), dk (B, Hv, S, D), dv (B, Hv, S, Dv), dbeta (B, Hv, S), dg (B, Hv, S) or an
// empty tensor, d(initial state) (B, Hv, D, Dv)). dq, dk are per value head (sum over the group).
std::vector<torch::Tensor> delta_bwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor beta,
                                     c10::optional<torch::Tensor> decay, c10::optional<torch::Tensor> initial_state,
                                     torch::Tensor dout, c10::optional<torch::Tensor> dstate, double scale,
                                     int64_t chunk) {
  using namespace sparse_attn_cpu;
  using namespace sparse_attn_cpu::delta_detail;
  TORCH_CHECK(chunk > 0, "delta_bwd: chunk must be positive");
  DeltaParams P;
  auto [out, state] = delta_setup(P, q, k, v, beta, decay, initial_state, scale, false, "delta_bwd");
  TORCH_CHECK(!P.per_channel, "delta_bwd: scalar decays (B, Hv, S) only");
  P.C = chunk;
  const int64_t B = P.B, Hv = P.Hv, S = P.S, D = P.D, Dv = P.Dv;
  auto f32 = q.options().dtype(torch::kFloat32);
  TORCH_CHECK(dout.scalar_type() == torch::kFloat32 && dout.is_contiguous() && dout.dim() == 4 && dout.size(0) == B &&
                  dout.size(1) == Hv && dout.size(2) == S && dout.size(3) == Dv,
              "delta_bwd: dout must be contiguous float32 (B, Hv, S, Dv)");
  torch::Tensor ds;
  if (dstate.has_value() && dstate->defined()) {
    ds = dstate->to(torch::kFloat32).contiguous();
    TORCH_CHECK(ds.dim() == 4 && ds.size(0) == B && ds.size(1) == Hv && ds.size(2) == D && ds.size(3) == Dv,
                "delta_bwd: dstate must be (B, Hv, D, Dv)");
  }
  auto dq = torch::zeros({B, Hv, S, D}, f32), dk = torch::zeros({B, Hv, S, D}, f32);
  auto dv = torch::zeros({B, Hv, S, Dv}, f32), dbeta = torch::zeros({B, Hv, S}, f32);
  auto dg = P.g != nullptr ? torch::zeros({B, Hv, S}, f32) : torch::empty({0}, f32);
  auto ds0 = ds.defined() ? ds.clone() : torch::zeros({B, Hv, D, Dv}, f32);
  if (B == 0 || Hv == 0 || S == 0 || D == 0 || Dv == 0) return {dq, dk, dv, dbeta, dg, ds0};
  Grads G{dout.data_ptr<float>(), ds.defined() ? ds.data_ptr<float>() : nullptr, dq.data_ptr<float>(),
          dk.data_ptr<float>(), dv.data_ptr<float>(), dbeta.data_ptr<float>(),
          P.g != nullptr ? dg.data_ptr<float>() : nullptr, ds0.data_ptr<float>()};
  if (P.dtype == 0) bwd_all<0>(P, G);
  else if (P.dtype == 1) bwd_all<1>(P, G);
  else bwd_all<2>(P, G);
  return {dq, dk, dv, dbeta, dg, ds0};
}
