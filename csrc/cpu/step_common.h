// What the CPU decode-step kernels share (linear_step.cpp, window_linear_step.cpp, step_binding.cpp):
// their parameter structs and the per-thread scratch of one (batch, head) unit.
#pragma once

#include <cstdint>
#include <vector>

namespace sparse_attn_cpu {

// linear_step.cpp: S tokens of `linear_attention` against a float32 state.
struct LinearStepParams {
  int64_t B, H, Hkv, S, D, Dv;     // k, v have Hkv heads (GQA: head h reads kv head h / (H / Hkv))
  const void *q, *k, *v;           // one dtype: float32, bfloat16 or float16; last dim contiguous
  int64_t qs[3], ks[3], vs[3];     // strides of batch, head, token
  const float* g;                  // log-decays (any strides: a per-head decay comes expanded), or nullptr
  int64_t gs[3];
  const float* s_in;               // (B, H, D, Dv) contiguous, or nullptr for a zero state
  float* s_out;                    // (B, H, D, Dv) contiguous; may be s_in (in place)
  float* out;                      // (B, H, S, Dv) contiguous
  float scale;
};

void linear_step_run(const LinearStepParams& P, int dtype_tag);

// window_linear_step.cpp: one token of `WindowLinear` against its fixed-size storage.
struct WindowLinearStepParams {
  int64_t B, Hq, Hkv, D, Dv;
  const void *q, *k, *v;           // the new token: q (B, Hq, 1, D), k (B, Hkv, 1, D), v (B, Hkv, 1, Dv)
  int64_t qs[2], ks[2], vs[2];     // strides of batch, head
  void *sink_k, *sink_v;           // (B, Hkv, sink_cap, D / Dv) contiguous, the inputs' dtype
  void *ring_k, *ring_v;           // (B, Hkv, ring_cap, D / Dv) contiguous
  int64_t sink_cap, ring_cap;
  float *M, *z;                    // (B, Hkv, D, Dv), (B, Hkv, D) contiguous float32, updated in place
  const float* gate;               // (Hq,) logits
  int64_t n_sinks;                 // sinks the query sees besides the new token
  int64_t ring_start, ring_count;  // ring slots it sees besides the new token: ring_start + [0, ring_count) mod cap
  int64_t evict_slot;              // ring slot whose token leaves the window now (added to M, z), or -1
  int64_t new_slot, new_sink;      // where the new token is stored (ring slot or sink index; the other -1)
  float* out;                      // (B, Hq, Dv) contiguous float32
  float scale;
};

void window_linear_step_run(const WindowLinearStepParams& P, int dtype_tag);

// The tokens of one linear-step unit as float32 rows.
struct StepTokens {
  float *q, *k, *v, *a, *o;
  int64_t ldv;
};

struct StepScratch {
  std::vector<float> buf;
  StepTokens tokens(int64_t S, int64_t D, int64_t Dv) {
    const int64_t need = S * (2 * D + 2 * Dv + 1);
    if (static_cast<int64_t>(buf.size()) < need) buf.assign(need, 0.f);
    float* p = buf.data();
    StepTokens t;
    t.q = p, p += S * D;
    t.k = p, p += S * D;
    t.v = p, p += S * Dv;
    t.o = p, p += S * Dv;
    t.a = p;
    t.ldv = Dv;
    return t;
  }
};

}  // namespace sparse_attn_cpu
