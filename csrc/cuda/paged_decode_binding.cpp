// torch binding of the split-KV paged decode kernel (paged_decode.cu). Arguments are validated in
// Python (sparse_attn/backends/cuda/paged_decode.py); the checks here guard the memory accesses.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "paged_decode.cuh"

namespace {

sparse_attn_cuda::DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return sparse_attn_cuda::DType::kFloat32;
    case at::kHalf: return sparse_attn_cuda::DType::kFloat16;
    case at::kBFloat16: return sparse_attn_cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "paged_decode: dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

const int32_t* opt_i32(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->is_cuda(), "paged_decode: int32 CUDA tensors expected");
  return t->data_ptr<int32_t>();
}

}  // namespace

// q (B, Hq, Sq, D) contiguous; k_pages (P, Hkv, page, D) / v_pages (P, Hkv, page, Dv) with unit
// stride along the head dim; page_table (B, W) int32; lengths (B,) int32. Returns (out, lse).
std::vector<at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                     const at::Tensor& page_table, const at::Tensor& lengths,
                                     const c10::optional<at::Tensor>& block_count,
                                     const c10::optional<at::Tensor>& block_index,
                                     const c10::optional<at::Tensor>& row_block_mask, int64_t key_block,
                                     bool causal, int64_t window, int64_t sinks, double scale, int64_t num_splits,
                                     double softcap, const c10::optional<std::string>& quant,
                                     const c10::optional<at::Tensor>& k_scale,
                                     const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.is_cuda() && k_pages.is_cuda() && v_pages.is_cuda(), "paged_decode: CUDA tensors expected");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "paged_decode: q must be contiguous (B, Hq, Sq, D)");
  TORCH_CHECK(k_pages.dim() == 4 && v_pages.dim() == 4, "paged_decode: pages must be (P, Hkv, page, D)");
  TORCH_CHECK(k_pages.stride(3) == 1 && v_pages.stride(3) == 1, "paged_decode: head dim must have unit stride");
  int kv_quant = 0;  // sparse_attn_cuda::KvQuant
  if (quant.has_value()) {
    TORCH_CHECK(*quant == "int8" || *quant == "fp8_e4m3", "paged_decode: quant must be int8 or fp8_e4m3, got ", *quant);
    const auto code = *quant == "int8" ? at::kChar : at::kFloat8_e4m3fn;
    TORCH_CHECK(k_pages.scalar_type() == code && v_pages.scalar_type() == code, "paged_decode: ", *quant,
                " pages expected, got ", k_pages.scalar_type());
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "paged_decode: a quantized cache needs k_scale, v_scale");
    for (const at::Tensor* t : {&*k_scale, &*v_scale})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_cuda() && t->dim() == 3 && t->size(0) == k_pages.size(0) &&
                      t->size(1) == k_pages.size(1) && t->size(2) == k_pages.size(2) && t->stride(2) == 1,
                  "paged_decode: k_scale / v_scale must be float32 (P, Hkv, page) with unit stride along the page");
    TORCH_CHECK(k_scale->strides() == v_scale->strides(), "paged_decode: k_scale and v_scale must share strides");
    kv_quant = *quant == "int8" ? 1 : 2;
  } else {
    TORCH_CHECK(k_pages.scalar_type() == q.scalar_type() && v_pages.scalar_type() == q.scalar_type(),
                "paged_decode: q, k, v must share a dtype");
  }
  TORCH_CHECK(page_table.scalar_type() == at::kInt && page_table.is_contiguous(), "paged_decode: page_table int32");
  TORCH_CHECK(lengths.scalar_type() == at::kInt && lengths.is_contiguous(), "paged_decode: lengths int32");
  TORCH_CHECK(q.size(3) <= sparse_attn_cuda::kMaxHeadDim && v_pages.size(3) <= sparse_attn_cuda::kMaxHeadDim,
              "paged_decode: head dims up to ", sparse_attn_cuda::kMaxHeadDim);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), Dv = v_pages.size(3);
  auto f32 = q.options().dtype(at::kFloat);
  auto part_out = at::empty({B, Hq, Sq, num_splits, Dv}, f32);
  auto part_lse = at::empty({B, Hq, Sq, num_splits}, f32);
  auto out = at::empty({B, Hq, Sq, Dv}, q.options());
  auto lse = at::empty({B, Hq, Sq}, f32);

  sparse_attn_cuda::PagedDecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_pages.data_ptr();
  p.v = v_pages.data_ptr();
  p.k_page_stride = k_pages.stride(0);
  p.k_head_stride = k_pages.stride(1);
  p.k_tok_stride = k_pages.stride(2);
  p.v_page_stride = v_pages.stride(0);
  p.v_head_stride = v_pages.stride(1);
  p.v_tok_stride = v_pages.stride(2);
  p.kv_quant = kv_quant;
  if (kv_quant) {
    p.k_scale = k_scale->data_ptr<float>();
    p.v_scale = v_scale->data_ptr<float>();
    p.scale_page_stride = k_scale->stride(0);
    p.scale_head_stride = k_scale->stride(1);
  }
  p.page_table = page_table.data_ptr<int32_t>();
  p.lengths = lengths.data_ptr<int32_t>();
  p.block_count = opt_i32(block_count);
  p.block_index = opt_i32(block_index);
  p.max_blocks = block_index.has_value() ? static_cast<int>(block_index->size(-1)) : 0;
  if (row_block_mask.has_value()) {
    TORCH_CHECK(row_block_mask->scalar_type() == at::kByte && row_block_mask->is_contiguous(),
                "paged_decode: row_block_mask must be contiguous uint8");
    p.row_block_mask = row_block_mask->data_ptr<uint8_t>();
    p.row_mask_blocks = static_cast<int>(row_block_mask->size(-1));
  }
  p.batch = static_cast<int>(B);
  p.q_heads = static_cast<int>(Hq);
  p.kv_heads = static_cast<int>(k_pages.size(1));
  p.sq = static_cast<int>(Sq);
  p.head_dim = static_cast<int>(q.size(3));
  p.v_head_dim = static_cast<int>(Dv);
  p.page_size = static_cast<int>(k_pages.size(2));
  p.table_width = static_cast<int>(page_table.size(1));
  p.key_block = static_cast<int>(key_block);
  p.causal = causal ? 1 : 0;
  p.window = static_cast<int>(window);
  p.sinks = static_cast<int>(sinks);
  p.scale = static_cast<float>(scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "paged_decode: softcap must be finite and >= 0 (0: off)");
  p.softcap = static_cast<float>(softcap);
  p.num_splits = static_cast<int>(num_splits);
  p.part_out = part_out.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const cudaError_t err = sparse_attn_cuda::launch_paged_decode(p, dtype_code(q), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "paged_decode launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "split-KV attention over a paged KV cache (decode, short query blocks)");
}
