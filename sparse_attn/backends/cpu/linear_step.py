"""Linear-attention decode steps on the CPU (csrc/cpu/linear_step.cpp): one token, or a few,
against a float32 state, reading and writing the state once per call (in place when the caller
hands its state as `state_out`). Inference only; the chunked kernels serve prefill and training.
"""
from __future__ import annotations

import torch

from ..._build import load_extension, unavailable_reason
from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel
from ...scheduler.registry import register


def _ext():
    return load_extension("cpu_step")


def _rows(x):
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def linear_step_cpu(q, k, v, *, decay=None, scale: float, initial_state=None, state_out=None):
    """q `(B, H, S, D)`, k `(B, Hkv, S, D)`, v `(B, Hkv, S, Dv)` (GQA read in place), float32 /
    bfloat16 / float16; decay None, `(H,)` or `(B, H, S)` log-decays; initial_state `(B, H, D, Dv)`
    or None (zeros). `state_out`: a contiguous float32 `(B, H, D, Dv)` tensor to write the new state
    into (it may be `initial_state` itself: the update is then in place), or None for a new one.
    Returns `(o (B, H, S, Dv) in q.dtype, state)`."""
    b, h, s, d = q.shape
    dv = v.shape[-1]
    s_in = None
    if initial_state is not None:
        s_in = initial_state.detach()
        if s_in.dtype != torch.float32 or not s_in.is_contiguous():
            s_in = s_in.to(torch.float32).contiguous()
    if state_out is None:
        state_out = torch.empty(b, h, d, dv, dtype=torch.float32)
    if s == 0:  # no token: the state passes through unchanged
        if s_in is None:
            state_out.zero_()
        elif s_in.data_ptr() != state_out.data_ptr():
            state_out.copy_(s_in)
        return q.new_zeros(b, h, 0, dv), state_out
    g = None
    if decay is not None:
        g = decay.detach().to(torch.float32)
        g = g[None, :, None].expand(b, h, s) if g.dim() == 1 else g
    o = _ext().linear_step(_rows(q.detach()), _rows(k.detach()), _rows(v.detach()), g, s_in, state_out, float(scale))
    return (o if q.dtype == torch.float32 else o.to(q.dtype)), state_out


class CpuLinearStep(Kernel):
    """`linear_step_cpu`: the decode step (csrc/cpu/linear_step.cpp), every decay kind, GQA in place."""

    name = "cpu.linear_step"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (LinearAttention,)
    native_gqa = True
    #: `run` may write the new state into the caller's tensor (`state_out`)
    writes_state_out = True
    max_tokens = 16
    #: the Python wrapper, the extension call and one parallel region
    overhead_s = 20e-6
    #: of the device table's bandwidth on the state's bytes (read + written once), and of the float32
    #: peak for the two multiply-adds per state element and token (matrix-vector shaped). docs/linear_attention.md
    #: ("Decode steps") has the measurements these come from: 47 us against cpu.linear_chunked's 155 us at
    #: S = 1, H = 8, D = Dv = 128, and the step ahead up to S = 5, behind at S = 16 there
    memory_efficiency = 0.8
    compute_efficiency = 0.35

    def unavailable(self):
        return unavailable_reason(_ext)

    def extra_reasons(self, p):
        if p.sq > self.max_tokens:
            return [f"S={p.sq} > {self.max_tokens}: a decode step (the chunked kernels serve long inputs)"]
        return []

    def cost(self, p):
        bh = p.batch * p.q_heads
        state = 2.0 * 4 * bh * p.head_dim * p.v_head_dim
        elt = torch.finfo(p.dtype).bits // 8
        tokens = bh * max(p.sq, 1) * (2 * p.head_dim + p.v_head_dim) * elt + 4 * bh * max(p.sq, 1) * p.v_head_dim
        flops = 4.0 * bh * max(p.sq, 1) * p.head_dim * p.v_head_dim
        memory = (state + tokens) / (p.device.bandwidth_gbs * 1e9 * self.memory_efficiency)
        compute = flops / (p.device.peak_tflops(torch.float32) * 1e12 * self.compute_efficiency)
        return max(memory, compute) + self.overhead_s

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None, state_out=None):
        return linear_step_cpu(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state, state_out=state_out)


register(CpuLinearStep(), op="linear_attention")
