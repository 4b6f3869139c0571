// Chunked linear attention forward on the CPU (the contract's "Linear attention"):
//
//     S_t = exp(g_t) S_{t-1} + k_t v_t^T,      o_t = scale q_t^T S_t
//
// computed chunk by chunk (C tokens, b_t = sum of g from the chunk start to t, inclusive):
//
//     o_t    = scale ( exp(b_t) q_t^T S_prev + sum_{s<=t} exp(b_t - b_s) (q_t . k_s) v_s )
//     S_next = exp(b_last) S_prev + sum_s exp(b_last - b_s) k_s v_s^T
//
// Why a C++ kernel: in PyTorch each of these products is a separate op over a temporary, and at
// C = 64 the batched small matmuls ran at about half the rate of a large GEMM, with the causal
// half of every `q k^T` computed and then masked. Here one (batch, head) walks its chunks (C = 32
// from the Python side) with a chunk's k^T, P, the output rows and the (D, Dv) state in
// per-thread scratch or cache (the state stays resident in L2); float32 q, k, v are read in place
// (k transposed through registers), and every product runs on vec.h's register-blocked
// micro-kernel (`gemm_rows`); the causal products visit only the lower triangle (per row tile of
// kMR rows: the keys up to the tile's last row, rounded up to a vector).
//
// Per chunk, in order: O = Q S_prev; P = Q K^T (lower triangle); P *= scale exp(b_t - b_s) for
// s < t, scale on the diagonal, 0 above; O = scale exp(b_t) O + P V (the rescale of the
// micro-kernel's accumulate mode); S = exp(b_last) S + (K exp(to_end))^T V, with to_end the sum of
// g over (s, last] summed directly (not a difference of cumulative sums), as the PyTorch
// reference does. The cumulative decays are summed in double, every exponent used is <= 0 for
// g <= 0, and only s < t differences are exponentiated (vector lanes past the diagonal get -200
// and are discarded). The next chunk's rows are prefetched while one computes.
//
// Work is split over (batch, head) and, when there are fewer of those than threads, over column
// blocks of Dv (the recurrence is independent per output column; P is then recomputed per block).
// GQA: k, v keep their Hkv heads. Inputs float32 / bfloat16 / float16 (converted to float32 on
// load), float32 state and output. The backward (`linear_bwd`) is the second half of this file.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/target_check.h"
#include "cpu/huge_pages.h"
#include "cpu/linear_common.h"
#include "cpu/prefetch.h"
#include "cpu/vec.h"
#include "cpu/dtype_tag.h"

namespace sparse_attn_cpu {
namespace {

using linear_detail::chunk_decays;
using linear_detail::kLog2e;
using linear_detail::transpose_rows;

struct LinearParams {
  int64_t B, H, Hkv, S, D, Dv, C;  // k, v have Hkv heads (GQA: head h reads kv head h / (H / Hkv))
  const void *q, *k, *v;
  int64_t qs[3], ks[3], vs[3];  // strides of batch, head, token (the last dim is contiguous)
  const float* g;               // log-decays, or nullptr
  int64_t gs[3];
  const float* s0;  // (B, H, D, Dv) contiguous, or nullptr
  float* out;       // (B, H, S, Dv) contiguous
  float* sfinal;    // (B, H, D, Dv) contiguous
  float scale;
};


// Per-thread scratch, with the row pointers the micro-kernel takes.
struct Scratch {
  int64_t C, Cp, D, Wp;
  std::vector<float> q, kc, kt, kw, v, p, o, st, tmp, zeros, ew, ro, rs;
  std::vector<double> bc;
  std::vector<const float*> qrow, krow, prow, ktrow, kwrow;
  std::vector<float*> prow_w, orow, strow;

  Scratch(int64_t C_, int64_t D_, int64_t Wp_) : C(C_), Cp(round_up(C_, kVec)), D(D_), Wp(Wp_) {
    q.assign(C * D, 0.f);
    kc.assign(C * D, 0.f);
    kt.assign(D * Cp, 0.f);
    kw.assign(D * Cp, 0.f);
    v.assign(C * Wp, 0.f);
    p.assign(C * Cp, 0.f);
    o.assign(C * Wp, 0.f);
    st.assign(D * Wp, 0.f);
    tmp.assign(Cp, 0.f);
    zeros.assign(Cp, 0.f);
    ew.assign(C, 0.f);
    ro.assign(C, 0.f);
    rs.assign(D, 0.f);
    bc.assign(C, 0.0);
    qrow.resize(C);
    krow.resize(C);
    orow.resize(C);
    for (int64_t t = 0; t < C; ++t) {
      prow.push_back(p.data() + t * Cp);
      prow_w.push_back(p.data() + t * Cp);
    }
    for (int64_t d = 0; d < D; ++d) {
      ktrow.push_back(kt.data() + d * Cp);
      kwrow.push_back(kw.data() + d * Cp);
      strow.push_back(st.data() + d * Wp);
    }
  }
};

template <typename T>
inline void prefetch_rows(const T* base, int64_t stride, int64_t n, int64_t len) {
  for (int64_t t = 0; t < n; ++t) {
    const char* r = reinterpret_cast<const char*>(base + t * stride);
    sparse_attn_cpu::prefetch_lines<2>(r, len * int64_t(sizeof(T)));
  }
}

// One (batch, head, column block [j0, j0 + w)) over the whole sequence.
template <int DT>
void run_unit(const LinearParams& P, int64_t bh, int64_t j0, int64_t w, Scratch& sc) {
  using In = typename Elem<DT>::T;
  const int64_t b = bh / P.H, h = bh % P.H, hk = h / (P.H / P.Hkv), D = P.D, Dv = P.Dv, Cp = sc.Cp, Wp = sc.Wp;
  const In* qb = static_cast<const In*>(P.q) + b * P.qs[0] + h * P.qs[1];
  const In* kb = static_cast<const In*>(P.k) + b * P.ks[0] + hk * P.ks[1];
  const In* vb = static_cast<const In*>(P.v) + b * P.vs[0] + hk * P.vs[1] + j0;
  const float* gb = P.g == nullptr ? nullptr : P.g + b * P.gs[0] + h * P.gs[1];
  float* ob = P.out + bh * P.S * Dv + j0;
  float* st = sc.st.data();
  // float32 inputs are read in place (and the output written in place) when the column block
  // needs no padding; other dtypes are converted into scratch
  constexpr bool kInPlace = DT == 0;
  const bool vo_in_place = kInPlace && w == Wp;

  for (int64_t d = 0; d < D; ++d) {
    float* row = st + d * Wp;
    std::fill(row, row + Wp, 0.f);
    if (P.s0 != nullptr) std::copy_n(P.s0 + (bh * D + d) * Dv + j0, w, row);
  }

  for (int64_t c0 = 0; c0 < P.S; c0 += P.C) {
    const int64_t cl = std::min(P.C, P.S - c0);
    const int64_t c1 = c0 + cl;
    if (c1 < P.S) {  // the next chunk's rows, into L2, while this one computes
      const int64_t nl = std::min(P.C, P.S - c1);
      prefetch_rows(qb + c1 * P.qs[2], P.qs[2], nl, D);
      prefetch_rows(kb + c1 * P.ks[2], P.ks[2], nl, D);
      prefetch_rows(vb + c1 * P.vs[2], P.vs[2], nl, w);
    }
    // the chunk: q rows, k transposed (the B operand of Q K^T), the v column block
    for (int64_t t = 0; t < cl; ++t) {
      if constexpr (kInPlace) {
        sc.qrow[t] = reinterpret_cast<const float*>(qb + (c0 + t) * P.qs[2]);
        sc.krow[t] = reinterpret_cast<const float*>(kb + (c0 + t) * P.ks[2]);
      } else {
        load_row<DT>(sc.q.data() + t * D, qb + (c0 + t) * P.qs[2], D, 1, 1.f);
        load_row<DT>(sc.kc.data() + t * D, kb + (c0 + t) * P.ks[2], D, 1, 1.f);
        sc.qrow[t] = sc.q.data() + t * D;
        sc.krow[t] = sc.kc.data() + t * D;
      }
    }
    float* kt = sc.kt.data();
    transpose_rows(sc.krow.data(), cl, D, kt, Cp);
    if (cl < Cp)
      for (int64_t d = 0; d < D; ++d) std::fill(kt + d * Cp + cl, kt + (d + 1) * Cp, 0.f);
    const float* vp;
    int64_t ldv;
    if (vo_in_place) {
      vp = reinterpret_cast<const float*>(vb + c0 * P.vs[2]);
      ldv = P.vs[2];
      for (int64_t t = 0; t < cl; ++t) sc.orow[t] = ob + (c0 + t) * Dv;
    } else {
      for (int64_t t = 0; t < cl; ++t) {
        float* vr = sc.v.data() + t * Wp;
        load_row<DT>(vr, vb + (c0 + t) * P.vs[2], w, 1, 1.f);
        std::fill(vr + w, vr + Wp, 0.f);
        sc.orow[t] = sc.o.data() + t * Wp;
      }
      vp = sc.v.data();
      ldv = Wp;
    }

    // decays of the chunk: b_t (inclusive cumulative sum, double); ew_t = exp(sum of g over (t, last])
    float elast = 1.f;
    if (gb != nullptr) {
      elast = chunk_decays(gb + c0 * P.gs[2], P.gs[2], cl, P.scale, sc.bc.data(), sc.ro.data(), sc.ew.data());
    } else {
      std::fill(sc.ro.begin(), sc.ro.begin() + cl, P.scale);
    }

    // O = Q S_prev
    gemm_rows<false>(cl, Wp, D, sc.qrow.data(), st, Wp, sc.orow.data(), nullptr);

    // P = Q K^T over the lower triangle, one row tile at a time
    for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, cl - r0);
      const int64_t n = std::min(Cp, round_up(r0 + mr, kVec));
      gemm_rows<false>(mr, n, D, sc.qrow.data() + r0, kt, Cp, sc.prow_w.data() + r0, nullptr);
    }
    // P *= scale exp(b_t - b_s) below the diagonal, scale on it, 0 above (up to the chunk end:
    // the P V products of a row tile read up to its last row)
    for (int64_t t = 0; t < cl; ++t) {
      float* pr = sc.p.data() + t * Cp;
      if (gb != nullptr && t > 0) {
        float* e = sc.tmp.data();
        const double bt = sc.bc[t];
        for (int64_t s = 0; s < t; ++s) e[s] = static_cast<float>((bt - sc.bc[s]) * kLog2e);
        const int64_t tv = round_up(t, kVec);
        for (int64_t s = t; s < tv; ++s) e[s] = -200.f;
        exp2_sub_cols(e, sc.zeros.data(), tv);
        for (int64_t s = 0; s < t; ++s) pr[s] *= P.scale * e[s];
      } else {
        for (int64_t s = 0; s < t; ++s) pr[s] *= P.scale;
      }
      pr[t] *= P.scale;
      std::fill(pr + t + 1, pr + cl, 0.f);
    }
    // O = scale exp(b_t) O + P V
    for (int64_t r0 = 0; r0 < cl; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, cl - r0);
      gemm_rows<true>(mr, Wp, r0 + mr, sc.prow.data() + r0, vp, ldv, sc.orow.data() + r0, sc.ro.data() + r0);
    }
    if (!vo_in_place)
      for (int64_t t = 0; t < cl; ++t) std::copy_n(sc.o.data() + t * Wp, w, ob + (c0 + t) * Dv);

    // S = exp(b_last) S + (K exp(to_end))^T V
    const float* const* arows = sc.ktrow.data();
    if (gb != nullptr) {
      for (int64_t d = 0; d < D; ++d) {
        const float* src = kt + d * Cp;
        float* dst = sc.kw.data() + d * Cp;
        for (int64_t s = 0; s < cl; ++s) dst[s] = src[s] * sc.ew[s];
      }
      arows = sc.kwrow.data();
    }
    std::fill(sc.rs.begin(), sc.rs.end(), elast);
    gemm_rows<true>(D, Wp, cl, arows, vp, ldv, sc.strow.data(), sc.rs.data());
  }

  for (int64_t d = 0; d < D; ++d) std::copy_n(st + d * Wp, w, P.sfinal + (bh * D + d) * Dv + j0);
}

template <int DT>
void run_all(const LinearParams& P) {
  const int64_t BH = P.B * P.H;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // column blocks only when (batch, head) alone leaves threads idle
  int64_t nsplit = 1;
  if (BH < nthreads) nsplit = std::min((nthreads + BH - 1) / BH, std::max<int64_t>(1, P.Dv / (2 * kVec)));
  const int64_t width = round_up((P.Dv + nsplit - 1) / nsplit, kVec);
  nsplit = (P.Dv + width - 1) / width;
  at::parallel_for(0, BH * nsplit, 1, [&](int64_t lo, int64_t hi) {
    Scratch sc(std::min(P.C, std::max<int64_t>(P.S, 1)), P.D, width);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t j0 = (u % nsplit) * width;
      run_unit<DT>(P, u / nsplit, j0, std::min(width, P.Dv - j0), sc);
    }
  });
}

}  // namespace
}  // namespace sparse_attn_cpu


// q `(B, H, S, D)`, k `(B, Hkv, S, D)`, v `(B, Hkv, S, Dv)` (H % Hkv == 0: GQA read in place), one dtype of float32 /
// bfloat16 / float16, last dim contiguous; decay: float32 `(B, H, S)` log-decays (any strides:
// a per-head decay is passed expanded) or None; initial_state: float32 `(B, H, D, Dv)` or None.
// Returns (o float32 `(B, H, S, Dv)`, final state float32 `(B, H, D, Dv)`).
std::tuple<torch::Tensor, torch::Tensor> linear_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                    c10::optional<torch::Tensor> decay,
                                                    c10::optional<torch::Tensor> initial_state, double scale,
                                                    int64_t chunk) {
  using namespace sparse_attn_cpu;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "linear_fwd: q, k, v must be 4-D (B, H, S, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "linear_fwd: CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "linear_fwd: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "linear_fwd: q, k, v must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), Dv = v.size(3), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == B && Hkv > 0 && H % Hkv == 0 && k.size(2) == S && k.size(3) == D,
              "linear_fwd: k must be (B, Hkv, S, D) with H % Hkv == 0");
  TORCH_CHECK(v.size(0) == B && v.size(1) == Hkv && v.size(2) == S, "linear_fwd: v must be (B, Hkv, S, Dv)");
  TORCH_CHECK(chunk > 0, "linear_fwd: chunk must be positive");
  if (S > 0 && D > 1) TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "linear_fwd: q, k need a contiguous last dim");
  if (S > 0 && Dv > 1) TORCH_CHECK(v.stride(3) == 1, "linear_fwd: v needs a contiguous last dim");
  auto f32 = q.options().dtype(torch::kFloat32);
  auto out = sparse_attn_cpu::empty_huge({B, H, S, Dv}, f32, false);
  torch::Tensor s0;
  if (initial_state.has_value() && initial_state->defined()) {
    s0 = initial_state->to(torch::kFloat32).contiguous();
    TORCH_CHECK(s0.dim() == 4 && s0.size(0) == B && s0.size(1) == H && s0.size(2) == D && s0.size(3) == Dv,
                "linear_fwd: initial_state must be (B, H, D, Dv)");
  }
  auto sfinal = s0.defined() ? s0.clone() : torch::zeros({B, H, D, Dv}, f32);
  if (B == 0 || H == 0 || S == 0 || D == 0 || Dv == 0) {
    out.zero_();
    return {out, sfinal};
  }
  torch::Tensor g;
  LinearParams P{};
  if (decay.has_value() && decay->defined()) {
    g = *decay;
    TORCH_CHECK(g.scalar_type() == torch::kFloat32 && g.dim() == 3 && g.size(0) == B && g.size(1) == H &&
                    g.size(2) == S, "linear_fwd: decay must be float32 (B, H, S)");
    P.g = g.data_ptr<float>();
    for (int i = 0; i < 3; ++i) P.gs[i] = g.stride(i);
  }
  P.B = B, P.H = H, P.Hkv = Hkv, P.S = S, P.D = D, P.Dv = Dv, P.C = chunk;
  P.q = q.data_ptr(), P.k = k.data_ptr(), P.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) P.qs[i] = q.stride(i), P.ks[i] = k.stride(i), P.vs[i] = v.stride(i);
  P.s0 = s0.defined() ? s0.data_ptr<float>() : nullptr;
  P.out = out.data_ptr<float>();
  P.sfinal = sfinal.data_ptr<float>();
  P.scale = static_cast<float>(scale);
  with_float_tag(dt, [&](auto tag) { run_all<decltype(tag)::value>(P); });
  return {out, sfinal};
}

// the backward, linear_bwd.cpp
std::vector<torch::Tensor> linear_bwd(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                      c10::optional<torch::Tensor> decay, c10::optional<torch::Tensor> initial_state,
                                      torch::Tensor dout, c10::optional<torch::Tensor> dstate, double scale,
                                      int64_t chunk, bool decay_grad);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SPARSE_ATTN_CHECK_TARGET();  // refuse to load on a CPU without this build's features
  m.doc() = "sparse_attn CPU chunked linear attention forward and backward";
  m.def("linear_fwd", &linear_fwd, "chunked linear attention forward -> (o float32, final state float32)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("decay"), py::arg("initial_state"), py::arg("scale"),
        py::arg("chunk"));
  m.def("linear_bwd", &linear_bwd,
        "chunked linear attention backward -> float32 (dq, dk, dv, d(decay) or None, d(initial state), "
        "float64 sums of d(decay) over the tokens or None)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("decay"), py::arg("initial_state"), py::arg("dout"),
        py::arg("dstate"), py::arg("scale"), py::arg("chunk"), py::arg("decay_grad"));
}
