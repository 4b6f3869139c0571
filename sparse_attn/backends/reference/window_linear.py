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


class WindowLinearDecoder:
    """Constant-memory decode state of one `WindowLinear` layer: the sinks' keys, the last `window`
    keys at most and the `(M, z)` memory of the evicted ones. `step(q, k, v)` appends one token and
    `extend(q, k, v)` any number; both return the matching rows of the prefill
    `attention(..., WindowLinear, gate=)`.

    Invariant: the buffers hold the sinks `[0, min(sinks, length))` and the tokens
    `[length - n_win, length)`; `memory` sums the tokens in between (none until the sinks are full).
    Every held tensor owns its storage (no view of a prefill's K/V), so `tensors()` is what it pins.
    """

    def __init__(self, pattern: WindowLinear, *, gate, scale: float | None = None):
        self.pattern, self.gate, self.scale = pattern, gate, scale
        self.length = 0
        self.sink_k = self.sink_v = self.win_k = self.win_v = None
        self.memory = None

    @classmethod
    def from_prefill(cls, k, v, pattern: WindowLinear, *, gate, scale: float | None = None):
        """Start after a prefill of `k`/`v` `(B, Hkv, S, *)`: keeps only the sinks, the last
        `window - 1` keys (the next token completes the window) and the memory of the rest."""
        dec = cls(pattern, gate=gate, scale=scale)
        dec._reset(k, v)
        return dec

    def _reset(self, k, v):
        """Replace the state by the one after the whole history `k`/`v` `(B, Hkv, S, *)`."""
        s = k.shape[2]
        ns = min(self.pattern.sinks, s)
        keep = max(ns, s - (self.pattern.window - 1))  # tokens [keep, s) stay in the window buffer
        # clone: a slice would pin the whole prefill K/V
        self.sink_k, self.sink_v = k[:, :, :ns].clone(), v[:, :, :ns].clone()
        self.win_k, self.win_v = k[:, :, keep:].clone(), v[:, :, keep:].clone()
        acc = acc_dtype(k.dtype)
        fk, va = phi(k[:, :, ns:keep].to(acc)), v[:, :, ns:keep].to(acc)
        self.memory = (torch.matmul(fk.transpose(-1, -2), va), fk.sum(dim=2))
        self.length = s

    def cached_tokens(self) -> int:
        return sum(x.shape[2] for x in (self.sink_k, self.win_k) if x is not None)

    def tensors(self) -> list:
        """Every tensor the decoder holds (keys, values, `M`, `z`)."""
        held = [self.sink_k, self.sink_v, self.win_k, self.win_v, *(self.memory or ())]
        return [t for t in held if t is not None]

    def step(self, q, k, v):
        """q `(B, Hq, 1, D)`, k/v `(B, Hkv, 1, *)` of the next token -> `(B, Hq, 1, Dv)`."""
        p = self.length
        if self.sink_k is None:
            b, hkv = k.shape[:2]
            self.sink_k = self.win_k = k.new_empty(b, hkv, 0, k.shape[3])
            self.sink_v = self.win_v = v.new_empty(b, hkv, 0, v.shape[3])
        evict_k = evict_v = None
        if p < self.pattern.sinks:
            self.sink_k, self.sink_v = torch.cat([self.sink_k, k], 2), torch.cat([self.sink_v, v], 2)
        else:
            over = self.win_k.shape[2] + 1 - self.pattern.window  # tokens at positions <= p - window
            wk, wv = self.win_k, self.win_v
            if over > 0:
                evict_k, evict_v = wk[:, :, :over], wv[:, :, :over]
                wk, wv = wk[:, :, over:], wv[:, :, over:]
            self.win_k, self.win_v = torch.cat([wk, k], 2), torch.cat([wv, v], 2)  # fresh storage
        o, self.memory = window_linear_decode(
            q, torch.cat([self.sink_k, self.win_k], 2), torch.cat([self.sink_v, self.win_v], 2), self.memory,
            gate=self.gate, scale=self.scale, evict_k=evict_k, evict_v=evict_v)
        self.length = p + 1
        return o

    def extend(self, q, k, v):
        """q `(B, Hq, S, D)`, k/v `(B, Hkv, S, *)` of the next `S` tokens (any `S`) -> `(B, Hq, S, Dv)`.

        `S == 1` is `step`. Before any token is evicted the buffers are the whole history, so the
        prefill formula runs on them. After, the tokens go in pieces of at most `_LINEAR_CHUNK`:
        the softmax part attends over `sinks + buffer + piece` (the sliding-window rule is relative
        to the end, and with the sinks full the kept keys keep their distances to the queries,
        so it sees exactly the prefill's keys), and the linear part reads the memory plus the
        buffer keys that leave the window inside the piece, under the mask `j <= p - window`.
        """
        s = q.shape[2]
        if s == 1:
            return self.step(q, k, v)
        if s == 0:
            return q.new_zeros(*q.shape[:3], v.shape[3])
        if self.sink_k is None or self.cached_tokens() == self.length:
            if self.sink_k is not None:
                k = torch.cat([self.sink_k, self.win_k, k], 2)
                v = torch.cat([self.sink_v, self.win_v, v], 2)
            scale = q.shape[3] ** -0.5 if self.scale is None else self.scale
            o = window_linear_attention(q, k, v, self.pattern, scale=scale, gate=self.gate)
            self._reset(k, v)
            return o
        outs = [self._extend_evicting(q[:, :, r0:r0 + _LINEAR_CHUNK], k[:, :, r0:r0 + _LINEAR_CHUNK],
                                      v[:, :, r0:r0 + _LINEAR_CHUNK]) for r0 in range(0, s, _LINEAR_CHUNK)]
        return torch.cat(outs, dim=2)

    def _extend_evicting(self, q, k, v):
        """`extend` for a piece of `r` tokens once tokens have been evicted (so the sinks are full)."""
        b, hq, r, d = q.shape
        hkv, dv = k.shape[1], v.shape[3]
        g = hq // hkv
        window, p0 = self.pattern.window, self.length
        acc = acc_dtype(q.dtype)
        scale = d ** -0.5 if self.scale is None else self.scale
        a = softmax_attention(q, torch.cat([self.sink_k, self.win_k, k], 2), torch.cat([self.sink_v, self.win_v, v], 2),
                              self.pattern.softmax_part, scale=scale, out_dtype=acc).view(b, hkv, g, r, dv)
        bk, bv = torch.cat([self.win_k, k], 2), torch.cat([self.win_v, v], 2)  # positions [f, p0 + r)
        f = p0 - self.win_k.shape[2]
        n_ev = max(0, p0 + r - window - f)  # buffer keys j <= p0 + r - 1 - window leave in this piece
        m, z = self.memory
        fq = phi(q.to(acc)).view(b, hkv, g, r, d)
        num = torch.matmul(fq, m[:, :, None])
        den = torch.matmul(fq, z[:, :, None, :, None])  # (B, Hkv, G, r, 1)
        if n_ev:
            fk, ve = phi(bk[:, :, :n_ev].to(acc)), bv[:, :, :n_ev].to(acc)
            qpos = torch.arange(p0, p0 + r, device=q.device)
            kpos = torch.arange(f, f + n_ev, device=q.device)
            vis = kpos[None, :] <= qpos[:, None] - window  # (r, n_ev)
            w = torch.matmul(fq, fk[:, :, None].transpose(-1, -2)).masked_fill(~vis, 0.0)
            num = num + torch.matmul(w, ve[:, :, None])
            den = den + w.sum(dim=-1, keepdim=True)
            self.memory = (m + torch.matmul(fk.transpose(-1, -2), ve), z + fk.sum(dim=2))
        lin = _ratio(num, den)
        w = torch.sigmoid(self.gate.to(acc)).view(1, hkv, g, 1, 1)
        self.win_k, self.win_v = bk[:, :, n_ev:].clone(), bv[:, :, n_ev:].clone()
        self.length = p0 + r
        return (w * a + (1.0 - w) * lin).reshape(b, hq, r, dv).to(q.dtype)
