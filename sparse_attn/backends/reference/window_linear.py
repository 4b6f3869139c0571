"""WindowLinear in plain PyTorch: sliding-window softmax plus a linear memory of evicted keys.

`o = sigmoid(gate) * A + (1 - sigmoid(gate)) * L` (contract). `L` is computed with a running
`(M, z)` state over the evicted keys, chunk by chunk of queries, so its cost is linear in the
length: before a chunk of queries at positions [a, b) the state holds the keys
`sinks <= j <= a - window`; inside the chunk the keys `a - window < j <= b - 1 - window` enter
under a shifted causal mask (`j <= p - window`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns import WindowLinear
from .softmax import acc_dtype, softmax_attention

_LINEAR_CHUNK = 128


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def evicted_linear(q, k, v, *, window: int, sinks: int) -> torch.Tensor:
    """`L` of the contract for q `(B, Hq, Sq, D)`, k/v `(B, Hkv, Sk, *)`; `(B, Hq, Sq, Dv)` in acc dtype."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv if hkv else 1
    acc = acc_dtype(q.dtype)
    fq = phi(q.to(acc)).view(b, hkv, g, sq, d)
    fk, va = phi(k.to(acc)), v.to(acc)
    off = sk - sq
    # state: keys [sinks, e) with e = max(sinks, a - window + 1) for the first chunk's start a
    e = max(sinks, off - window + 1)
    m = torch.matmul(fk[:, :, sinks:e].transpose(-1, -2), va[:, :, sinks:e])  # (B, Hkv, D, Dv)
    z = fk[:, :, sinks:e].sum(dim=2)  # (B, Hkv, D)
    outs = []
    for r0 in range(0, sq, _LINEAR_CHUNK):
        r1 = min(sq, r0 + _LINEAR_CHUNK)
        a, bnd = off + r0, off + r1
        qc = fq[:, :, :, r0:r1]  # (B, Hkv, G, r, D)
        num = torch.matmul(qc, m[:, :, None])
        den = torch.matmul(qc, z[:, :, None, :, None]).squeeze(-1)
        e_new = max(e, bnd - window)  # keys j <= bnd - 1 - window
        if e_new > e:
            kpos = torch.arange(e, e_new, device=q.device)
            qpos = torch.arange(a, bnd, device=q.device)
            vis = (kpos[None, :] <= qpos[:, None] - window).to(acc)  # (r, n)
            w = torch.matmul(qc, fk[:, :, None, e:e_new].transpose(-1, -2)) * vis
            num = num + torch.matmul(w, va[:, :, None, e:e_new])
            den = den + w.sum(dim=-1)
            m = m + torch.matmul(fk[:, :, e:e_new].transpose(-1, -2), va[:, :, e:e_new])
            z = z + fk[:, :, e:e_new].sum(dim=2)
            e = e_new
        den = den[..., None]
        safe = torch.where(den > 0, den, torch.ones_like(den))
        outs.append(torch.where(den > 0, num / safe, torch.zeros_like(num)))
    out = torch.cat(outs, dim=3) if outs else fq.new_zeros(b, hkv, g, 0, dv)
    return out.reshape(b, hq, sq, dv)


def window_linear_attention(q, k, v, pattern: WindowLinear, *, scale: float, gate: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(q.dtype)
    a = softmax_attention(q, k, v, pattern.softmax_part, scale=scale, out_dtype=acc)
    lin = evicted_linear(q, k, v, window=pattern.window, sinks=min(pattern.sinks, k.shape[2]))
    w = torch.sigmoid(gate.to(acc))[None, :, None, None]
    return (w * a + (1.0 - w) * lin).to(q.dtype)
