// AMX tiles (Intel Sapphire Rapids and later: AMX-TILE, AMX-BF16) as the CPU kernels share them:
// whether this build has them (SPARSE_ATTN_AMX), whether Linux lets the process use them, the
// run-time switch, and the tile configuration record. The products are in decode_amx.h (decode:
// few query rows, K / V read where they sit) and gemm_amx.h (prefill: 16-row groups over packed
// blocks).
//
// Linux gives a process AMX tiles only after arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): asked once
// (amx_permitted); refused, the kernels keep their vdpbf16ps products. Off at run time with
// SPARSE_ATTN_CPU_AMX=0 in the environment, or each extension's set_amx(False) (tests, A/B runs;
// the switch is per extension module: each .so has its own copy of these inline statics).
#pragma once

#include "cpu/vec_bf16.h"

#if defined(SPARSE_ATTN_BF16_DOT) && defined(__x86_64__) && defined(__linux__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && !defined(SPARSE_ATTN_NO_AMX)
#define SPARSE_ATTN_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace sparse_attn_cpu {

// whether Linux lets this process use the tiles (asked once; the answer holds for every thread)
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // arch/x86/include/uapi/asm/prctl.h
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// the run-time switch: SPARSE_ATTN_CPU_AMX=0 in the environment turns the tiles off; set_amx() too
inline std::atomic<int>& amx_switch() {
  static std::atomic<int> on{[] {
    const char* e = std::getenv("SPARSE_ATTN_CPU_AMX");
    return e != nullptr && std::strcmp(e, "0") == 0 ? 0 : 1;
  }()};
  return on;
}
inline bool amx_active() { return amx_switch().load(std::memory_order_relaxed) != 0 && amx_permitted(); }

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int t, int r, int bytes) { rows[t] = uint8_t(r), colsb[t] = uint16_t(bytes); }
};

}  // namespace sparse_attn_cpu

#endif  // SPARSE_ATTN_AMX
