// Large kernel outputs in transparent huge pages (Linux).
//
// A fresh output of tens of MB is first touched by the kernel itself, and with 4 KB pages every
// 4 KB costs a page fault and a zeroing in the kernel: measured, a 64 MB linear-attention output
// (B=1, H=8, S=16384, D=128) spent ~15 ms of an 84 ms call faulting on 2 threads. Advising the
// allocation as huge (MADV_HUGEPAGE) before anything touches it makes that one fault per 2 MB.
// This is advice only: where THP is off ("never"), or madvise fails, nothing changes; where it is
// "always" it was already so. PyTorch's own switch for all CPU allocations is the environment
// variable THP_MEM_ALLOC_ENABLE=1.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparse_attn_cpu {

// torch::empty(sizes, opts), its whole 2 MB pages advised huge when it spans at least 4 MB;
// zero-filled after the advice when `zero`
inline torch::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& opts, bool zero) {
  auto t = torch::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  if (bytes >= 2 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + bytes) & ~(kHuge - 1);
    if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
  }
#endif
  if (zero) t.zero_();
  return t;
}

}  // namespace sparse_attn_cpu
