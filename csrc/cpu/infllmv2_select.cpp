// InfLLMv2 block selection on the CPU (the contract's "InfLLMv2 semantics", steps 3-5), for the
// rows of a prefill (or any rows end-aligned to Sk).
//
// Per (batch, kv head, chunk of kRows query rows), for each of the G query heads of the group:
//   F = q_h . kc^T over the fine kernels the chunk's last row can see (vec.h's float32 micro-kernel,
//       q pre-multiplied by scale * log2(e), so every exp is an exp2);
//   per row: LSE_h over its visible coarse kernels (q_h . kc2^T the same way, or, when kernel_size
//       is a multiple a of the stride (the models), the mean of the fine scores F[4c + a m], m < 4,
//       whose windows tile coarse window c: no second product; "coarse") or over its visible fine
//       ones ("exact"); S[j] += 2^(F[j] - LSE_h) on its visible fine kernels.
// Then per row: block score = max of S over kernels [r*b - 1, r*b + r) (r = bs / stride), the
// candidates [forced_init, qb - window_blocks], and the best `extra(qb)` of them by a running top-w
// (ties to the lower block index; a NaN score ranks first, as the PyTorch selection). Scratch per
// thread: kRows x (fine + coarse kernels) floats; nothing of size Sq x Sk or Sq x kernels at once.
// The caller (sparse_attn/backends/cpu/infllmv2.py) builds kc / kc2 (means, float32, transposed
// and padded to the vector width) in one pass over K.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/infllmv2_rows.h"
#include "cpu/target_check.h"
#include "cpu/vec.h"
#include "cpu/dtype_tag.h"

namespace sparse_attn_cpu {
namespace {

constexpr int64_t kRows = 48;
using infllmv2::add_exp2;
using infllmv2::kLog2e;
using infllmv2::lse2;
using infllmv2::visible;

struct Params {
  int64_t B, Hq, Hkv, G, sq, sk, D;
  int64_t n1, n1_pad, n2, n2_pad;  // fine / coarse kernels (coarse: 0 for "exact")
  int64_t nb;
  int64_t from_fine;  // > 0: coarse scores from the fine ones (kernel_size = from_fine * stride)
  infllmv2::Rule rule;
  float qmul;  // scale * log2(e)
  int64_t qst[4];
  const float* kct;   // (B, Hkv, D, n1_pad)
  const float* kc2t;  // (B, Hkv, D, n2_pad) or null
  int32_t* out;       // (B, Hkv, Sq, topk)
};

template <int DT>
void run_task(const Params& P, const typename Elem<DT>::T* Q, int64_t b, int64_t h, int64_t t0, std::vector<float>& qa,
              std::vector<float>& f, std::vector<float>& c, std::vector<float>& s, std::vector<float>& score,
              std::vector<int32_t>& ids) {
  const int64_t t1 = std::min(P.sq, t0 + kRows), rows = t1 - t0, off = P.sk - P.sq;
  const infllmv2::Rule& R = P.rule;
  int32_t* out = P.out + ((b * P.Hkv + h) * P.sq + t0) * R.topk;
  std::fill_n(out, rows * R.topk, -1);
  const int64_t last = off + t1 - 1;
  const int64_t n1 = visible(last, R.ks, R.st, P.n1), n1c = round_up(std::max<int64_t>(n1, 1), kVec);
  const int64_t n2 = R.coarse ? visible(last, 4 * R.ks, 4 * R.st, P.n2) : 0;
  const int64_t n2c = round_up(std::max<int64_t>(n2, 1), kVec);
  // nothing to pick in any row of the chunk (the last row has the most candidates); rows that see
  // no kernel still pick (all scores 0: the lowest candidates, as ties go)
  if (last / R.bs - R.window < R.forced_init) return;
  std::fill_n(s.data(), rows * n1c, 0.f);
  std::vector<const float*> ap(rows);
  std::vector<float*> fp(rows), cp(rows);
  for (int64_t r = 0; r < rows; ++r) {
    ap[r] = qa.data() + r * P.D;
    fp[r] = f.data() + r * n1c;
    cp[r] = c.data() + r * n2c;
  }
  const float* kct = P.kct + (b * P.Hkv + h) * P.D * P.n1_pad;
  const float* kc2t = P.kc2t != nullptr ? P.kc2t + (b * P.Hkv + h) * P.D * P.n2_pad : nullptr;
  for (int64_t g = 0; g < P.G; ++g) {
    for (int64_t r = 0; r < rows; ++r)
      load_row<DT>(qa.data() + r * P.D, Q + b * P.qst[0] + (h * P.G + g) * P.qst[1] + (t0 + r) * P.qst[2], P.D,
                   P.qst[3], P.qmul);
    gemm_rows<false>(rows, n1c, P.D, ap.data(), kct, P.n1_pad, fp.data(), nullptr);
    if (R.coarse && n2 > 0 && P.from_fine > 0) {
      // coarse window c (4 ks keys from 4 st c) is the mean of the fine windows 4c + a m, m < 4
      // (a = ks / st): its score is the mean of theirs, no second product over the keys
      const int64_t a = P.from_fine;
      for (int64_t r = 0; r < rows; ++r) {
        const float* fr = fp[r];
        float* cr = cp[r];
        for (int64_t j = 0; j < n2; ++j)
          cr[j] = 0.25f * (((fr[4 * j] + fr[4 * j + a]) + fr[4 * j + 2 * a]) + fr[4 * j + 3 * a]);
      }
    } else if (R.coarse && n2 > 0) {
      gemm_rows<false>(rows, n2c, P.D, ap.data(), kc2t, P.n2_pad, cp.data(), nullptr);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t p = off + t0 + r;
      const int64_t v1 = visible(p, R.ks, R.st, n1);
      if (v1 == 0) continue;
      float norm;
      if (R.coarse) {
        const int64_t v2 = visible(p, 4 * R.ks, 4 * R.st, n2);
        if (v2 == 0) continue;  // no coarse kernel visible: 0 scores
        norm = lse2(cp[r], v2);
      } else {
        norm = lse2(fp[r], v1);
      }
      if (norm == kNegInf) continue;  // only -inf normalising scores: 0 scores, as the PyTorch path
      add_exp2(s.data() + r * n1c, fp[r], v1, norm);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = off + t0 + r;
    infllmv2::pick_row(R, p, P.nb, s.data() + r * n1c, visible(p, R.ks, R.st, n1), score.data(), ids.data(),
                       out + r * R.topk);
  }
}

}  // namespace
}  // namespace sparse_attn_cpu

torch::Tensor infllmv2_select(torch::Tensor q, torch::Tensor kc_t, torch::Tensor kc2_t, int64_t kv_heads, int64_t sk,
                              int64_t n1, int64_t n2, int64_t kernel_size, int64_t kernel_stride, int64_t block_size,
                              int64_t topk, int64_t forced_init, int64_t window_blocks, bool variant41, bool coarse,
                              bool coarse_from_fine) {
  using namespace sparse_attn_cpu;
  TORCH_CHECK(q.dim() == 4 && q.device().is_cpu(), "infllmv2_select: q must be a 4-D CPU tensor (B, Hq, Sq, D)");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "infllmv2_select: q must be float32, bfloat16 or float16, got ", dt);
  const int64_t B = q.size(0), Hq = q.size(1), sq = q.size(2), D = q.size(3);
  TORCH_CHECK(kv_heads > 0 && Hq % kv_heads == 0, "infllmv2_select: Hq must be a multiple of kv_heads");
  TORCH_CHECK(kernel_size > 0 && kernel_stride > 0 && block_size % kernel_stride == 0 && topk >= 0 &&
                  forced_init >= 0 && window_blocks >= 1 && sq <= sk && n1 >= 0 && n2 >= 0,
              "infllmv2_select: bad InfLLMv2 parameters or Sq > Sk");
  auto check_t = [&](const torch::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == 4 && t.size(0) == B &&
                    t.size(1) == kv_heads && t.size(2) == D && t.size(3) >= n && t.size(3) % kVec == 0,
                "infllmv2_select: ", name, " must be contiguous float32 (B, Hkv, D, kernels padded to a multiple of ",
                kVec, "), got ", t.sizes());
  };
  check_t(kc_t, std::max<int64_t>(n1, 1), "kc_t");
  TORCH_CHECK(!coarse_from_fine || (coarse && kernel_size % kernel_stride == 0),
              "infllmv2_select: coarse_from_fine needs the coarse normaliser and kernel_size a multiple of the stride");
  if (coarse && !coarse_from_fine) check_t(kc2_t, std::max<int64_t>(n2, 1), "kc2_t");
  // every coarse window a row sees is the mean of fine ones it sees too (their ends coincide)
  if (coarse_from_fine)
    TORCH_CHECK(n2 <= 0 || 4 * (n2 - 1) + 3 * (kernel_size / kernel_stride) < n1, "infllmv2_select: n2 = ", n2,
                " coarse windows need more than the n1 = ", n1, " fine ones");
  auto out = torch::full({B, kv_heads, sq, topk}, -1, q.options().dtype(torch::kInt32));
  if (B == 0 || sq == 0 || topk == 0) return out;
  Params P{};
  P.B = B, P.Hq = Hq, P.Hkv = kv_heads, P.G = Hq / kv_heads, P.sq = sq, P.sk = sk, P.D = D;
  P.n1 = n1, P.n1_pad = kc_t.size(3), P.n2 = coarse ? n2 : 0;
  P.n2_pad = coarse && !coarse_from_fine ? kc2_t.size(3) : 0;
  P.from_fine = coarse_from_fine ? kernel_size / kernel_stride : 0;
  P.rule = infllmv2::Rule{kernel_size, kernel_stride, block_size, block_size / kernel_stride, topk, forced_init,
                          window_blocks, variant41, coarse};
  P.nb = (sk + block_size - 1) / block_size;
  P.qmul = static_cast<float>(std::pow(static_cast<double>(D), -0.5)) * kLog2e;  // the contract's scale
  for (int d = 0; d < 4; ++d) P.qst[d] = q.stride(d);
  P.kct = kc_t.data_ptr<float>();
  P.kc2t = coarse && !coarse_from_fine ? kc2_t.data_ptr<float>() : nullptr;
  P.out = out.data_ptr<int32_t>();
  const int64_t chunks = (sq + kRows - 1) / kRows, total = B * kv_heads * chunks;
  const void* qd = q.data_ptr();
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  const int64_t n1c = round_up(std::max<int64_t>(n1, 1), kVec), n2c = round_up(std::max<int64_t>(P.n2, 1), kVec);
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    std::vector<float> qa(kRows * std::max<int64_t>(D, 1)), f(kRows * n1c), c(kRows * n2c), s(kRows * n1c),
        score(std::max<int64_t>(P.nb, 1));
    std::vector<int32_t> ids(std::max<int64_t>(P.nb, 1));
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= total) break;
      // the longest chunks (the last rows see the most kernels) first
      const int64_t t = (chunks - 1 - i / (B * kv_heads)) + (i % (B * kv_heads)) * chunks;
      const int64_t ch = t % chunks, bh = t / chunks, b = bh / kv_heads, h = bh % kv_heads;
      with_float_tag(dt, [&](auto tag) {
        constexpr int DT = decltype(tag)::value;
        run_task<DT>(P, static_cast<const typename Elem<DT>::T*>(qd), b, h, ch * kRows, qa, f, c, s, score, ids);
      });
    }
  });
  return out;
}

// infllmv2_decode.cpp
torch::Tensor infllmv2_select_sums(torch::Tensor q, torch::Tensor fine, torch::Tensor coarse,
                                   std::vector<int64_t> lengths, int64_t kernel_size, int64_t kernel_stride,
                                   int64_t block_size, int64_t topk, int64_t forced_init, int64_t window_blocks,
                                   bool variant41, bool use_coarse);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("vector_width") = sparse_attn_cpu::kVec;
  m.def("infllmv2_select", &infllmv2_select,
        "InfLLMv2 per-token picks int32 (B, Hkv, Sq, topk), ascending, -1 padded, rows end-aligned to Sk",
        py::arg("q"), py::arg("kc_t"), py::arg("kc2_t"), py::arg("kv_heads"), py::arg("sk"), py::arg("n1"),
        py::arg("n2"), py::arg("kernel_size"), py::arg("kernel_stride"), py::arg("block_size"), py::arg("topk"),
        py::arg("forced_init"), py::arg("window_blocks"), py::arg("variant41"), py::arg("coarse"),
        py::arg("coarse_from_fine") = false);
  m.def("infllmv2_select_sums", &infllmv2_select_sums,
        "InfLLMv2 per-token picks over a cache's window sums (rows end-aligned to each sequence's length) -> int32 "
        "(B, Hkv, Sq, topk), ascending, -1 padded",
        py::arg("q"), py::arg("fine"), py::arg("coarse"), py::arg("lengths"), py::arg("kernel_size"),
        py::arg("kernel_stride"), py::arg("block_size"), py::arg("topk"), py::arg("forced_init"),
        py::arg("window_blocks"), py::arg("variant41"), py::arg("use_coarse"));
}
