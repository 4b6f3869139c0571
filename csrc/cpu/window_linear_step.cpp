// One decode step of WindowLinear on the CPU (the contract's "the hybrid"), against the layer's
// fixed-size storage (sparse_attn/cache/window_linear.py): the sinks' K/V, a ring of the last
// `window` tokens' K/V, and the linear memory (M, z) of the evicted tokens:
//
//     o = sigmoid(gate_h) * softmax(scale q K_vis^T) V_vis + (1 - sigmoid(gate_h)) * phi(q)^T M / phi(q)^T z
//
// with phi = elu + 1 and L = 0 while phi(q)^T z is not positive (nothing evicted yet). Per
// (batch, kv head), in order: the scores of the group's query heads against the visible keys (the
// sinks, the ring slots the caller names, and the new token's key from the input), their softmax,
// the weighted values; the token leaving the window (if any) read from its ring slot and added to
// z and, row by row, to M, each row of M read once, updated, written back and multiplied into the
// group's numerators while in cache; the gate mix; last, the new token's k, v written into its
// ring slot (after the evicted token there was read) or its sink slot. The keys and values are
// read once per kv head whatever the GQA group, M once: the step is memory-bound on
// (sinks + window) (D + Dv) storage elements plus 2 D Dv floats of M.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/step_common.h"
#include "cpu/vec.h"

namespace sparse_attn_cpu {
namespace {

inline float phi(float x) { return x > 0.f ? x + 1.f : std::exp(x); }

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <int DT>
void wl_unit(const WindowLinearStepParams& P, int64_t bk, std::vector<float>& buf) {
  using In = typename Elem<DT>::T;
  const int64_t b = bk / P.Hkv, hk = bk % P.Hkv, G = P.Hq / P.Hkv, D = P.D, Dv = P.Dv;
  const int64_t n = P.n_sinks + P.ring_count + 1;
  const int64_t need = G * (2 * D + 2 * Dv + n) + 2 * (D + Dv);
  if (static_cast<int64_t>(buf.size()) < need) buf.assign(need, 0.f);
  float* qs = buf.data();        // G x D: scale * q
  float* fq = qs + G * D;        // G x D: phi(q)
  float* acc = fq + G * D;       // G x Dv: softmax numerators
  float* num = acc + G * Dv;     // G x Dv: linear numerators
  float* sc = num + G * Dv;      // G x n: scores, then weights
  float* row = sc + G * n;       // D or Dv: one key or value row in float32
  float* fk = row + std::max(D, Dv);  // D: phi of the evicted key
  float* ve = fk + D;            // Dv: the evicted value

  const In* kn = static_cast<const In*>(P.k) + b * P.ks[0] + hk * P.ks[1];
  const In* vn = static_cast<const In*>(P.v) + b * P.vs[0] + hk * P.vs[1];
  In* skb = static_cast<In*>(P.sink_k) + bk * P.sink_cap * D;
  In* svb = static_cast<In*>(P.sink_v) + bk * P.sink_cap * Dv;
  In* rkb = static_cast<In*>(P.ring_k) + bk * P.ring_cap * D;
  In* rvb = static_cast<In*>(P.ring_v) + bk * P.ring_cap * Dv;
  float* M = P.M + bk * D * Dv;
  float* z = P.z + bk * D;
  for (int64_t g = 0; g < G; ++g) {
    const In* qr = static_cast<const In*>(P.q) + b * P.qs[0] + (hk * G + g) * P.qs[1];
    load_row<DT>(qs + g * D, qr, D, 1, P.scale);
    load_row<DT>(fq + g * D, qr, D, 1, 1.f);
    for (int64_t i = 0; i < D; ++i) fq[g * D + i] = phi(fq[g * D + i]);
  }
  // key j of the visible set: the sinks, then the ring slots from ring_start, then the new token
  auto key_row = [&](int64_t j, int64_t width, const In* sink, const In* ring, const In* fresh) -> const In* {
    if (j < P.n_sinks) return sink + j * width;
    j -= P.n_sinks;
    if (j < P.ring_count) return ring + ((P.ring_start + j) % P.ring_cap) * width;
    return fresh;
  };
  for (int64_t j = 0; j < n; ++j) {
    load_row<DT>(row, key_row(j, D, skb, rkb, kn), D, 1, 1.f);
    for (int64_t g = 0; g < G; ++g) sc[g * n + j] = dot(qs + g * D, row, D);
  }
  std::vector<float> inv(G);
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * n;
    float m = s[0];
    for (int64_t j = 1; j < n; ++j) m = std::max(m, s[j]);
    float l = 0.f;
    for (int64_t j = 0; j < n; ++j) l += (s[j] = std::exp(s[j] - m));
    inv[g] = 1.f / l;
    std::fill_n(acc + g * Dv, Dv, 0.f);
    std::fill_n(num + g * Dv, Dv, 0.f);
  }
  for (int64_t j = 0; j < n; ++j) {
    load_row<DT>(row, key_row(j, Dv, svb, rvb, vn), Dv, 1, 1.f);
    for (int64_t g = 0; g < G; ++g) axpy(acc + g * Dv, sc[g * n + j], row, Dv);
  }
  const bool evict = P.evict_slot >= 0;
  if (evict) {
    load_row<DT>(fk, rkb + P.evict_slot * D, D, 1, 1.f);
    for (int64_t i = 0; i < D; ++i) z[i] += (fk[i] = phi(fk[i]));
    load_row<DT>(ve, rvb + P.evict_slot * Dv, Dv, 1, 1.f);
  }
  for (int64_t i = 0; i < D; ++i) {
    float* mr = M + i * Dv;
    if (evict) axpy(mr, fk[i], ve, Dv);
    for (int64_t g = 0; g < G; ++g) axpy(num + g * Dv, fq[g * D + i], mr, Dv);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float w = 1.f / (1.f + std::exp(-P.gate[hk * G + g]));
    const float den = dot(fq + g * D, z, D);
    const float lin = den > 0.f ? (1.f - w) / den : 0.f;
    float* o = P.out + (b * P.Hq + hk * G + g) * Dv;
    for (int64_t c = 0; c < Dv; ++c) o[c] = w * inv[g] * acc[g * Dv + c] + lin * num[g * Dv + c];
  }
  // the new token into its slot, after the evicted one was read from it
  In* kd = P.new_slot >= 0 ? rkb + P.new_slot * D : skb + P.new_sink * D;
  In* vd = P.new_slot >= 0 ? rvb + P.new_slot * Dv : svb + P.new_sink * Dv;
  std::memcpy(kd, kn, D * sizeof(In));
  std::memcpy(vd, vn, Dv * sizeof(In));
}

template <int DT>
void wl_all(const WindowLinearStepParams& P) {
  at::parallel_for(0, P.B * P.Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf;
    for (int64_t u = lo; u < hi; ++u) wl_unit<DT>(P, u, buf);
  });
}

}  // namespace

void window_linear_step_run(const WindowLinearStepParams& P, int dtype_tag) {
  if (dtype_tag == 0)
    wl_all<0>(P);
  else if (dtype_tag == 1)
    wl_all<1>(P);
  else
    wl_all<2>(P);
}

}  // namespace sparse_attn_cpu
