"""One `WindowLinear` decode step on the CPU (csrc/cpu/window_linear_step.cpp) against the layer's
fixed-size storage (sparse_attn/cache/window_linear.py), updated in place: the window softmax over
the sinks and the ring, the eviction into `(M, z)`, the linear read and the gate mix in one call.
The readable form it equals: sparse_attn/backends/reference/window_linear_step.py.
"""
from __future__ import annotations

import torch

from ..._build import load_extension, unavailable_reason
from ...patterns import WindowLinear
from ...scheduler.kernel import Kernel
from ...scheduler.registry import register
from ..reference.window_linear_step import window_step_bytes, window_step_flops


def _ext():
    return load_extension("cpu_step")


def window_linear_step_cpu(q, k, v, state, slots, *, gate, scale: float):
    """q `(B, Hq, 1, D)`, k/v `(B, Hkv, 1, *)` (float32 / bfloat16 / float16, the storage's dtype);
    `state` a `WindowLinearState` updated in place at `slots`. Returns `(B, Hq, 1, Dv)` in q's dtype."""
    rows = [x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
    g = gate.detach()
    if g.dtype != torch.float32 or not g.is_contiguous():
        g = g.to(torch.float32).contiguous()
    o = _ext().window_linear_step(*rows, state.sink_k, state.sink_v, state.ring_k, state.ring_v, state.M, state.z,
                                  g, list(slots), float(scale))
    return o if q.dtype == torch.float32 else o.to(q.dtype)


class CpuWindowLinearStep(Kernel):
    """`window_linear_step_cpu`: threads over (batch, kv head); K/V and M read once per kv head."""

    name = "cpu.window_linear_step"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (WindowLinear,)
    overhead_s = 20e-6  # the Python wrapper, the extension call, one parallel region
    memory_efficiency = 0.5
    compute_efficiency = 0.1  # dot products and axpys per key, not register-blocked

    def unavailable(self):
        return unavailable_reason(_ext)

    def cost(self, p):
        memory = window_step_bytes(p) / (p.device.bandwidth_gbs * 1e9 * self.memory_efficiency)
        compute = window_step_flops(p) / (p.device.peak_tflops(torch.float32) * 1e12 * self.compute_efficiency)
        return max(memory, compute) + self.overhead_s

    def run(self, q, k, v, p, *, gate=None, state=None, slots=None):
        return window_linear_step_cpu(q, k, v, state, slots, gate=gate, scale=p.scale)


register(CpuWindowLinearStep(), op="window_linear_step")
