"""Fused `WindowLinear` forward in Triton: the window softmax and the linear memory in one pass.

One program per (batch * query head, 64-column Dv tile) walks the queries in tiles of `C`:
- softmax part: an online softmax over the sink keys left of the window and the key tiles of the
  window `[p_lo - window + 1, p_hi]` (mask `j <= p` and `p - j < window or j < sinks`);
- linear part: `(M, z)` in float32 registers hold the evicted keys `sinks <= j <= p_lo - window`;
  the `C` keys `p_lo - window < j <= p_lo + C - window` that leave the window inside the tile enter
  under the shifted causal mask `j <= p - window` and are then added to `(M, z)`.
Memory is constant in the context length. Forward only (training uses the reference kernel).
"""
from __future__ import annotations

import torch

from ...patterns import WindowLinear
from ...scheduler.kernel import Kernel, roofline_seconds
from ...scheduler.registry import register
from .runtime import TritonKernelMixin

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - no Triton
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


if triton is not None:
    @triton.jit
    def _phi(x):
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))

    @triton.jit
    def _softmax_tile(q, K, V, j0, pos, rmask, offs_c, offs_d, dmask, offs_v, vmask, m_i, l_i, acc,
                      scale, SK, D, DV, WINDOW, SINKS, LIMIT, PREC: tl.constexpr):
        kj = j0 + offs_c
        kmask = (kj < SK) & (kj < LIMIT)
        k = tl.load(K + kj[:, None] * D + offs_d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + kj[:, None] * DV + offs_v[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PREC) * scale
        vis = (kj[None, :] <= pos[:, None]) & ((pos[:, None] - kj[None, :] < WINDOW) | (kj[None, :] < SINKS))
        vis = vis & kmask[None, :] & rmask[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def window_linear_fwd_kernel(Q, K, V, GATE, O, scale, SQ, SK, D, DV, HQ, G, WINDOW, SINKS,
                                 C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0)
        iv = tl.program_id(1)
        b = pid // HQ
        hq = pid % HQ
        hkv_all = HQ // G
        kvh = b * hkv_all + hq // G
        offs_c = tl.arange(0, C)
        offs_d = tl.arange(0, BD)
        offs_v = iv * BV + tl.arange(0, BV)
        dmask = offs_d < D
        vmask = offs_v < DV
        Kb = K + kvh * SK * D
        Vb = V + kvh * SK * DV
        off = SK - SQ
        gl = tl.load(GATE + hq).to(tl.float32)
        gw = 1.0 / (1.0 + tl.exp(-gl))
        mem = tl.zeros([BD, BV], dtype=tl.float32)
        z = tl.zeros([BD], dtype=tl.float32)
        e0 = tl.maximum(SINKS, off - WINDOW + 1)  # keys [SINKS, e0) are evicted before the first query
        for j0 in range(SINKS, e0, C):
            kj = j0 + offs_c
            km = kj < e0
            k = tl.load(Kb + kj[:, None] * D + offs_d[None, :], mask=km[:, None] & dmask[None, :], other=0.0)
            v = tl.load(Vb + kj[:, None] * DV + offs_v[None, :], mask=km[:, None] & vmask[None, :], other=0.0)
            fk = tl.where(km[:, None] & dmask[None, :], _phi(k.to(tl.float32)), 0.0)
            mem += tl.dot(tl.trans(fk), v.to(tl.float32), input_precision=PREC)
            z += tl.sum(fk, axis=0)
        for t0 in range(0, SQ, C):
            rows = t0 + offs_c
            rmask = rows < SQ
            pos = off + rows
            q = tl.load(Q + pid * SQ * D + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            p_lo = off + t0
            p_hi = tl.minimum(off + t0 + C, SK) - 1
            lo = tl.maximum(0, p_lo - WINDOW + 1)
            m_i = tl.full([C], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([C], dtype=tl.float32)
            acc = tl.zeros([C, BV], dtype=tl.float32)
            sink_end = tl.minimum(SINKS, lo)
            for j0 in range(0, sink_end, C):  # sinks left of the window
                m_i, l_i, acc = _softmax_tile(q, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask, offs_v, vmask,
                                              m_i, l_i, acc, scale, SK, D, DV, WINDOW, SINKS, sink_end, PREC)
            for j0 in range(lo, p_hi + 1, C):  # the window
                m_i, l_i, acc = _softmax_tile(q, Kb, Vb, j0, pos, rmask, offs_c, offs_d, dmask, offs_v, vmask,
                                              m_i, l_i, acc, scale, SK, D, DV, WINDOW, SINKS, SK, PREC)
            a = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            # linear memory: the stored (M, z), then the keys that leave the window inside this tile
            fq = tl.where(dmask[None, :], _phi(q), 0.0)
            num = tl.dot(fq, mem, input_precision=PREC)
            den = tl.sum(fq * z[None, :], axis=1)
            kj = p_lo - WINDOW + 1 + offs_c
            kv = (kj >= SINKS) & (kj >= 0) & (kj < SK)
            k = tl.load(Kb + kj[:, None] * D + offs_d[None, :], mask=kv[:, None] & dmask[None, :], other=0.0)
            v = tl.load(Vb + kj[:, None] * DV + offs_v[None, :], mask=kv[:, None] & vmask[None, :],
                        other=0.0).to(tl.float32)
            fk = tl.where(kv[:, None] & dmask[None, :], _phi(k.to(tl.float32)), 0.0)
            wmask = (kj[None, :] <= pos[:, None] - WINDOW) & kv[None, :]
            w = tl.where(wmask, tl.dot(fq, tl.trans(fk), input_precision=PREC), 0.0)
            num += tl.dot(w, v, input_precision=PREC)
            den += tl.sum(w, axis=1)
            mem += tl.dot(tl.trans(fk), v, input_precision=PREC)
            z += tl.sum(fk, axis=0)
            lin = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
            o = gw * a + (1.0 - gw) * lin
            tl.store(O + pid * SQ * DV + rows[:, None] * DV + offs_v[None, :], o.to(O.dtype.element_ty),
                     mask=rmask[:, None] & vmask[None, :])


def triton_window_linear(q, k, v, pattern: WindowLinear, *, scale: float, gate: torch.Tensor) -> torch.Tensor:
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    bd = max(16, triton.next_power_of_2(d))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    c = 32 if q.device.type != "cuda" or bd > 64 else 64
    prec = "tf32" if q.dtype == torch.bfloat16 else "ieee"
    window_linear_fwd_kernel[(b * hq, triton.cdiv(dv, bv))](
        q.contiguous(), k.contiguous(), v.contiguous(), gate.contiguous(), out, float(scale), sq, sk, d, dv, hq,
        hq // hkv, pattern.window, pattern.sinks, C=c, BD=bd, BV=bv, PREC=prec)
    return out


class TritonWindowLinear(TritonKernelMixin, Kernel):
    """WindowLinear forward fused in one Triton kernel (window softmax + linear memory)."""

    name = "triton.window_linear"
    backend = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (WindowLinear,)
    head_dims = (1, 128)
    supports_backward = False

    def import_error(self):
        return _IMPORT_ERROR

    def extra_reasons(self, p):
        return ["varlen inputs not supported"] if p.varlen else []

    def cost(self, p):
        if p.device.type == "cpu":  # the interpreter: only when backend="triton" is asked for
            return 1000.0 + 1e-6 * p.sq * p.batch * p.q_heads
        pat = p.pattern
        pairs = p.batch * p.q_heads * p.sq * (pat.window + pat.sinks + 32)
        flops = 2.0 * (p.head_dim + p.v_head_dim) * pairs + 4.0 * p.head_dim * p.v_head_dim * p.batch * p.q_heads * (
            p.sq + p.sk)
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * (p.q_heads * p.sq * (p.head_dim + p.v_head_dim)
                                   + p.q_heads * p.sk * (p.head_dim + p.v_head_dim))
        programs = p.batch * p.q_heads * -(-p.v_head_dim // 64)
        eff = max(0.01, 0.3 * min(1.0, programs / max(p.device.units, 1)))
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=eff, overhead_s=15e-6)

    def run(self, q, k, v, p, *, gate=None):
        return triton_window_linear(q, k, v, p.pattern, scale=p.scale, gate=gate)


register(TritonWindowLinear())
