// Python binding of the CPU decode-step kernels (linear_step.cpp, window_linear_step.cpp). The
// Python side (sparse_attn/backends/cpu/step.py) validates the user's arguments; the checks here
// only keep a wrong internal call from reading out of bounds.
#include <torch/extension.h>

#include "cpu/target_check.h"
#include "cpu/step_common.h"
#include "cpu/dtype_tag.h"

namespace {

int dtype_tag(const torch::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
              "step kernels: dtype must be float32, bfloat16 or float16, got ", dt);
  return sparse_attn_cpu::float_tag(dt);
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4, name, " must be a 4-D CPU tensor");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, " needs a contiguous last dim");
}

void check_f32(const torch::Tensor& t, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.sizes().vec() == shape, name,
              " must be a contiguous float32 tensor of shape ", c10::IntArrayRef(shape));
}

}  // namespace

// q (B, H, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); decay float32 (B, H, S) or None; state_in
// float32 (B, H, D, Dv) contiguous or None (zeros); state_out float32 (B, H, D, Dv) contiguous, may be
// state_in. Returns o float32 (B, H, S, Dv).
torch::Tensor linear_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> decay,
                          c10::optional<torch::Tensor> state_in, torch::Tensor state_out, double scale) {
  check_rows(q, "q"), check_rows(k, "k"), check_rows(v, "v");
  const int tag = dtype_tag(q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v: one dtype");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && k.size(0) == B && k.size(2) == S && k.size(3) == D && v.size(0) == B &&
                  v.size(1) == Hkv && v.size(2) == S, "linear_step: k, v must be (B, Hkv, S, D / Dv)");
  check_f32(state_out, {B, H, D, Dv}, "state_out");
  sparse_attn_cpu::LinearStepParams P{};
  if (state_in.has_value() && state_in->defined()) {
    check_f32(*state_in, {B, H, D, Dv}, "state_in");
    P.s_in = state_in->data_ptr<float>();
  }
  if (decay.has_value() && decay->defined()) {
    const auto& g = *decay;
    TORCH_CHECK(g.scalar_type() == torch::kFloat32 && g.dim() == 3 && g.size(0) == B && g.size(1) == H &&
                    g.size(2) == S, "linear_step: decay must be float32 (B, H, S)");
    P.g = g.data_ptr<float>();
    for (int i = 0; i < 3; ++i) P.gs[i] = g.stride(i);
  }
  auto out = torch::empty({B, H, S, Dv}, q.options().dtype(torch::kFloat32));
  if (B * H * S == 0) return out;
  P.B = B, P.H = H, P.Hkv = Hkv, P.S = S, P.D = D, P.Dv = Dv;
  P.q = q.data_ptr(), P.k = k.data_ptr(), P.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) P.qs[i] = q.stride(i), P.ks[i] = k.stride(i), P.vs[i] = v.stride(i);
  P.s_out = state_out.data_ptr<float>();
  P.out = out.data_ptr<float>();
  P.scale = static_cast<float>(scale);
  sparse_attn_cpu::linear_step_run(P, tag);
  return out;
}

// One WindowLinear token: q (B, Hq, 1, D), k (B, Hkv, 1, D), v (B, Hkv, 1, Dv); the storage tensors
// (sink_k/v, ring_k/v in q's dtype, M, z float32) are updated in place; gate float32 (Hq,). The
// integers name the visible slots and the slots that change (see WindowLinearStepParams).
// Returns o float32 (B, Hq, 1, Dv).
torch::Tensor window_linear_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor sink_k,
                                 torch::Tensor sink_v, torch::Tensor ring_k, torch::Tensor ring_v, torch::Tensor M,
                                 torch::Tensor z, torch::Tensor gate, std::vector<int64_t> slots, double scale) {
  check_rows(q, "q"), check_rows(k, "k"), check_rows(v, "v");
  const int tag = dtype_tag(q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(q.size(2) == 1 && k.size(2) == 1 && v.size(2) == 1, "window_linear_step: one token");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && k.size(3) == D,
              "window_linear_step: k, v must be (B, Hkv, 1, D / Dv)");
  for (auto* t : {&sink_k, &sink_v, &ring_k, &ring_v})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
                    t->size(1) == Hkv, "window_linear_step: storage must be contiguous (B, Hkv, n, *) in q's dtype");
  TORCH_CHECK(sink_k.size(3) == D && sink_v.size(3) == Dv && ring_k.size(3) == D && ring_v.size(3) == Dv &&
                  sink_v.size(2) == sink_k.size(2) && ring_v.size(2) == ring_k.size(2), "window_linear_step: storage dims");
  check_f32(M, {B, Hkv, D, Dv}, "M");
  check_f32(z, {B, Hkv, D}, "z");
  check_f32(gate, {Hq}, "gate");
  TORCH_CHECK(slots.size() == 6, "window_linear_step: slots = (n_sinks, ring_start, ring_count, evict_slot, new_slot, new_sink)");
  sparse_attn_cpu::WindowLinearStepParams P{};
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.D = D, P.Dv = Dv;
  P.sink_cap = sink_k.size(2), P.ring_cap = ring_k.size(2);
  P.n_sinks = slots[0], P.ring_start = slots[1], P.ring_count = slots[2];
  P.evict_slot = slots[3], P.new_slot = slots[4], P.new_sink = slots[5];
  TORCH_CHECK(P.n_sinks >= 0 && P.n_sinks <= P.sink_cap && P.ring_count >= 0 && P.ring_count <= P.ring_cap &&
                  (P.ring_count == 0 || (P.ring_start >= 0 && P.ring_start < P.ring_cap)) &&
                  P.evict_slot < P.ring_cap && P.new_slot < P.ring_cap && P.new_sink < P.sink_cap &&
                  ((P.new_slot >= 0) != (P.new_sink >= 0)), "window_linear_step: slots out of range");
  auto out = torch::empty({B, Hq, 1, Dv}, q.options().dtype(torch::kFloat32));
  if (B == 0 || Hq == 0) return out;
  P.q = q.data_ptr(), P.k = k.data_ptr(), P.v = v.data_ptr();
  for (int i = 0; i < 2; ++i) P.qs[i] = q.stride(i), P.ks[i] = k.stride(i), P.vs[i] = v.stride(i);
  P.sink_k = sink_k.data_ptr(), P.sink_v = sink_v.data_ptr(), P.ring_k = ring_k.data_ptr(), P.ring_v = ring_v.data_ptr();
  P.M = M.data_ptr<float>(), P.z = z.data_ptr<float>(), P.gate = gate.data_ptr<float>();
  P.out = out.data_ptr<float>();
  P.scale = static_cast<float>(scale);
  sparse_attn_cpu::window_linear_step_run(P, tag);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  SPARSE_ATTN_CHECK_TARGET();  // refuse to load on a CPU without this build's features
  m.doc() = "sparse_attn CPU decode steps: linear attention and WindowLinear against constant-size state";
  m.def("linear_step", &linear_step, "linear attention, S tokens against a float32 state -> o float32",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("decay"), py::arg("state_in"), py::arg("state_out"),
        py::arg("scale"));
  m.def("window_linear_step", &window_linear_step, "one WindowLinear token against its storage -> o float32",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("sink_k"), py::arg("sink_v"), py::arg("ring_k"),
        py::arg("ring_v"), py::arg("M"), py::arg("z"), py::arg("gate"), py::arg("slots"), py::arg("scale"));
}
