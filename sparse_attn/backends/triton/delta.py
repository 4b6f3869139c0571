"""The delta rule in Triton: launchers and the scheduler's kernels (`triton.delta_chunked`, the
chunked forward for prefill; `triton.delta_step`, the decode step). The kernels and their math are
in delta_kernels.py.

The chunked kernel has a backward (delta_bwd.py); the decode step does not, so with inputs that
require grad the scheduler explains why and picks a chunked kernel.

`qk_l2norm` is applied here before the launch (one PyTorch op per tensor); decays are clamped at
-1000 (`exp` is 0 in float32 either way: a `-inf` reset stays NaN-free) and cumulated inside each
chunk in float64, then stored as float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns.delta import DeltaRule
from ...scheduler.registry import register
from ..recurrence import RecurrenceKernel
from ..reference.delta import G_FLOOR, l2norm
from .runtime import TritonKernelMixin, on_gpu

try:
    import triton

    from . import delta_kernels as _k
    _IMPORT_ERROR = None
except Exception as exc:  # no Triton, or one too old for these kernels
    triton = None
    _k = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_DECAY = {"none": 0, "per-token": 1, "per-channel": 2}
#: tokens per chunk, on the GPU and in the interpreter (the backward recomputes at the same size)
CHUNK = 16
#: the largest head dims served (FlashAttention's range); above 128 the float32 state slice and
#: chunk tiles no longer fit in registers (a spill, allowed there by bench/gpu_static.py)
MAX_HEAD_DIM = 256
#: the backward's reverse walk spills above this on sm_80 / sm_90 (delta_bwd.py `_bwd_launch`)
MAX_BWD_HEAD_DIM = 64


def _meta(q, d, dv, kind):
    """(chunk C, BD, BDV, BV, BK, matmul precision, prep warps, scan warps, scan stages)."""
    bd = max(16, triton.next_power_of_2(d))
    bdv = max(16, triton.next_power_of_2(dv))
    if not on_gpu(q):  # the interpreter: 16-token chunks keep the tests' odd lengths multi-chunk
        return CHUNK, bd, bdv, min(64, bdv), 16 if kind == 2 else bd, "ieee", 4, 4, None
    # tf32 products only for bfloat16 inputs (exact in tf32; the rounding of the float32
    # intermediates, ~5e-4, is far inside bfloat16's bound); float32 / float16 inputs keep
    # float32-exact (FMA) products, whose operands take more registers: narrower Dv tiles.
    # No spill at D <= 128 on sm_80 / sm_90 with these (bench/gpu_static.py, family delta_rule):
    # ieee at C = 32 or BV = 32 spilled 256-7900 bytes, as did tf32x3 and per-channel decays at
    # BV = 32; the scan's loop is sequential, so one stage (no prefetch buffers) is kept.
    bf16 = q.dtype == torch.bfloat16
    prec = "tf32" if bf16 else "ieee"
    bv = 32 if bf16 and kind != 2 else 16
    bk = 16 if kind == 2 else min(32, bd)
    w = 8 if bd > 64 else 4
    return CHUNK, bd, bdv, bv, bk, prec, w, w, 1


def _chunk_cumsum(g, c):
    """Log-decays `(BH, S[, D])` -> float32 sums from each chunk's start (inclusive), in float64."""
    bh, s = g.shape[:2]
    n = -(-s // c)
    g = g.to(torch.float64).clamp(min=G_FLOOR)
    if g.dim() == 2:
        gp = F.pad(g, (0, n * c - s)).reshape(bh, n, c)
        return torch.cumsum(gp, dim=2).reshape(bh, n * c)[:, :s].to(torch.float32).contiguous()
    d = g.shape[2]
    gp = F.pad(g, (0, 0, 0, n * c - s)).reshape(bh, n, c, d)
    return torch.cumsum(gp, dim=2).reshape(bh, n * c, d)[:, :s].to(torch.float32).contiguous()


def _prepare(q, k, v, beta, decay, initial_state, qk_l2norm):
    b, hk, s, d = q.shape
    hv = v.shape[1]
    if qk_l2norm:
        q, k = l2norm(q.float()), l2norm(k.float())
    q, k, v = (x.detach().contiguous() for x in (q, k, v))
    beta = beta.detach().to(torch.float32).reshape(b * hv, s).contiguous()
    g = None if decay is None else decay.detach().reshape(b * hv, s, *decay.shape[3:])
    s0 = None
    if initial_state is not None:
        s0 = initial_state.detach().to(torch.float32).contiguous()
    return q, k, v, beta, g, s0


def _empty_result(q, v, initial_state):
    b, _, s, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    st = (initial_state.detach().to(torch.float32).clone() if initial_state is not None
          else torch.zeros(b, hv, d, dv, dtype=torch.float32, device=q.device))
    return v.new_zeros(b, hv, s, dv), st


def triton_delta_chunked(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False,
                         states=None):
    """The chunked forward. q, k `(B, Hk, S, D)`; v `(B, Hv, S, Dv)`; beta `(B, Hv, S)`; decay None,
    `(B, Hv, S)` or `(B, Hv, S, D)`; initial_state `(B, Hv, D, Dv)`. Returns `(o (B, Hv, S, Dv) in
    v.dtype, final state (B, Hv, D, Dv) float32)`; no autograd. `states`: a float32 buffer
    `(B * Hv, ceil(S / C), D, Dv)` that receives the state entering each chunk (the backward's)."""
    b, hk, s, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    if s == 0 or b * hv == 0:
        return _empty_result(q, v, initial_state)
    kind = 0 if decay is None else (2 if decay.dim() == 4 else 1)
    q, k, v, beta, g, s0 = _prepare(q, k, v, beta, decay, initial_state, qk_l2norm)
    c, bd, bdv, bv, bk, prec, wp, ws, ns = _meta(q, d, dv, kind)
    bc = None if g is None else _chunk_cumsum(g, c)
    dev, bh = q.device, b * hv
    w = torch.empty(bh, s, d, dtype=torch.float32, device=dev)
    wv = torch.empty(bh, s, dv, dtype=torch.float32, device=dev)
    p = torch.empty(bh, s, c, dtype=torch.float32, device=dev)
    o = torch.empty(b, hv, s, dv, dtype=v.dtype, device=dev)
    sf = torch.empty(b, hv, d, dv, dtype=torch.float32, device=dev)
    dummy = beta
    _k.delta_prep_kernel[(bh, triton.cdiv(s, c))](
        q, k, v, beta, bc if bc is not None else dummy, w, wv, p, s, d, dv, hv, hk, hv // hk,
        DECAY=kind, C=c, BD=bd, BDV=bdv, BK=bk, PREC=prec, num_warps=wp)
    _k.delta_scan_kernel[(bh, triton.cdiv(dv, bv))](
        q, k, bc if bc is not None else dummy, w, wv, p, s0 if s0 is not None else sf, o, sf,
        states if states is not None else sf, float(scale),
        s, d, dv, hv, hk, hv // hk, DECAY=kind, HAS_S0=s0 is not None, STORE_H=states is not None, C=c, BD=bd, BV=bv, PREC=prec,
        num_warps=ws, **({} if ns is None else {"num_stages": ns}))
    return o, sf


def triton_delta_rule(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False):
    """`triton_delta_chunked` with autograd (delta_bwd.py): gradients of q, k, v, beta, decay and
    initial_state through the output and the returned state; qk_l2norm is differentiated by
    PyTorch around the kernel. Without gradients it is the plain forward."""
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, beta, decay, initial_state))
    if not needs:
        return triton_delta_chunked(q, k, v, beta, decay=decay, scale=scale, initial_state=initial_state,
                                    qk_l2norm=qk_l2norm)
    from .delta_bwd import TritonDeltaFunction
    qf, kf = q.to(torch.float32), k.to(torch.float32)
    if qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    o, st = TritonDeltaFunction.apply(qf.contiguous(), kf.contiguous(), v, beta, decay, initial_state, float(scale))
    return o.to(v.dtype), st


def triton_delta_step(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False):
    """The step-by-step form (decode: a token or a few); same arguments and results as
    `triton_delta_chunked`, any decay kind."""
    b, hk, s, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    if s == 0 or b * hv == 0:
        return _empty_result(q, v, initial_state)
    kind = 0 if decay is None else (2 if decay.dim() == 4 else 1)
    q, k, v, beta, g, s0 = _prepare(q, k, v, beta, decay, initial_state, qk_l2norm)
    if g is not None:
        g = g.to(torch.float32).clamp(min=G_FLOOR).contiguous()
    bd = max(16, triton.next_power_of_2(d))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    o = torch.empty(b, hv, s, dv, dtype=v.dtype, device=q.device)
    sf = torch.empty(b, hv, d, dv, dtype=torch.float32, device=q.device)
    _k.delta_step_kernel[(b * hv, triton.cdiv(dv, bv))](
        q, k, v, beta, g if g is not None else beta, s0 if s0 is not None else sf, sf, o, float(scale),
        s, d, dv, hv, hk, hv // hk, DECAY=kind, HAS_S0=s0 is not None, BD=bd, BV=bv,
        num_warps=8 if bd > 64 else 4)
    return o, sf


class _TritonDelta(TritonKernelMixin, RecurrenceKernel):
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (DeltaRule,)
    head_dims = (1, MAX_HEAD_DIM)

    def import_error(self):
        return _IMPORT_ERROR

    def cost(self, p):
        interp = 1000.0 if p.device.type == "cpu" else 0.0  # the interpreter: very slow; only when asked for
        return interp + super().cost(p)


class TritonDeltaChunked(_TritonDelta):
    """`triton_delta_rule`: the UT transform of every chunk in parallel, then one program per
    (value head, Dv tile) carrying the state across chunks; every decay kind; backward through
    delta_bwd.py (the reverse walk in Triton, the chain through the chunk terms in PyTorch)."""

    name = "triton.delta_chunked"
    form = "chunked"
    supports_backward = True

    def more_reasons(self, p):
        if p.requires_grad and max(p.head_dim, p.v_head_dim) > MAX_BWD_HEAD_DIM and p.device.type == "cuda":
            return [f"backward at head dims above {MAX_BWD_HEAD_DIM} not offered: its reverse walk spills "
                    "registers on sm_80 / sm_90 (bench/gpu_static.py)"]
        return []
    chunk = 16
    efficiency = 0.3
    overhead_s = 20e-6  # two launches and the decays' cumulative sum

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return triton_delta_rule(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
                                 qk_l2norm=p.pattern.qk_l2norm)


class TritonDeltaStep(_TritonDelta):
    """`triton_delta_step`: decode, the state slice in registers, read and written once."""

    name = "triton.delta_step"
    form = "recurrent"
    max_tokens = 16
    efficiency = 0.5  # memory-bound: the state read and written once
    overhead_s = 10e-6

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return triton_delta_step(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
                                 qk_l2norm=p.pattern.qk_l2norm)


register(TritonDeltaChunked(), op="delta_rule")
register(TritonDeltaStep(), op="delta_rule")
