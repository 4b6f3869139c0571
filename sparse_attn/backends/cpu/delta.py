"""The delta rule on the CPU (csrc/cpu/delta.cpp): the chunked forward (prefill, scalar decays) and
the step-by-step form (decode, every decay kind); the chunked kernel has its backward too.

Both read q/k at their own Hk heads (value heads share them in place), take float32 / bfloat16 /
float16 inputs, apply `qk_l2norm` as they load a row, and keep the state in float32. With
gradients, the chunked kernel runs `_CpuDelta` (csrc/cpu/delta_bwd.cpp) on float32 copies, with
qk_l2norm applied (and differentiated) in PyTorch; per-channel decays (KDA) train on the reference.
"""
from __future__ import annotations

import torch

from ..._build import load_extension, unavailable_reason
from ...patterns.delta import DeltaRule
from ..recurrence import RecurrenceKernel
from ..reference.delta import G_FLOOR, l2norm

#: tokens per chunk: the triangular parts cost ~C (3 D + 2 Dv) / 2 per token against the state
#: products' 3 D Dv (docs/delta_rule.md has the measurement)
CHUNK = 64


def _ext():
    return load_extension("cpu_delta")


def _args(q, k, v, beta, decay, initial_state):
    q, k, v = (x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    beta = beta.detach().to(torch.float32)
    g = None if decay is None else decay.detach().to(torch.float32)
    if g is not None and g.dim() == 4 and g.shape[-1] > 1 and g.stride(-1) != 1:
        g = g.contiguous()
    s0 = None if initial_state is None else initial_state.detach().to(torch.float32)
    return q.detach(), k.detach(), v.detach(), beta, g, s0


def delta_forward_cpu(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False,
                      chunk: int = CHUNK):
    """The chunked forward: q, k `(B, Hk, S, D)`, v `(B, Hv, S, Dv)`, beta `(B, Hv, S)`, decay None or
    `(B, Hv, S)`. Returns `(o (B, Hv, S, Dv) in v.dtype, state (B, Hv, D, Dv) float32)`; no autograd."""
    o, st = _ext().delta_fwd(*_args(q, k, v, beta, decay, initial_state), float(scale), bool(qk_l2norm), int(chunk))
    return o.to(v.dtype), st


def delta_step_cpu(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False):
    """The step-by-step form (decode: 1 to a few tokens), any decay kind; same results."""
    o, st = _ext().delta_step(*_args(q, k, v, beta, decay, initial_state), float(scale), bool(qk_l2norm))
    return o.to(v.dtype), st


class _CpuDelta(torch.autograd.Function):
    """The C++ chunked forward and backward (csrc/cpu/delta.cpp, delta_bwd.cpp) on float32 q, k
    (already normalised when qk_l2norm), v, beta, g (clamped at -1000 by the caller) and s0.
    Saves the inputs only: the backward rebuilds the chunk states. dq, dk come per value head and
    are summed over each q/k head's group here."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, scale, chunk):
        o, st = _ext().delta_fwd(q, k, v, beta, g, s0, scale, False, chunk)
        ctx.save_for_backward(q, k, v, beta, g, s0)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.set_materialize_grads(False)
        return o, st

    @staticmethod
    def backward(ctx, do, dstate):
        q, k, v, beta, g, s0 = ctx.saved_tensors
        b, hv, s, dv = v.shape
        hk = q.shape[1]
        do = torch.zeros(b, hv, s, dv) if do is None else do.to(torch.float32).contiguous()
        dq, dk, dvv, dbeta, dg, ds0 = _ext().delta_bwd(q, k, v, beta, g, s0, do, dstate, ctx.scale, ctx.chunk)
        if hv != hk:
            dq = dq.view(b, hk, hv // hk, s, -1).sum(2)
            dk = dk.view(b, hk, hv // hk, s, -1).sum(2)
        return (dq, dk, dvv, dbeta, dg if g is not None else None, ds0 if s0 is not None else None, None, None)


def delta_rule_cpu(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False,
                   chunk: int = CHUNK):
    """`delta_forward_cpu` with autograd (gradients of q, k, v, beta, decay, initial_state through
    the output and the returned state); without gradients it is the plain forward."""
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta, decay, initial_state))
    if not needs:
        return delta_forward_cpu(q, k, v, beta, decay=decay, scale=scale, initial_state=initial_state,
                                 qk_l2norm=qk_l2norm, chunk=chunk)
    qf, kf, vf = (x.to(torch.float32) for x in (q, k, v))
    if qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf, kf, vf = (x.contiguous() for x in (qf, kf, vf))
    g = None if decay is None else decay.to(torch.float32).clamp(min=G_FLOOR)
    s0 = None if initial_state is None else initial_state.to(torch.float32)
    o, st = _CpuDelta.apply(qf, kf, vf, beta.to(torch.float32), g, s0, float(scale), int(chunk))
    return o.to(v.dtype), st


class CpuDeltaChunked(RecurrenceKernel):
    """The chunked form in C++ (WY / UT transform per chunk, the state across chunks): forward, and
    backward through `_CpuDelta` (scalar decays; KDA's per-channel decays go to the reference)."""

    name = "cpu.delta_chunked"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (DeltaRule,)
    decays = ("none", "per-token")
    form = "chunked"
    chunk = CHUNK
    supports_backward = True
    efficiency = 0.5
    overhead_s = 100e-6  # the extension call, per-thread scratch, one parallel region

    def unavailable(self):
        return unavailable_reason(_ext)

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return delta_rule_cpu(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
                              qk_l2norm=p.pattern.qk_l2norm, chunk=self.chunk)


class CpuDeltaStep(RecurrenceKernel):
    """The step-by-step form in C++: decode of 1 to a few tokens, two passes over the state per
    token; every decay kind (KDA's per-channel decays too)."""

    name = "cpu.delta_step"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (DeltaRule,)
    form = "recurrent"
    max_tokens = 16
    phases = ("prefill", "chunked-prefill", "decode")
    #: memory-bound: the state is read and written twice per token
    efficiency = 0.5
    overhead_s = 30e-6

    def unavailable(self):
        return unavailable_reason(_ext)

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return delta_step_cpu(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
                              qk_l2norm=p.pattern.qk_l2norm)
