// Validation of the BlockLayout tensors handed to the CPU kernels (forward and backward): a bad
// list raises a RuntimeError naming the list, never an out-of-bounds read.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace sparse_attn_cpu {

// index lists (count (B', H', rows), index (B', H', rows, width)): counts in [0, width], entries
// [0, count) strictly ascending in [0, nb)
inline void check_lists(const torch::Tensor& count, const torch::Tensor& index, int64_t nb, const char* who,
                        const char* what) {
  const int32_t* c = count.data_ptr<int32_t>();
  const int32_t* x = index.data_ptr<int32_t>();
  const int64_t rows = count.numel(), w = index.size(3);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(c[r] >= 0 && c[r] <= w, who, ": ", what, "_count out of range [0, ", w, "]: ", c[r]);
    for (int64_t e = 0; e < c[r]; ++e) {
      const int32_t n = x[r * w + e];
      TORCH_CHECK(n >= 0 && n < nb && (e == 0 || n > x[r * w + e - 1]), who, ": ", what,
                  "_index must hold ascending entries in [0, ", nb, "), got ", n);
    }
  }
}

// TopK's per-token blocks (B, Hkv, Sq, topk): ascending key blocks in [0, nb), -1 = none
inline void check_token_index(const torch::Tensor& ti, int64_t nb, const char* who) {
  const int32_t* x = ti.data_ptr<int32_t>();
  const int64_t w = ti.size(3), rows = w > 0 ? ti.numel() / w : 0;
  for (int64_t r = 0; r < rows; ++r) {
    int32_t prev = -1;
    for (int64_t e = 0; e < w; ++e) {
      const int32_t n = x[r * w + e];
      if (n < 0) continue;
      TORCH_CHECK(n < nb && n > prev, who, ": token_index must hold ascending key blocks in [0, ", nb,
                  ") or -1, got ", n);
      prev = n;
    }
  }
}

}  // namespace sparse_attn_cpu
