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
from .softmax import acc_dtype, nonfinite_to_nan, softmax_attention

_LINEAR_CHUNK = 128


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """`num / den`, 0 where `den == 0` (no evicted key: phi > 0 makes `den` positive otherwise). A NaN
    `den` (a NaN key in the memory) gives NaN: the memory is never silently dropped (contract)."""
    empty = den == 0
    return torch.where(empty, torch.zeros_like(num), num / torch.where(empty, torch.ones_like(den), den))


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
            vis = kpos[None, :] <= qpos[:, None] - window  # (r, n)
            # masked_fill, not a product with the mask: an infinite / NaN key must not reach (as
            # inf * 0 = NaN) the rows that do not see it yet
            w = torch.matmul(qc, fk[:, :, None, e:e_new].transpose(-1, -2)).masked_fill(~vis, 0.0)
            num = num + torch.matmul(w, va[:, :, None, e:e_new])
            den = den + w.sum(dim=-1)
            m = m + torch.matmul(fk[:, :, e:e_new].transpose(-1, -2), va[:, :, e:e_new])
            z = z + fk[:, :, e:e_new].sum(dim=2)
            e = e_new
        outs.append(_ratio(num, den[..., None]))
    out = torch.cat(outs, dim=3) if outs else fq.new_zeros(b, hkv, g, 0, dv)
    return out.reshape(b, hq, sq, dv)


def window_linear_attention(q, k, v, pattern: WindowLinear, *, scale: float, gate: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(q.dtype)
    a = softmax_attention(q, k, v, pattern.softmax_part, scale=scale, out_dtype=acc)
    lin = evicted_linear(q, k, v, window=pattern.window, sinks=min(pattern.sinks, k.shape[2]))
    w = torch.sigmoid(gate.to(acc))[None, :, None, None]
    return (w * a + (1.0 - w) * lin).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# constant-memory decode
# ----------------------------------------------------------------------------------------------
def window_linear_decode(q, k_seen, v_seen, memory, *, gate, scale: float | None = None, evict_k=None,
                         evict_v=None):
    """One decode step of `WindowLinear` from the window's keys and the `(M, z)` memory alone.

    Args:
        q: `(B, Hq, 1, D)`, the new token's query.
        k_seen, v_seen: `(B, Hkv, n, D)` / `(B, Hkv, n, Dv)`: the keys the softmax part sees for this
            token (the sinks and the last `window` tokens, this token included; any order).
        memory: `(M (B, Hkv, D, Dv), z (B, Hkv, D))` over the keys evicted BEFORE this step
            (float32; float64 for float64 inputs), or None for an empty memory.
        gate: `(Hq,)` gate logits; scale: default `D ** -0.5`.
        evict_k, evict_v: `(B, Hkv, e, *)` keys that leave the window at this step (added to the
            memory before the linear part is read), or None.
    Returns:
        `(o (B, Hq, 1, Dv) in q's dtype, (M, z) updated)`. Cost and memory do not grow with the
        context: O((sinks + window) * D + D * Dv) per head.
    """
    b, hq, sq, d = q.shape
    hkv, dv = k_seen.shape[1], v_seen.shape[3]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    scale = d ** -0.5 if scale is None else scale
    if memory is None:
        m = torch.zeros(b, hkv, d, dv, dtype=acc, device=q.device)
        z = torch.zeros(b, hkv, d, dtype=acc, device=q.device)
    else:
        m, z = memory
    if evict_k is not None and evict_k.shape[2]:
        fk = phi(evict_k.to(acc))
        m = m + torch.matmul(fk.transpose(-1, -2), evict_v.to(acc))
        z = z + fk.sum(dim=2)
    qa = q.to(acc).view(b, hkv, g, sq, d)
    s = nonfinite_to_nan(torch.matmul(qa, k_seen.to(acc)[:, :, None].transpose(-1, -2)) * scale)  # (B, Hkv, G, 1, n)
    a = torch.matmul(torch.softmax(s, dim=-1), v_seen.to(acc)[:, :, None])
    fq = phi(qa)
    num = torch.matmul(fq, m[:, :, None])
    den = torch.matmul(fq, z[:, :, None, :, None])  # (B, Hkv, G, 1, 1)
    lin = _ratio(num, den)
    w = torch.sigmoid(gate.to(acc)).view(1, hkv, g, 1, 1)
    o = (w * a + (1.0 - w) * lin).reshape(b, hq, sq, dv)
    return o.to(q.dtype), (m, z)


def __getattr__(name):
    # `WindowLinearDecoder` moved to sparse_attn/api/window_linear.py (fixed-size storage in
    # sparse_attn/cache/window_linear.py, steps planned by the scheduler); the old import keeps working.
    # Lazy: that module imports this one.
    if name == "WindowLinearDecoder":
        from ...api.window_linear import WindowLinearDecoder
        return WindowLinearDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
