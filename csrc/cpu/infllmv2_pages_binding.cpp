// The Python binding of InfLLMv2's decode selection over window sums kept per page (vLLM's pages:
// sparse_attn/integrations/vllm/pages.py). The selection itself is infllmv2_decode.cpp's, compiled
// into this extension too (as topk_select.cpp is into two), so that serving vLLM does not need the
// prefill selection's extension.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "cpu/target_check.h"

// infllmv2_decode.cpp
torch::Tensor infllmv2_select_pages(torch::Tensor q, torch::Tensor fine, torch::Tensor coarse, torch::Tensor page_table,
                                    int64_t page_size, std::vector<int64_t> lengths, int64_t kernel_size,
                                    int64_t kernel_stride, int64_t block_size, int64_t topk, int64_t forced_init,
                                    int64_t window_blocks, bool variant41, bool use_coarse);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SPARSE_ATTN_CHECK_TARGET();  // refuse to load on a CPU without this build's features
  m.doc() = "sparse_attn InfLLMv2 decode selection over per-page window sums";
  m.def("infllmv2_select_pages", &infllmv2_select_pages,
        "InfLLMv2 per-token picks over window sums kept per page, read through page_table (rows end-aligned to each "
        "sequence's length) -> int32 (B, Hkv, Sq, topk), ascending, -1 padded",
        py::arg("q"), py::arg("fine"), py::arg("coarse"), py::arg("page_table"), py::arg("page_size"),
        py::arg("lengths"), py::arg("kernel_size"), py::arg("kernel_stride"), py::arg("block_size"), py::arg("topk"),
        py::arg("forced_init"), py::arg("window_blocks"), py::arg("variant41"), py::arg("use_coarse"));
}
