"""The delta rule on the CPU (csrc/cpu/delta.cpp): the chunked forward (prefill, scalar decays) and
the step-by-step form (decode, every decay kind), forward only.

Both read q/k at their own Hk heads (value heads share them in place), take float32 / bfloat16 /
float16 inputs, apply `qk_l2norm` as they load a row, and keep the state in float32. Training
(inputs that require grad) is served by the reference kernels, differentiated by PyTorch: the
scheduler says so in `explain()` ("no backward pass").
"""
from __future__ import annotations

import torch

from ..._build import load_extension, unavailable_reason
from ...patterns.delta import DeltaRule
from ..recurrence import RecurrenceKernel

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


class CpuDeltaChunked(RecurrenceKernel):
    """The chunked forward in C++ (WY / UT transform per chunk, the state across chunks)."""

    name = "cpu.delta_chunked"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (DeltaRule,)
    decays = ("none", "per-token")
    form = "chunked"
    chunk = CHUNK
    phases = ("prefill", "chunked-prefill", "decode")
    efficiency = 0.5
    overhead_s = 40e-6

    def unavailable(self):
        return unavailable_reason(_ext)

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return delta_forward_cpu(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
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
    efficiency = 0.3
    overhead_s = 30e-6

    def unavailable(self):
        return unavailable_reason(_ext)

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return delta_step_cpu(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
                              qk_l2norm=p.pattern.qk_l2norm)
