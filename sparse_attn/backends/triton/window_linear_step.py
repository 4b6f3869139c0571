"""One `WindowLinear` decode step in Triton against the layer's fixed-size storage
(sparse_attn/cache/window_linear.py). The readable form it equals:
sparse_attn/backends/reference/window_linear_step.py.

One program per (batch, kv head): it adds the evicted token (read from its ring slot) to its
`(D, Dv)` slice of `M` and to `z`, in registers, and stores them back; then for each query head of
the GQA group, an online softmax over the sinks and the visible ring slots (blocks of BN keys)
started from the new token's own key (taken from the input), the linear read `phi(q)^T M /
phi(q)^T z`, and the gate mix. The program owns its kv head's `M` and `z`, so nothing races; the
new token's k, v are written into their slot by the launcher after the kernel (stream order), so
no program reads a slot another one is overwriting. Inference only.
"""
from __future__ import annotations

import torch

from ...patterns import WindowLinear
from ...scheduler.kernel import Kernel
from ...scheduler.registry import register
from ..reference.window_linear_step import window_step_bytes
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
    def _phi(x):
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))

    @triton.jit
    def _load_keys(sink, ring, j, n_sinks, n_all, ring_start, ring_cap, cols, cmask, width):
        """Rows j (a block) of the visible set: sink j for j < n_sinks, else ring slot
        (ring_start + j - n_sinks) mod capacity; float32, 0 past n_all."""
        inside = j < n_all
        is_sink = j < n_sinks
        slot = (ring_start + tl.where(is_sink, 0, j - n_sinks)) % ring_cap
        a = tl.load(sink + j[:, None] * width + cols[None, :], mask=(inside & is_sink)[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        b = tl.load(ring + slot[:, None] * width + cols[None, :],
                    mask=(inside & (j >= n_sinks))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        return a + b

    @triton.jit
    def window_linear_step_kernel(Q, K, V, SK, SV, RK, RV, M, Z, GATE, O, scale, HQ, HKV, D, DV, SINK_CAP, RING_CAP,
                                  n_sinks, ring_start, ring_count, evict_slot, sqb, sqh, skb, skh, svb, svh,
                                  GRP: tl.constexpr, EVICT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                                  BN: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // HKV
        hk = pid % HKV
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BV)
        offs_n = tl.arange(0, BN)
        dmask = offs_d < D
        vmask = offs_v < DV
        smask = dmask[:, None] & vmask[None, :]
        sk = SK + pid * SINK_CAP * D
        sv = SV + pid * SINK_CAP * DV
        rk = RK + pid * RING_CAP * D
        rv = RV + pid * RING_CAP * DV
        mptr = M + pid * D * DV + offs_d[:, None] * DV + offs_v[None, :]
        zptr = Z + pid * D + offs_d
        mem = tl.load(mptr, mask=smask, other=0.0)
        z = tl.load(zptr, mask=dmask, other=0.0)
        if EVICT:
            fk = tl.where(dmask, _phi(tl.load(rk + evict_slot * D + offs_d, mask=dmask, other=0.0).to(tl.float32)), 0.0)
            ve = tl.load(rv + evict_slot * DV + offs_v, mask=vmask, other=0.0).to(tl.float32)
            mem = mem + fk[:, None] * ve[None, :]
            z = z + fk
            tl.store(mptr, mem, mask=smask)
            tl.store(zptr, z, mask=dmask)
        kn = tl.load(K + b * skb + hk * skh + offs_d, mask=dmask, other=0.0).to(tl.float32)
        vn = tl.load(V + b * svb + hk * svh + offs_v, mask=vmask, other=0.0).to(tl.float32)
        n_all = n_sinks + ring_count
        for g in range(GRP):
            h = hk * GRP + g
            q = tl.load(Q + b * sqb + h * sqh + offs_d, mask=dmask, other=0.0).to(tl.float32)
            m_i = tl.sum(q * kn, axis=0) * scale  # the new token's own key starts the softmax
            l_i = m_i * 0.0 + 1.0
            acc = vn
            for j0 in range(0, n_all, BN):
                j = j0 + offs_n
                kk = _load_keys(sk, rk, j, n_sinks, n_all, ring_start, RING_CAP, offs_d, dmask, D)
                s = tl.where(j < n_all, tl.sum(kk * q[None, :], axis=1) * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new)
                vv = _load_keys(sv, rv, j, n_sinks, n_all, ring_start, RING_CAP, offs_v, vmask, DV)
                acc = acc * alpha + tl.sum(p[:, None] * vv, axis=0)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                m_i = m_new
            fq = tl.where(dmask, _phi(q), 0.0)
            num = tl.sum(fq[:, None] * mem, axis=0)
            den = tl.sum(fq * z, axis=0)
            lin = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
            w = 1.0 / (1.0 + tl.exp(-tl.load(GATE + h).to(tl.float32)))
            tl.store(O + (b * HQ + h) * DV + offs_v, w * (acc / l_i) + (1.0 - w) * lin, mask=vmask)


def triton_window_linear_step(q, k, v, state, slots, *, gate, scale: float):
    """q `(B, Hq, 1, D)`, k/v `(B, Hkv, 1, *)` in the storage's dtype; `state` a `WindowLinearState`
    updated in place at `slots`. Returns `(B, Hq, 1, Dv)` in q's dtype."""
    b, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    o = torch.empty(b, hq, 1, dv, dtype=torch.float32, device=q.device)
    if b * hkv:
        q, k, v = (x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        g = gate.detach().to(torch.float32).contiguous()
        window_linear_step_kernel[(b * hkv,)](
            q, k, v, state.sink_k, state.sink_v, state.ring_k, state.ring_v, state.M, state.z, g, o, float(scale),
            hq, hkv, d, dv, state.sink_k.shape[2], max(state.ring_capacity, 1), slots.n_sinks, slots.ring_start,
            slots.ring_count, max(slots.evict_slot, 0), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), GRP=hq // hkv, EVICT=slots.evict_slot >= 0,
            BD=max(16, triton.next_power_of_2(d)), BV=max(16, triton.next_power_of_2(dv)), BN=32)
    if slots.new_slot >= 0:
        state.ring_k[:, :, slots.new_slot] = k[:, :, 0]
        state.ring_v[:, :, slots.new_slot] = v[:, :, 0]
    else:
        state.sink_k[:, :, slots.new_sink] = k[:, :, 0]
        state.sink_v[:, :, slots.new_sink] = v[:, :, 0]
    return o.to(q.dtype)


class TritonWindowLinearStep(TritonKernelMixin, Kernel):
    """`triton_window_linear_step`: one program per (batch, kv head), `M` slice in registers."""

    name = "triton.window_linear_step"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (WindowLinear,)
    head_dims = (1, 256)

    def import_error(self):
        return _IMPORT_ERROR

    def cost(self, p):
        if p.device.type == "cpu":  # the interpreter: correct but very slow; only when asked for
            return 1000.0 + 1e-6 * p.sk * p.batch * p.q_heads
        eff = 0.5 * min(1.0, p.batch * p.kv_heads / max(p.device.units, 1))
        return window_step_bytes(p) / (p.device.bandwidth_gbs * 1e9 * max(eff, 0.02)) + 3 * 8e-6

    def run(self, q, k, v, p, *, gate=None, state=None, slots=None):
        return triton_window_linear_step(q, k, v, state, slots, gate=gate, scale=p.scale)


register(TritonWindowLinearStep(), op="window_linear_step")
