// Checks on a caller's output tensor that a kernel writes in place: its memory span apart from an
// input's (threads read the inputs while others write the rows), and no element reached twice
// (a stride-0 dim would have two threads write one element).
#pragma once

#include <torch/extension.h>

namespace sparse_attn_cpu {

// Whether the byte spans [first, last element] of `a` and `b` intersect (strides >= 0, as torch's).
inline bool spans_overlap(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const torch::Tensor& t) {
    const char* p = static_cast<const char*>(t.data_ptr());
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return std::make_pair(p, p + (last + 1) * t.element_size());
  };
  const auto x = span(a), y = span(b);
  return x.first < y.second && y.first < x.second;
}

// Whether some dim of size > 1 has stride 0 (an expanded view: one element for many positions).
inline bool has_zero_stride(const torch::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  return false;
}

}  // namespace sparse_attn_cpu
