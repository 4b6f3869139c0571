"""Chunked linear attention on the CPU (csrc/cpu/linear.cpp, linear_bwd.cpp): prefill, inference
and training.

The same chunked form as `reference.linear_chunked` (sparse_attn/backends/reference/linear.py,
whose docstring derives it), computed per (batch, head) chunk by chunk with everything of a chunk
in per-thread scratch and every product on vec.h's register-blocked micro-kernel; the causal
products visit the lower triangle only. float32 / bfloat16 / float16 inputs, float32 state.

Backward (`supports_backward = True`): `_CpuLinear`, an autograd.Function over the C++
`linear_bwd` (two sweeps per head: forward in time for dq, reverse for dk, dv and the initial
state's gradient; d(decay) per token or per head; GQA's dk, dv summed over the group without
atomics; the gradient of the returned final state is honoured). csrc/cpu/linear_bwd.cpp's
comment has the formulas. Decode (a few tokens against a state) is `cpu.linear_step`
(backends/cpu/linear_step.py), chosen by the costs.
"""
from __future__ import annotations

import torch

from ..._build import load_extension, unavailable_reason
from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel, roofline_seconds
from ...scheduler.registry import register

#: tokens per chunk. The causal (intra-chunk) products cost ~C (D + Dv) FLOPs per token against
#: the state products' 4 D Dv; smaller chunks make shorter micro-kernel loops and more state
#: read-modify-writes. Measured (1 thread, B = 1, H = 8, D = Dv = 128, S = 16K, Zen 4 with
#: AVX-512, 2026-11-23, THP_MEM_ALLOC_ENABLE=1; ratio to a same-run 2048^3 GEMM, no decay /
#: per-token): C = 16: 0.74 / 0.71, 32: 0.75 / 0.71, 48: 0.72 / 0.68, 64: 0.69 / 0.66, 96: 0.66 /
#: 0.62, 128: 0.61 / 0.57
CHUNK = 32


def _ext():
    return load_extension("cpu_linear")


def _prep(q, k, v):
    return (x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))


def linear_forward_cpu(q, k, v, *, decay=None, scale: float, initial_state=None, chunk: int = CHUNK):
    """q `(B, H, S, D)`, k `(B, Hkv, S, D)`, v `(B, Hkv, S, Dv)` with `H % Hkv == 0` (GQA: read in
    place, never expanded), float32 / bfloat16 / float16; decay None, `(H,)` or `(B, H, S)`
    log-decays. Returns `(o (B, H, S, Dv) in q.dtype, final state (B, H, D, Dv) float32)`. No
    autograd (`linear_attention_cpu` is the differentiable entry)."""
    b, h, s, _ = q.shape
    q, k, v = _prep(q, k, v)
    g = None
    if decay is not None:
        g = decay.detach().to(torch.float32)
        g = g[None, :, None].expand(b, h, s) if g.dim() == 1 else g
    st = None if initial_state is None else initial_state.detach().to(torch.float32)
    o, state = _ext().linear_fwd(q.detach(), k.detach(), v.detach(), g, st, float(scale), int(chunk))
    return o.to(q.dtype), state


class _CpuLinear(torch.autograd.Function):
    """The C++ forward and backward (csrc/cpu/linear.cpp, linear_bwd.cpp). `g`: float32 log-decays `(H,)` or
    `(B, H, S)`, or None; `s0`: float32 `(B, H, D, Dv)` or None. Saves q, k, v, g and s0 only: the
    backward rebuilds the states in its forward-in-time sweep. Gradients of q, k, v in their dtype,
    of g and s0 in float32 (the casts outside this Function take them to the callers' dtypes); a
    per-head decay's gradient is the kernel's float64 sum over tokens, summed over the batch. The
    final state's gradient is used when the caller differentiates through the returned state."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, chunk):
        b, h, s, _ = q.shape
        ge = g[None, :, None].expand(b, h, s) if g is not None and g.dim() == 1 else g
        o, state = _ext().linear_fwd(q, k, v, ge, s0, scale, chunk)
        ctx.save_for_backward(q, k, v, g, s0)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.set_materialize_grads(False)
        return o.to(q.dtype), state

    @staticmethod
    def backward(ctx, do, dstate):
        q, k, v, g, s0 = ctx.saved_tensors
        b, h, s, _ = q.shape
        if do is None:
            do = torch.zeros(b, h, s, v.shape[-1], dtype=q.dtype)
        do = do.to(q.dtype)
        if do.shape[-1] > 1 and do.stride(-1) != 1:
            do = do.contiguous()
        ge = g[None, :, None].expand(b, h, s) if g is not None and g.dim() == 1 else g
        want_dg = g is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dg, ds0, dgsum = _ext().linear_bwd(q, k, v, ge, s0, do, dstate, ctx.scale, ctx.chunk, want_dg)
        if want_dg and g.dim() == 1:
            dg = dgsum.sum(dim=0).to(torch.float32)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg if want_dg else None,
                ds0 if s0 is not None else None, None, None)


def linear_attention_cpu(q, k, v, *, decay=None, scale: float, initial_state=None, chunk: int = CHUNK):
    """`linear_forward_cpu` with autograd: gradients of q, k, v, decay (`(H,)` or `(B, H, S)`, in
    its dtype) and initial_state, through the output and the returned final state. Without any
    input that requires grad (or under no_grad) it is the plain forward."""
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, decay, initial_state))
    if not needs:
        return linear_forward_cpu(q, k, v, decay=decay, scale=scale, initial_state=initial_state, chunk=chunk)
    q, k, v = _prep(q, k, v)
    g = None if decay is None else decay.to(torch.float32)
    st = None if initial_state is None else initial_state.to(torch.float32)
    return _CpuLinear.apply(q, k, v, g, st, float(scale), int(chunk))


class CpuLinearChunked(Kernel):
    """Chunked linear attention in C++ (csrc/cpu/linear.cpp, linear_bwd.cpp): forward, and backward through
    `_CpuLinear` (every decay kind, initial_state, GQA, the returned state's gradient)."""

    name = "cpu.linear_chunked"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (LinearAttention,)
    supports_backward = True
    #: decode (one token, no gradients): the step kernels (cpu.linear_step); one token with gradients: here
    phases = ("prefill", "chunked-prefill", "training")
    #: takes k, v with their own Hkv heads (`linear_attention` expands them for other kernels): at
    #: B = 1, H = 32, Hkv = 8, S = 32K the expansion alone cost 0.66 s of a 2.0 s call
    native_gqa = True
    #: of the device table's float32 peak over the FLOPs below: predicts 152 ms for S = 16K, B = 1,
    #: H = 8, D = Dv = 128 on one Zen 4 core, where bench/linear_rate.py measured 120-175 ms
    #: (2026-11-23; the upper end pays ~35 ms of page faults on the fresh 64 MB output). It ranks
    #: first from 2 tokens on: measured 0.2-0.3 ms against the recurrent kernel's 0.8-9 ms at
    #: S = 2-16 (D = 128, H = 8, B = 2) and 0.02-0.03 ms against 0.07-0.76 ms at D = 16, H = 4
    efficiency = 0.7
    overhead_s = 30e-6  # Python, the extension call, one parallel region
    #: the backward's autograd machinery (the Function, the engine, the extension call, the
    #: gradient casts): at S = 1 (B = 1, H = 3, D = 16, one core) the kernel's forward + backward
    #: measured 105 us against 16 us for its forward alone. (`linear_attention` forward + backward:
    #: 146 us, where the recurrent kernel measured 270 us; the reference cost models now count
    #: their autograd overhead too, so one-token training steps come here.)
    backward_overhead_s = 90e-6

    def unavailable(self):
        return unavailable_reason(_ext)

    def cost(self, p):
        tokens = p.batch * p.q_heads * max(p.sq, 1)
        c = min(CHUNK, max(p.sq, 1))
        # state products 4 D Dv per token; the lower triangle of Q K^T and P V, ~(C / 2 + one
        # vector of padding) keys per token
        flops = 2.0 * tokens * ((c / 2 + 8) * (p.head_dim + p.v_head_dim) + 2 * p.head_dim * p.v_head_dim)
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * tokens * (2 * p.head_dim + p.v_head_dim) + 4 * tokens * p.v_head_dim
        # the float32 state: an initial state read, the final state written (what bounds a few-token call)
        nbytes += 8.0 * p.batch * p.q_heads * p.head_dim * p.v_head_dim
        if p.requires_grad:
            # the backward: 5 state products (the state rebuilt, dO S^T; K R, R V^T, Q^T dO) against
            # the forward's 2, and 6 intra-chunk ones (dA twice, dA K, A^T, A^T dO on the triangle, Q^T dA
            # in full: ~2 C (D + Dv) per token) against 2; it reads q, k, v, dO, writes float32 dq, dk, dv
            flops += 2.0 * tokens * ((2 * c + 8) * (p.head_dim + p.v_head_dim) + 5 * p.head_dim * p.v_head_dim)
            nbytes += elem * tokens * (2 * p.head_dim + 2 * p.v_head_dim) + 4 * tokens * (2 * p.head_dim + p.v_head_dim)
        overhead = self.overhead_s + (self.backward_overhead_s if p.requires_grad else 0.0)
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=self.efficiency,
                                overhead_s=overhead, compute_dtype=torch.float32)

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None):
        return linear_attention_cpu(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state)


register(CpuLinearChunked(), op="linear_attention")
