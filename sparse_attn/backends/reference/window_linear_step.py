"""One `WindowLinear` decode step in plain PyTorch against the layer's fixed-size storage
(sparse_attn/cache/window_linear.py): the readable form the native step kernels must equal.

In order: the token leaving the window (if any) is read from its ring slot and added to
`(M, z)`; the new token's k, v are written into their slot; the softmax part attends over the
sinks and the ring slots the step sees; the linear part reads `phi(q)^T M / phi(q)^T z` (0 while
nothing was evicted); the gate mixes them (contract, "the hybrid").
"""
from __future__ import annotations

import torch

from ...patterns import WindowLinear
from ...scheduler.kernel import Kernel, roofline_seconds
from .softmax import acc_dtype
from .window_linear import phi

_OP_S = 12e-6  # one small PyTorch op on the host


def window_linear_step_reference(q, k, v, state, slots, *, gate, scale: float):
    """q `(B, Hq, 1, D)`, k/v `(B, Hkv, 1, *)` of the new token; `state` a `WindowLinearState`
    updated in place at `slots` (a `StepSlots`). Returns `(B, Hq, 1, Dv)` in q's dtype."""
    b, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    if slots.evict_slot >= 0:
        fk = phi(state.ring_k[:, :, slots.evict_slot].to(acc))
        state.M.add_(fk[..., :, None] * state.ring_v[:, :, slots.evict_slot, None, :].to(acc))
        state.z.add_(fk)
    if slots.new_slot >= 0:
        state.ring_k[:, :, slots.new_slot] = k[:, :, 0]
        state.ring_v[:, :, slots.new_slot] = v[:, :, 0]
        ns = slots.n_sinks
    else:
        state.sink_k[:, :, slots.new_sink] = k[:, :, 0]
        state.sink_v[:, :, slots.new_sink] = v[:, :, 0]
        ns = slots.n_sinks + 1
    parts = state.visible_ring(slots)
    ks = torch.cat([state.sink_k[:, :, :ns]] + [state.ring_k[:, :, a:e] for a, e in parts], dim=2)
    vs = torch.cat([state.sink_v[:, :, :ns]] + [state.ring_v[:, :, a:e] for a, e in parts], dim=2)
    qa = q.to(acc).view(b, hkv, g, 1, d)
    s = torch.matmul(qa, ks.to(acc)[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, G, 1, n)
    a = torch.matmul(torch.softmax(s, dim=-1), vs.to(acc)[:, :, None])
    fq = phi(qa)
    num = torch.matmul(fq, state.M[:, :, None])
    den = torch.matmul(fq, state.z[:, :, None, :, None])  # (B, Hkv, G, 1, 1)
    lin = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    w = torch.sigmoid(gate.to(acc)).view(1, hkv, g, 1, 1)
    return (w * a + (1.0 - w) * lin).reshape(b, hq, 1, dv).to(q.dtype)


def window_step_bytes(p) -> float:
    """Bytes one step must move: the visible K/V once per kv head, M read and written, q and o."""
    elt = torch.finfo(p.dtype).bits // 8
    acc = 8 if p.dtype == torch.float64 else 4
    kv = p.batch * p.kv_heads * p.sk * (p.head_dim + p.v_head_dim) * elt
    mem = 2 * p.batch * p.kv_heads * p.head_dim * p.v_head_dim * acc
    return kv + mem + p.batch * p.q_heads * (p.head_dim + p.v_head_dim) * elt


def window_step_flops(p) -> float:
    return 2.0 * p.batch * p.q_heads * (p.sk * (p.head_dim + p.v_head_dim) + 2 * p.head_dim * p.v_head_dim)


class ReferenceWindowLinearStep(Kernel):
    """`window_linear_step_reference`: any device and dtype, ~30 small ops per step."""

    name = "reference.window_linear_step"
    backend = "reference"
    patterns = (WindowLinear,)

    def cost(self, p):
        return roofline_seconds(p, flops=window_step_flops(p), bytes_moved=3 * window_step_bytes(p), efficiency=0.5,
                                overhead_s=30 * _OP_S, compute_dtype=acc_dtype(p.dtype))

    def run(self, q, k, v, p, *, gate=None, state=None, slots=None):
        return window_linear_step_reference(q, k, v, state, slots, gate=gate, scale=p.scale)
