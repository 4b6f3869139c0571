// A float tensor's dtype as the tag the CPU kernels are instantiated for (Elem<DT> in vec.h:
// 0 float32, 1 bfloat16, 2 float16), and the one dispatch from that tag to a generic lambda.
#pragma once

#include <torch/extension.h>

#include <type_traits>

namespace sparse_attn_cpu {

// the tag of a float32 / bfloat16 / float16 dtype (callers have refused any other)
inline int float_tag(c10::ScalarType dt) {
  return dt == torch::kFloat32 ? 0 : dt == torch::kBFloat16 ? 1 : 2;
}

// the ATen element type of tag DT (an output tensor's data_ptr<...>)
template <int DT>
using aten_float_t = std::conditional_t<DT == 0, float, std::conditional_t<DT == 1, at::BFloat16, at::Half>>;

// f(std::integral_constant<int, DT>{}) for the tag DT of `dt`
template <typename F>
inline void with_float_tag(c10::ScalarType dt, F&& f) {
  switch (float_tag(dt)) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    default: f(std::integral_constant<int, 2>{}); break;
  }
}

}  // namespace sparse_attn_cpu
