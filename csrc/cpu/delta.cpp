// The delta rule on the CPU (the contract's "Delta-rule linear attention"): the chunked forward
// (prefill) for scalar decays, and the step-by-step form (decode: 1 to a few tokens) for every
// decay kind. Per value head, state S (D, Dv) float32:
//
//     S' = diag(exp(g_t)) S_{t-1},   S_t = S' + beta_t k_t (v_t - S'^T k_t)^T,   o_t = scale S_t^T q_t
//
// Chunked form (sparse_attn/backends/reference/delta.py derives it): per chunk of C tokens with
// b_t = sum of g from the chunk start to t (double, relative to the chunk start),
//
//     A_ts = beta_t exp(b_t - b_s) k_t . k_s (s < t),     T = (I + A)^{-1}       (unit lower triangular)
//     [Wv, -W] = T [beta V, -beta exp(b) K]                                       (the UT transform)
//     U = Wv - W S_prev
//     O = scale exp(b) (Q S_prev) + P U,   P_ts = scale exp(b_t - b_s) q_t . k_s (s <= t)
//     S = exp(b_last) S_prev + (exp(b_last - b) K)^T U
//
// Work per chunk: the triangles K K^T and Q K^T (row tiles, lower part only), T by forward
// substitution (C^3 / 6, scalar), T R as a triangular product, and three state products; every
// product runs on vec.h's register-blocked micro-kernel (`gemm_rows`). Exponents are differences
// b_t - b_s with s <= t, or decays summed to the chunk end directly: <= 0 for g <= 0. A decay below
// -1000 (-inf: a full reset) is clamped there (exp is exactly 0 in float32 either way).
//
// Work is split over (batch, value head); value head h reads q/k head h / (Hv / Hk) in place (never
// expanded). Inputs float32 / bfloat16 / float16 (converted on load; qk_l2norm applied on load),
// float32 beta, decays, state and output. Arguments travel in one parameter struct.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/target_check.h"
#include "cpu/huge_pages.h"
#include "cpu/delta_common.h"
#include "cpu/vec.h"
#include "cpu/dtype_tag.h"

namespace sparse_attn_cpu {
namespace {

using namespace delta_detail;

template <int DT>
void chunked_unit(const DeltaParams& P, int64_t bh, Scratch& sc) {
  const Unit<DT> u(P, bh);
  const int64_t D = P.D, Dv = P.Dv, Dvp = sc.Dvp, Xw = sc.Xw, Cp = sc.Cp;
  float* ob = P.out + bh * P.S * Dv;
  float* sp = P.state + bh * D * Dv;
  // the state, padded to Dvp columns (a copy in scratch: stays in L2 across chunks)
  std::vector<float> st(D * Dvp, 0.f);
  std::vector<float*> strow(D);
  for (int64_t d = 0; d < D; ++d) {
    strow[d] = st.data() + d * Dvp;
    std::copy_n(sp + d * Dv, Dv, strow[d]);
  }
  for (int64_t c0 = 0; c0 < P.S; c0 += P.C) {
    const int64_t cl = std::min(P.C, P.S - c0);
    const float elast = prepare_chunk<DT>(P, u, c0, cl, sc);
    // U = Wv - W S_prev, in place of Wv
    gemm_rows<true>(cl, Dvp, D, sc.wrow.data(), st.data(), Dvp, sc.xrow.data(), sc.ones.data());
    // O = scale exp(b) Q S_prev + P U
    gemm_rows<false>(cl, Dvp, D, sc.qrow.data(), st.data(), Dvp, sc.orow.data(), nullptr);
    for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, cl - r0);
      gemm_rows<true>(mr, Dvp, r0 + mr, sc.prow.data() + r0, sc.x.data(), Xw, sc.orow.data() + r0, sc.ro.data() + r0);
    }
    for (int64_t t = 0; t < cl; ++t) std::copy_n(sc.o.data() + t * Dvp, Dv, ob + (c0 + t) * Dv);
    // S = exp(b_last) S_prev + (exp(b_last - b) K)^T U
    for (int64_t d = 0; d < D; ++d) {
      const float* src = sc.kt.data() + d * Cp;
      float* dst = sc.kw.data() + d * Cp;
      for (int64_t s = 0; s < cl; ++s) dst[s] = src[s] * sc.ew[s];
    }
    std::fill(sc.rs.begin(), sc.rs.end(), elast);
    gemm_rows<true>(D, Dvp, cl, sc.kwrow.data(), sc.x.data(), Xw, strow.data(), sc.rs.data());
  }
  for (int64_t d = 0; d < D; ++d) std::copy_n(strow[d], Dv, sp + d * Dv);
}

template <int DT>
void chunked_all(const DeltaParams& P) {
  at::parallel_for(0, P.B * P.Hv, 1, [&](int64_t lo, int64_t hi) {
    Scratch sc(std::min(P.C, std::max<int64_t>(P.S, 1)), P.D, P.Dv);
    for (int64_t u = lo; u < hi; ++u) chunked_unit<DT>(P, u, sc);
  });
}

// ------------------------------------------------------------------------------ step by step
// One (batch, value head) over its tokens: two passes over S (D x Dv) per token, the decay and
// S'^T k in the first, the rank-1 update and S^T q in the second.
template <int DT>
void step_unit(const DeltaParams& P, int64_t bh, std::vector<float>& buf) {
  using In = typename Elem<DT>::T;
  const int64_t b = bh / P.Hv, h = bh % P.Hv, hk = h / (P.Hv / P.Hk), D = P.D, Dv = P.Dv;
  float* q = buf.data();
  float* k = q + D;
  float* v = k + D;
  float* pred = v + Dv;
  float* o = pred + Dv;
  float* e = o + Dv;
  float* st = P.state + bh * D * Dv;
  for (int64_t t = 0; t < P.S; ++t) {
    load_qk<DT>(q, static_cast<const In*>(P.q) + b * P.qs[0] + hk * P.qs[1] + t * P.qs[2], D, P.l2);
    load_qk<DT>(k, static_cast<const In*>(P.k) + b * P.ks[0] + hk * P.ks[1] + t * P.ks[2], D, P.l2);
    load_row<DT>(v, static_cast<const In*>(P.v) + b * P.vs[0] + h * P.vs[1] + t * P.vs[2], Dv, 1, 1.f);
    const float bt = P.beta[b * P.bs[0] + h * P.bs[1] + t * P.bs[2]];
    if (P.g != nullptr) {
      const float* gt = P.g + b * P.gs[0] + h * P.gs[1] + t * P.gs[2];
      for (int64_t d = 0; d < D; ++d) e[d] = std::exp(std::max(gt[P.per_channel ? d : 0], kGFloor));
    } else {
      std::fill_n(e, D, 1.f);
    }
    std::fill_n(pred, Dv, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      float* row = st + d * Dv;
      const float ed = e[d], kd = k[d];
#pragma omp simd
      for (int64_t j = 0; j < Dv; ++j) {
        row[j] *= ed;
        pred[j] += kd * row[j];
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < Dv; ++j) pred[j] = bt * (v[j] - pred[j]);  // u
    std::fill_n(o, Dv, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      float* row = st + d * Dv;
      const float kd = k[d], qd = q[d];
#pragma omp simd
      for (int64_t j = 0; j < Dv; ++j) {
        row[j] += kd * pred[j];
        o[j] += qd * row[j];
      }
    }
    float* dst = P.out + (bh * P.S + t) * Dv;
    for (int64_t j = 0; j < Dv; ++j) dst[j] = P.scale * o[j];
  }
}

template <int DT>
void step_all(const DeltaParams& P) {
  // a parallel region only for at least ~1 MB of states per thread: a decode step of one layer
  // (B = 1, 16 heads of 128 x 128) is ~0.1 ms of memory traffic, which a thread-pool wake-up on a
  // busy machine can exceed many times over
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, P.S * P.D * P.Dv));
  at::parallel_for(0, P.B * P.Hv, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(3 * P.D + 3 * P.Dv, 0.f);
    for (int64_t u = lo; u < hi; ++u) step_unit<DT>(P, u, buf);
  });
}

}  // namespace
}  // namespace sparse_attn_cpu

using sparse_attn_cpu::delta_detail::DeltaParams;

// Validates and fills the parameters (shared with delta_bwd.cpp); returns (out, state) to be
// written, state a copy of initial_state (or zeros).
std::tuple<torch::Tensor, torch::Tensor> delta_setup(DeltaParams& P, const torch::Tensor& q, const torch::Tensor& k,
                                               const torch::Tensor& v, const torch::Tensor& beta,
                                               const c10::optional<torch::Tensor>& decay,
                                               const c10::optional<torch::Tensor>& initial_state, double scale,
                                               bool l2, const char* fn) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, fn, ": q, k, v must be 4-D (B, H, S, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), fn, ": CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16, fn,
              ": dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, fn, ": q, k, v must share one dtype");
  const int64_t B = q.size(0), Hk = q.size(1), S = q.size(2), D = q.size(3), Hv = v.size(1), Dv = v.size(3);
  TORCH_CHECK(k.sizes() == q.sizes(), fn, ": k must have q's shape");
  TORCH_CHECK(v.size(0) == B && v.size(2) == S && Hk > 0 && Hv % Hk == 0, fn, ": v must be (B, Hv, S, Dv), Hv % Hk == 0");
  if (S > 0 && D > 1) TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, fn, ": q, k need a contiguous last dim");
  if (S > 0 && Dv > 1) TORCH_CHECK(v.stride(3) == 1, fn, ": v needs a contiguous last dim");
  TORCH_CHECK(beta.scalar_type() == torch::kFloat32 && beta.dim() == 3 && beta.size(0) == B && beta.size(1) == Hv &&
                  beta.size(2) == S, fn, ": beta must be float32 (B, Hv, S)");
  auto f32 = q.options().dtype(torch::kFloat32);
  torch::Tensor state;
  if (initial_state.has_value() && initial_state->defined()) {
    TORCH_CHECK(initial_state->dim() == 4 && initial_state->size(0) == B && initial_state->size(1) == Hv &&
                    initial_state->size(2) == D && initial_state->size(3) == Dv, fn,
                ": initial_state must be (B, Hv, D, Dv)");
    state = initial_state->to(torch::kFloat32).contiguous().clone();
  } else {
    state = torch::zeros({B, Hv, D, Dv}, f32);
  }
  auto out = sparse_attn_cpu::empty_huge({B, Hv, S, Dv}, f32, false);
  P = DeltaParams{};
  P.B = B, P.Hk = Hk, P.Hv = Hv, P.S = S, P.D = D, P.Dv = Dv;
  P.dtype = sparse_attn_cpu::float_tag(dt);
  P.q = q.data_ptr(), P.k = k.data_ptr(), P.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) P.qs[i] = q.stride(i), P.ks[i] = k.stride(i), P.vs[i] = v.stride(i), P.bs[i] = beta.stride(i);
  P.beta = beta.data_ptr<float>();
  if (decay.has_value() && decay->defined()) {
    const auto& g = *decay;
    TORCH_CHECK(g.scalar_type() == torch::kFloat32 && (g.dim() == 3 || g.dim() == 4) && g.size(0) == B &&
                    g.size(1) == Hv && g.size(2) == S && (g.dim() == 3 || (g.size(3) == D && g.stride(3) == 1)),
                fn, ": decay must be float32 (B, Hv, S) or (B, Hv, S, D) with a contiguous last dim");
    P.g = g.data_ptr<float>();
    P.per_channel = g.dim() == 4;
    for (int i = 0; i < 3; ++i) P.gs[i] = g.stride(i);
  }
  P.state = state.data_ptr<float>();
  P.out = out.data_ptr<float>();
  P.scale = static_cast<float>(scale);
  P.l2 = l2;
  return {out, state};
}


// q, k `(B, Hk, S, D)`, v `(B, Hv, S, Dv)` one dtype of float32 / bfloat16 / float16 (last dim
// contiguous); beta float32 `(B, Hv, S)`; decay float32 `(B, Hv, S)` or None; initial_state
// `(B, Hv, D, Dv)` or None. Returns (o float32 `(B, Hv, S, Dv)`, final state float32).
std::tuple<torch::Tensor, torch::Tensor> delta_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor beta,
                                                   c10::optional<torch::Tensor> decay,
                                                   c10::optional<torch::Tensor> initial_state, double scale,
                                                   bool qk_l2norm, int64_t chunk) {
  using namespace sparse_attn_cpu;
  using namespace sparse_attn_cpu::delta_detail;
  TORCH_CHECK(chunk > 0, "delta_fwd: chunk must be positive");
  DeltaParams P;
  auto [out, state] = delta_setup(P, q, k, v, beta, decay, initial_state, scale, qk_l2norm, "delta_fwd");
  TORCH_CHECK(!P.per_channel, "delta_fwd: the chunked kernel takes scalar decays (B, Hv, S) only");
  P.C = chunk;
  if (P.B == 0 || P.Hv == 0 || P.S == 0 || P.D == 0 || P.Dv == 0) {
    out.zero_();
    return {out, state};
  }
  if (P.dtype == 0) chunked_all<0>(P);
  else if (P.dtype == 1) chunked_all<1>(P);
  else chunked_all<2>(P);
  return {out, state};
}

// The step-by-step form (decode): same arguments, any decay kind including (B, Hv, S, D).
std::tuple<torch::Tensor, torch::Tensor> delta_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor beta,
                                                    c10::optional<torch::Tensor> decay,
                                                    c10::optional<torch::Tensor> initial_state, double scale,
                                                    bool qk_l2norm) {
  using namespace sparse_attn_cpu;
  using namespace sparse_attn_cpu::delta_detail;
  DeltaParams P;
  auto [out, state] = delta_setup(P, q, k, v, beta, decay, initial_state, scale, qk_l2norm, "delta_step");
  if (P.B == 0 || P.Hv == 0 || P.S == 0 || P.D == 0 || P.Dv == 0) {
    out.zero_();
    return {out, state};
  }
  if (P.dtype == 0) step_all<0>(P);
  else if (P.dtype == 1) step_all<1>(P);
  else step_all<2>(P);
  return {out, state};
}

// delta_bwd.cpp
std::vector<torch::Tensor> delta_bwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor beta,
                                     c10::optional<torch::Tensor> decay, c10::optional<torch::Tensor> initial_state,
                                     torch::Tensor dout, c10::optional<torch::Tensor> dstate, double scale,
                                     int64_t chunk);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SPARSE_ATTN_CHECK_TARGET();  // refuse to load on a CPU without this build's features
  m.doc() = "sparse_attn CPU delta rule: chunked forward and the step-by-step form";
  m.def("delta_fwd", &delta_fwd, "chunked delta rule forward -> (o float32, final state float32)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("decay"), py::arg("initial_state"), py::arg("scale"),
        py::arg("qk_l2norm"), py::arg("chunk"));
  m.def("delta_step", &delta_step, "step-by-step delta rule (decode) -> (o float32, final state float32)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("decay"), py::arg("initial_state"),
        py::arg("scale"), py::arg("qk_l2norm"));
  m.def("delta_bwd", &delta_bwd,
        "chunked delta rule backward -> float32 (dq, dk per value head, dv, dbeta, dg or empty, d(initial state))",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("decay"), py::arg("initial_state"),
        py::arg("dout"), py::arg("dstate"), py::arg("scale"), py::arg("chunk"));
}
