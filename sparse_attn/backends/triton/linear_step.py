"""Linear-attention decode steps in Triton: one token, or a few, against a float32 state.

One program per (batch * head, tile of Dv columns) loads its `(D, BV)` slice of the state once,
applies the S tokens in registers (`S = exp(g_t) S + k_t v_t^T`, `o_t = scale q_t^T S`) and
stores it once (in place when the caller hands its state as `state_out`: each program reads and
writes only its own slice). GQA: k, v keep their Hkv heads. Inference only.
"""
from __future__ import annotations

import torch

from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel
from ...scheduler.registry import register
from .runtime import TritonKernelMixin

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as exc:  # no Triton, or one too old
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


if triton is not None:
    @triton.jit
    def linear_step_kernel(Q, K, V, G, S_IN, S_OUT, O, scale, S, D, DV, H, GRP,
                           sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sgb, sgh, sgt,
                           HAS_G: tl.constexpr, HAS_S0: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr):
        bh = tl.program_id(0)
        iv = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GRP
        offs_d = tl.arange(0, BD)
        offs_v = iv * BV + tl.arange(0, BV)
        dmask = offs_d < D
        vmask = offs_v < DV
        smask = dmask[:, None] & vmask[None, :]
        sptr = bh * D * DV + offs_d[:, None] * DV + offs_v[None, :]
        if HAS_S0:
            state = tl.load(S_IN + sptr, mask=smask, other=0.0)
        else:
            state = tl.zeros([BD, BV], dtype=tl.float32)
        for t in range(0, S):
            q = tl.load(Q + b * sqb + h * sqh + t * sqt + offs_d, mask=dmask, other=0.0).to(tl.float32)
            k = tl.load(K + b * skb + hk * skh + t * skt + offs_d, mask=dmask, other=0.0).to(tl.float32)
            v = tl.load(V + b * svb + hk * svh + t * svt + offs_v, mask=vmask, other=0.0).to(tl.float32)
            if HAS_G:
                state = state * tl.exp(tl.load(G + b * sgb + h * sgh + t * sgt))
            state = state + k[:, None] * v[None, :]
            o = tl.sum(q[:, None] * state, axis=0) * scale
            tl.store(O + (bh * S + t) * DV + offs_v, o, mask=vmask)
        tl.store(S_OUT + sptr, state, mask=smask)


def _rows(x):
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def triton_linear_step(q, k, v, *, decay=None, scale: float, initial_state=None, state_out=None):
    """q `(B, H, S, D)`, k/v `(B, Hkv, S, *)` (GQA read in place); decay None, `(H,)` or `(B, H, S)`;
    initial_state `(B, H, D, Dv)` or None; `state_out` contiguous float32 `(B, H, D, Dv)` (may be
    initial_state: in place) or None. Returns `(o (B, H, S, Dv) in q.dtype, state)`."""
    b, h, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    s_in = None
    if initial_state is not None:
        s_in = initial_state.detach()
        if s_in.dtype != torch.float32 or not s_in.is_contiguous():
            s_in = s_in.to(torch.float32).contiguous()
    if state_out is None:
        state_out = torch.empty(b, h, d, dv, dtype=torch.float32, device=q.device)
    if s == 0:  # no token: the state passes through unchanged
        if s_in is None:
            state_out.zero_()
        elif s_in.data_ptr() != state_out.data_ptr():
            state_out.copy_(s_in)
        return q.new_zeros(b, h, 0, dv), state_out
    o = torch.empty(b, h, s, dv, dtype=torch.float32, device=q.device)
    if b * h == 0:
        return o.to(q.dtype), state_out
    q, k, v = (_rows(x.detach()) for x in (q, k, v))
    g = None
    if decay is not None:
        g = decay.detach().to(torch.float32)
        g = g[None, :, None].expand(b, h, s) if g.dim() == 1 else g
    bd = max(16, triton.next_power_of_2(d))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    gs = g.stride() if g is not None else (0, 0, 0)
    linear_step_kernel[(b * h, triton.cdiv(dv, bv))](
        q, k, v, g if g is not None else o, s_in if s_in is not None else state_out, state_out, o, float(scale),
        s, d, dv, h, h // hkv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *gs,
        HAS_G=g is not None, HAS_S0=s_in is not None, BD=bd, BV=bv)
    return o.to(q.dtype), state_out


class TritonLinearStep(TritonKernelMixin, Kernel):
    """`triton_linear_step`: the decode step, state slice in registers, read and written once."""

    name = "triton.linear_step"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (LinearAttention,)
    head_dims = (1, 256)
    native_gqa = True
    writes_state_out = True
    max_tokens = 16

    def import_error(self):
        return _IMPORT_ERROR

    def extra_reasons(self, p):
        if p.sq > self.max_tokens:
            return [f"S={p.sq} > {self.max_tokens}: a decode step (the chunked kernels serve long inputs)"]
        return []

    def cost(self, p):
        if p.device.type == "cpu":  # the interpreter: correct but very slow; only when asked for
            return 1000.0 + 1e-6 * p.sq * p.batch * p.q_heads
        bh = p.batch * p.q_heads
        nbytes = 2.0 * 4 * bh * p.head_dim * p.v_head_dim
        programs = bh * -(-p.v_head_dim // 64)
        eff = 0.6 * min(1.0, programs / max(p.device.units, 1))
        return nbytes / (p.device.bandwidth_gbs * 1e9 * max(eff, 0.02)) + 10e-6

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None, state_out=None):
        return triton_linear_step(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state,
                                  state_out=state_out)


register(TritonLinearStep(), op="linear_attention")
