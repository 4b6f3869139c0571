// A serving loop's cache write (sparse_attn/integrations/vllm/pages.py write_pages): the step's new
// key / value rows into their page slots, in one pass.
//
// key (T, Hkv, D) and value (T, Hkv, Dv) rows, read through their strides (vLLM hands views of its
// qkv projection), go to k_pages / v_pages (P, Hkv, page_size, D|Dv; k_pages may keep K as columns,
// stride 1 along the rows: the vLLM plugin's float32 pages, csrc/cpu/decode_kcols.h), row t at page
// slots[t] / page_size, row slots[t] % page_size (slots may hold more than T entries: the first T
// are read); a negative slot is a padding token and is skipped. The copies are parallel over rows
// (distinct slots: each row has its own destination).
// sums (P, Hkv, D) float32, when given, stays the sum of each page's key rows: a page written
// from its first row starts afresh, then every written row adds to it. That is done in two
// serial passes (zero, then add in row order) so that the result does not depend on the order
// of the rows, nor on how rows of one page were split among threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/dtype_tag.h"
#include "cpu/vec.h"

namespace sparse_attn_decode {

namespace {

void check_pages(const torch::Tensor& pages, const char* name) {
  TORCH_CHECK_VALUE(pages.device().is_cpu() && pages.dim() == 4, "write_page_rows: ", name,
                    " must be a 4-D CPU tensor (pages, Hkv, page_size, D), got ", pages.sizes());
  TORCH_CHECK_VALUE(pages.size(3) <= 1 || pages.stride(3) == 1 || pages.stride(2) == 1, "write_page_rows: ", name,
                    " must be contiguous in its last dim, or in its rows (K as columns)");
}

void check_rows(const torch::Tensor& rows, const torch::Tensor& pages, int64_t t, const char* name,
                const char* pages_name) {
  TORCH_CHECK_VALUE(rows.device().is_cpu() && rows.dim() == 3 && rows.size(0) == t &&
                        rows.size(1) == pages.size(1) && rows.size(2) == pages.size(3),
                    "write_page_rows: ", name, " must be (T=", t, ", Hkv=", pages.size(1), ", ", pages.size(3),
                    ") rows, got ", rows.sizes());
  TORCH_CHECK_TYPE(rows.scalar_type() == pages.scalar_type(), "write_page_rows: ", name, " must have ",
                   pages_name, "'s dtype ", pages.scalar_type(), ", got ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.size(2) <= 1 || rows.stride(2) == 1, "write_page_rows: ", name,
                    " must be contiguous in its last dim");
}

template <typename S>
void write_all(const S* slot, int64_t t, int64_t page_size, int64_t num_pages, const torch::Tensor& k_pages,
               const torch::Tensor& v_pages, const torch::Tensor& key, const torch::Tensor& value,
               const c10::optional<torch::Tensor>& sums) {
  const int64_t cap = num_pages * page_size;
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK_VALUE(slot[i] < cap, "write_page_rows: slots[", i, "] = ", static_cast<int64_t>(slot[i]),
                      " is outside the pages [0, ", cap, ")");
  const int64_t H = k_pages.size(1), D = k_pages.size(3), Dv = v_pages.size(3), es = k_pages.element_size();
  auto* kp = static_cast<char*>(k_pages.data_ptr());
  auto* vp = static_cast<char*>(v_pages.data_ptr());
  const auto* kr = static_cast<const char*>(key.data_ptr());
  const auto* vr = static_cast<const char*>(value.data_ptr());
  const int64_t row_bytes = H * (D + Dv) * es;
  const int64_t kcol = D > 1 ? k_pages.stride(3) : 1;
  at::parallel_for(0, t, std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (slot[i] < 0) continue;
      const int64_t page = slot[i] / page_size, row = slot[i] % page_size;
      for (int64_t h = 0; h < H; ++h) {
        char* kd = kp + (page * k_pages.stride(0) + h * k_pages.stride(1) + row * k_pages.stride(2)) * es;
        const char* ks = kr + (i * key.stride(0) + h * key.stride(1)) * es;
        if (kcol == 1) {
          std::memcpy(kd, ks, D * es);
        } else {  // K as columns (csrc/cpu/decode_kcols.h): element d kcol elements after d - 1
          for (int64_t d = 0; d < D; ++d) std::memcpy(kd + d * kcol * es, ks + d * es, es);
        }
        std::memcpy(vp + (page * v_pages.stride(0) + h * v_pages.stride(1) + row * v_pages.stride(2)) * es,
                    vr + (i * value.stride(0) + h * value.stride(1)) * es, Dv * es);
      }
    }
  });
  if (!sums.has_value() || !sums->defined()) return;
  const torch::Tensor& s = *sums;
  float* sp = s.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i)  // a page written from its first row holds a new block
    if (slot[i] >= 0 && slot[i] % page_size == 0)
      for (int64_t h = 0; h < H; ++h) std::fill_n(sp + (slot[i] / page_size) * s.stride(0) + h * s.stride(1), D, 0.f);
  // (serial: split by page over 2 threads it was no faster, 143 vs 145 us at 4096 rows, 2026-12-06)
  sparse_attn_cpu::with_float_tag(key.scalar_type(), [&](auto tag) {
    using E = sparse_attn_cpu::Elem<decltype(tag)::value>;
    const auto* k = static_cast<const typename E::T*>(key.data_ptr());
    for (int64_t i = 0; i < t; ++i) {
      if (slot[i] < 0) continue;
      for (int64_t h = 0; h < H; ++h) {
        float* dst = sp + (slot[i] / page_size) * s.stride(0) + h * s.stride(1);
        const auto* src = k + i * key.stride(0) + h * key.stride(1);
        for (int64_t c = 0; c < D; ++c) dst[c] += E::get(src, c);
      }
    }
  });
}

}  // namespace

void write_page_rows(const torch::Tensor& k_pages, const torch::Tensor& v_pages, const torch::Tensor& key,
                     const torch::Tensor& value, const torch::Tensor& slots, const c10::optional<torch::Tensor>& sums) {
  check_pages(k_pages, "k_pages");
  check_pages(v_pages, "v_pages");
  TORCH_CHECK_VALUE(v_pages.size(0) == k_pages.size(0) && v_pages.size(1) == k_pages.size(1) &&
                        v_pages.size(2) == k_pages.size(2),
                    "write_page_rows: k_pages ", k_pages.sizes(), " and v_pages ", v_pages.sizes(), " disagree");
  TORCH_CHECK_TYPE(v_pages.scalar_type() == k_pages.scalar_type(), "write_page_rows: k_pages and v_pages must "
                   "share one dtype");
  TORCH_CHECK_VALUE(k_pages.size(2) > 0, "write_page_rows: pages must hold at least one row (page_size > 0)");
  const auto dt = k_pages.scalar_type();
  TORCH_CHECK_TYPE(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
                   "write_page_rows: pages must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(key.dim() >= 1, "write_page_rows: key must be (T, Hkv, D) rows, got ", key.sizes());
  const int64_t t = key.size(0);  // slots may be longer (vLLM's slot_mapping is padded): the first T are read
  TORCH_CHECK_VALUE(slots.device().is_cpu() && slots.dim() == 1 && slots.size(0) >= t &&
                        (slots.scalar_type() == torch::kInt64 || slots.scalar_type() == torch::kInt32),
                    "write_page_rows: slots must be a 1-D CPU int64 or int32 tensor of at least T=", t,
                    " entries, got ", slots.scalar_type(), " ", slots.sizes());
  check_rows(key, k_pages, t, "key", "k_pages");
  check_rows(value, v_pages, t, "value", "v_pages");
  if (sums.has_value() && sums->defined()) {
    const torch::Tensor& s = *sums;
    TORCH_CHECK_VALUE(s.device().is_cpu() && s.scalar_type() == torch::kFloat32 && s.dim() == 3 &&
                          s.size(0) == k_pages.size(0) && s.size(1) == k_pages.size(1) &&
                          s.size(2) == k_pages.size(3) && (s.size(2) <= 1 || s.stride(2) == 1),
                      "write_page_rows: sums must be float32 (pages=", k_pages.size(0), ", Hkv=", k_pages.size(1),
                      ", D=", k_pages.size(3), "), contiguous in its last dim, got ", s.scalar_type(), " ", s.sizes());
  }
  if (t == 0) return;
  const torch::Tensor sl = slots.is_contiguous() ? slots : slots.contiguous();
  if (sl.scalar_type() == torch::kInt64) {
    write_all(sl.data_ptr<int64_t>(), t, k_pages.size(2), k_pages.size(0), k_pages, v_pages, key, value, sums);
  } else {
    write_all(sl.data_ptr<int32_t>(), t, k_pages.size(2), k_pages.size(0), k_pages, v_pages, key, value, sums);
  }
}

}  // namespace sparse_attn_decode
