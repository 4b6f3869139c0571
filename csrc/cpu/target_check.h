// The instruction-set features a build was compiled for, checked against the CPU it is loaded on.
//
// A JIT build targets the host (-march=native on x86; on Arm, the -march flags that
// sparse_attn/_build/target.py derives from the CPU's features, or SPARSE_ATTN_CPU_TARGET), and its
// cache key includes those flags and the CPU's signature. A build can still meet another CPU: an
// ahead-of-time wheel, a cache folder shared between machines, an emulator started with another CPU
// model. Executing an instruction the CPU lacks kills the process with SIGILL; so every extension
// calls `missing_target_features()` when Python imports it and refuses to load (ImportError, which
// the loader reports as "unavailable: ...") when the answer is not empty.
#pragma once

#include <string>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace sparse_attn_cpu {

// "" when the CPU has every feature this translation unit was compiled to use; otherwise a sentence
// naming the missing ones.
inline std::string missing_target_features() {
  std::string missing;
  auto need = [&missing](bool have, const char* name) {
    if (!have) missing += std::string(missing.empty() ? "" : ", ") + name;
  };
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#if defined(__AVX2__)
  need(__builtin_cpu_supports("avx2"), "avx2");
#endif
#if defined(__FMA__)
  need(__builtin_cpu_supports("fma"), "fma");
#endif
#if defined(__AVX512F__)
  need(__builtin_cpu_supports("avx512f"), "avx512f");
#endif
#if defined(__AVX512BW__)
  need(__builtin_cpu_supports("avx512bw"), "avx512bw");
#endif
#if defined(__AVX512BF16__)
  need(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(SPARSE_ATTN_NO_AMX)
  need(__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16"), "amx-tile, amx-bf16");
#endif
#elif defined(__aarch64__) && defined(__linux__)
  // HWCAP bits of the Linux arm64 ABI (arch/arm64/include/uapi/asm/hwcap.h), spelled out so the
  // check does not depend on the libc headers' age
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  (void)hw;
  (void)hw2;
#if defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
  need(hw & (1ul << 10), "fp16 (asimdhp)");
#endif
#if defined(__ARM_FEATURE_DOTPROD)
  need(hw & (1ul << 20), "dotprod (asimddp)");
#endif
#if defined(__ARM_FEATURE_SVE)
  need(hw & (1ul << 22), "sve");
#endif
#if defined(__ARM_FEATURE_SVE2)
  need(hw2 & (1ul << 1), "sve2");
#endif
#if defined(__ARM_FEATURE_MATMUL_INT8)
  need(hw2 & (1ul << 13), "i8mm");
#endif
#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
  need(hw2 & (1ul << 14), "bf16");
#endif
#endif
  if (missing.empty()) return missing;
  return "this build uses CPU features this processor lacks (" + missing +
         "); rebuild for this CPU (delete the sparse_attn JIT cache, or set SPARSE_ATTN_CPU_TARGET)";
}

}  // namespace sparse_attn_cpu

// First statement of every PYBIND11_MODULE: refuse to load on a CPU without the build's features.
#define SPARSE_ATTN_CHECK_TARGET()                                                   \
  do {                                                                               \
    const std::string sparse_attn_missing_ = sparse_attn_cpu::missing_target_features(); \
    if (!sparse_attn_missing_.empty()) throw pybind11::import_error(sparse_attn_missing_); \
  } while (0)
