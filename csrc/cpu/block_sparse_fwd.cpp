// Block-sparse flash-attention forward on the CPU over sparse_attn's BlockLayout.
//
// One task per (batch, kv head, query tile): the G query heads of the kv head and the tile's rows
// form one block of R = G * rows query rows, so each K/V block is converted and read once for the
// whole group. Online softmax in float32 over the tile's full blocks (no mask), its partial blocks
// (the layout's token rule), then TopK's per-token blocks (full for their token). Rows that see no
// key output 0. Nothing of size Sq x Sk is allocated: scratch is R x k_block per task.
//
// First cut (issue 4 continues it): inputs are converted to float32 once, inner loops are plain
// C++ written for the compiler's vectoriser (omp simd), no hand-written AVX-512 BF16 yet.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Layout {
  const int32_t* full_count; const int32_t* full_index;
  const int32_t* part_count; const int32_t* part_index;
  int64_t lb, lh, width_full, width_part;  // broadcast extents (1 or B / Hkv) and list widths
  const int32_t* token_index; int64_t topk;  // (B, Hkv, Sq, topk) or null
};

struct Rule {  // the token rule on partial blocks
  bool causal; int64_t window; int64_t sinks;  // window < 0: none
  bool visible(int64_t p, int64_t j) const {
    if (causal && j > p) return false;
    if (window >= 0 && !(p - j < window || j < sinks)) return false;
    return true;
  }
};

// Online-softmax state of R rows.
struct Rows {
  int64_t R, dv;
  std::vector<float> m, l, acc, s;
  Rows(int64_t R_, int64_t dv_, int64_t kb) : R(R_), dv(dv_), m(R_, kNegInf), l(R_, 0.f), acc(R_ * dv_, 0.f), s(kb) {}
};

// scores of rows [r_begin, r_end) (row r reads q_rows[r]) against keys [j0, j1), then the online update.
// mask(r, j) -> bool is consulted only when Masked.
template <bool Masked, typename MaskFn>
void attend_block(Rows& st, const float* const* q_rows, int64_t r_begin, int64_t r_end, const float* kf,
                  const float* vf, int64_t j0, int64_t j1, int64_t d, float scale, MaskFn mask) {
  const int64_t nk = j1 - j0;
  const int64_t dv = st.dv;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float* qr = q_rows[r];
    float* srow = st.s.data();  // one row at a time: s holds its nk scores
    float mx = kNegInf;
    for (int64_t j = 0; j < nk; ++j) {
      if (Masked && !mask(r, j0 + j)) { srow[j] = kNegInf; continue; }
      const float* kj = kf + (j0 + j) * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t t = 0; t < d; ++t) dot += qr[t] * kj[t];
      srow[j] = dot * scale;
      mx = std::max(mx, srow[j]);
    }
    if (mx == kNegInf) continue;  // nothing visible in this block for this row
    const float m_new = std::max(st.m[r], mx);
    const float corr = st.m[r] == kNegInf ? 0.f : std::exp(st.m[r] - m_new);
    float* ar = st.acc.data() + r * dv;
    if (corr != 1.f) {
#pragma omp simd
      for (int64_t t = 0; t < dv; ++t) ar[t] *= corr;
    }
    float lsum = 0.f;
    for (int64_t j = 0; j < nk; ++j) {
      if (srow[j] == kNegInf) continue;
      const float p = std::exp(srow[j] - m_new);
      lsum += p;
      const float* vj = vf + (j0 + j) * dv;
#pragma omp simd
      for (int64_t t = 0; t < dv; ++t) ar[t] += p * vj[t];
    }
    st.l[r] = st.l[r] * corr + lsum;
    st.m[r] = m_new;
  }
}

}  // namespace

torch::Tensor block_sparse_fwd(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor full_count,
                               torch::Tensor full_index, torch::Tensor part_count, torch::Tensor part_index,
                               c10::optional<torch::Tensor> token_index, int64_t sq, int64_t sk, int64_t q_block,
                               int64_t k_block, bool causal, int64_t window, int64_t sinks, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "block_sparse_fwd: q, k, v must be 4-D");
  TORCH_CHECK(q.device().is_cpu(), "block_sparse_fwd: CPU tensors only");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(q.size(2) == sq && k.size(2) == sk && v.size(2) == sk, "block_sparse_fwd: lengths disagree with the layout");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "block_sparse_fwd: Hq must be a multiple of Hkv");
  const int64_t G = Hq / Hkv;
  auto qf = q.to(torch::kFloat32).contiguous();
  auto kf = k.to(torch::kFloat32).contiguous();
  auto vf = v.to(torch::kFloat32).contiguous();
  auto out = torch::zeros({B, Hq, sq, Dv}, q.options().dtype(torch::kFloat32));
  auto fc = full_count.to(torch::kInt32).contiguous(), fi = full_index.to(torch::kInt32).contiguous();
  auto pc = part_count.to(torch::kInt32).contiguous(), pi = part_index.to(torch::kInt32).contiguous();
  torch::Tensor ti;
  Layout L{fc.data_ptr<int32_t>(), fi.data_ptr<int32_t>(), pc.data_ptr<int32_t>(), pi.data_ptr<int32_t>(),
           fc.size(0), fc.size(1), fi.size(3), pi.size(3), nullptr, 0};
  if (token_index.has_value() && token_index->defined()) {
    ti = token_index->to(torch::kInt32).contiguous();
    L.token_index = ti.data_ptr<int32_t>();
    L.topk = ti.size(3);
  }
  const int64_t M = fc.size(2);
  if (B == 0 || sq == 0 || M == 0) return out.to(q.scalar_type());
  const Rule rule{causal, window, sinks};
  const int64_t off = sk - sq, tile0 = off / q_block;
  const float fscale = static_cast<float>(scale);
  const float* Q = qf.data_ptr<float>();
  const float* K = kf.data_ptr<float>();
  const float* V = vf.data_ptr<float>();
  float* O = out.data_ptr<float>();

  at::parallel_for(0, B * Hkv * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % M, h = (task / M) % Hkv, b = task / (M * Hkv);
      const int64_t p_lo = std::max((tile0 + i) * q_block, off), p_hi = std::min((tile0 + i + 1) * q_block, sk);
      const int64_t t_lo = p_lo - off, rows = p_hi - p_lo, R = G * rows;
      if (rows <= 0) continue;
      Rows st(R, Dv, k_block);
      std::vector<const float*> qrow(R);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < rows; ++r)
          qrow[g * rows + r] = Q + (((b * Hq + h * G + g) * sq) + t_lo + r) * D;
      const float* Kb = K + (b * Hkv + h) * sk * D;
      const float* Vb = V + (b * Hkv + h) * sk * Dv;
      const int64_t lb = L.lb == 1 ? 0 : b, lh = L.lh == 1 ? 0 : h;
      const int64_t lrow = (lb * L.lh + lh) * M + i;
      auto visit = [&](int64_t n, bool masked) {
        const int64_t j0 = n * k_block, j1 = std::min(j0 + k_block, sk);
        if (!masked) {
          attend_block<false>(st, qrow.data(), 0, R, Kb, Vb, j0, j1, D, fscale, [](int64_t, int64_t) { return true; });
        } else {
          attend_block<true>(st, qrow.data(), 0, R, Kb, Vb, j0, j1, D, fscale,
                             [&](int64_t r, int64_t j) { return rule.visible(p_lo + r % rows, j); });
        }
      };
      for (int64_t e = 0; e < L.full_count[lrow]; ++e) visit(L.full_index[lrow * L.width_full + e], false);
      for (int64_t e = 0; e < L.part_count[lrow]; ++e) visit(L.part_index[lrow * L.width_part + e], true);
      if (L.token_index != nullptr) {
        // per token: its selected blocks, for the G heads of the group (rows r, r + rows, ...)
        std::vector<const float*> grp(G);
        Rows one(G, Dv, k_block);
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t* sel = L.token_index + ((b * Hkv + h) * sq + t_lo + r) * L.topk;
          bool any = false;
          for (int64_t e = 0; e < L.topk; ++e) any |= sel[e] >= 0;
          if (!any) continue;
          for (int64_t g = 0; g < G; ++g) {
            grp[g] = qrow[g * rows + r];
            one.m[g] = st.m[g * rows + r];
            one.l[g] = st.l[g * rows + r];
            std::copy_n(st.acc.data() + (g * rows + r) * Dv, Dv, one.acc.data() + g * Dv);
          }
          for (int64_t e = 0; e < L.topk; ++e) {
            if (sel[e] < 0) continue;
            const int64_t j0 = int64_t(sel[e]) * k_block, j1 = std::min(j0 + k_block, sk);
            attend_block<false>(one, grp.data(), 0, G, Kb, Vb, j0, j1, D, fscale, [](int64_t, int64_t) { return true; });
          }
          for (int64_t g = 0; g < G; ++g) {
            st.m[g * rows + r] = one.m[g];
            st.l[g * rows + r] = one.l[g];
            std::copy_n(one.acc.data() + g * Dv, Dv, st.acc.data() + (g * rows + r) * Dv);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t rr = g * rows + r;
          float* o = O + (((b * Hq + h * G + g) * sq) + t_lo + r) * Dv;
          const float inv = st.l[rr] > 0.f ? 1.f / st.l[rr] : 0.f;
          const float* a = st.acc.data() + rr * Dv;
#pragma omp simd
          for (int64_t t = 0; t < Dv; ++t) o[t] = a[t] * inv;
        }
      }
    }
  });
  return out.to(q.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_attn CPU kernels";
  m.def("block_sparse_fwd", &block_sparse_fwd, "block-sparse flash attention forward over a BlockLayout",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("full_count"), py::arg("full_index"),
        py::arg("partial_count"), py::arg("partial_index"), py::arg("token_index"), py::arg("sq"), py::arg("sk"),
        py::arg("q_block"), py::arg("k_block"), py::arg("causal"), py::arg("window"), py::arg("sink_tokens"),
        py::arg("scale"));
}
