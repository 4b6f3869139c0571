"""The delta rule in plain PyTorch: the chunked WY / UT-transform form (prefill, training) and the
step-by-step form (decode). Any torch device; autograd through PyTorch's own ops.

Recurrence (contract, per value head, state `S` `(D, Dv)`): `S' = diag(exp(g_t)) S_{t-1}`,
`S_t = S' + beta_t k_t (v_t - S'^T k_t)^T`, `o_t = scale S_t^T q_t`.

Chunked form. In a chunk entering with state `S_0`, with `b_t` the log-decays summed from the chunk
start to `t` (inclusive; a vector over the key channels for KDA, relative to the chunk start so they
never grow without bound), write every state of the chunk as
`S_t = diag(exp(b_t)) S_0 + sum_{s<=t} diag(exp(b_t - b_s)) k_s u_s^T`. The "new values" `u_s`
then satisfy, from the update rule,

    u_t + beta_t sum_{s<t} A_ts u_s = beta_t (v_t - (exp(b_t) * k_t)^T S_0),
    A_ts = sum_d k_t[d] exp(b_t[d] - b_s[d]) k_s[d]      (s < t)

a unit lower-triangular system (the UT transform): `U = W_v - W S_0` with
`[W_v, W] = (I + diag(beta) A)^{-1} diag(beta) [V, exp(b) * K]`, solved once per chunk for every
chunk at once. Across chunks only three products per chunk remain sequential:

    U      = W_v - W S_0
    O      = scale (exp(b) * Q) S_0 + scale P U,   P_ts = q_t . (exp(b_t - b_s) * k_s)  (s <= t)
    S_next = diag(exp(b_last)) S_0 + (exp(b_last - b) * K)^T U

Every exponent is a difference `b_t - b_s` with `s <= t` (or a sum of decays up to the chunk end,
summed directly), so it is `<= 0` for decays `<= 0`: no `exp` of a large positive number. Decays
are summed in float64; a decay below -1000 (e.g. -inf, a full reset) is clamped there, where
`exp` is exactly 0 in float32 and float64 alike. Per-channel decays enter the `C x C` products
inside the sum over `d`: the reference forms them exactly, `(C, C, D)` per chunk (chunks of 16
tokens, in groups bounded in memory). The state is float32 (float64 for float64 inputs).

Value heads `Hv = G * Hk` read their q/k head through a broadcast `(B, Hk, 1, ...)` axis: q and k
are never repeated in memory (the decayed keys of a gated problem are per value head by nature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns.delta import DeltaRule
from ..recurrence import RecurrenceKernel
from .softmax import acc_dtype

DEFAULT_CHUNK = 64
PER_CHANNEL_CHUNK = 16
L2_EPS = 1e-6
G_FLOOR = -1000.0
#: largest `(chunks, C, C, D)` temporary of a per-channel group (elements per value head)
_PER_CHANNEL_GROUP = 1 << 21


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """The contract's `qk_l2norm`: `x / (||x|| + 1e-6)` over the last dim."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + L2_EPS)


def _by_kv_head(x, hk):
    """(B, Hv, ...) -> (B, Hk, G, ...): value head h is group member h % G of q/k head h // G."""
    return x.reshape(x.shape[0], hk, x.shape[1] // hk, *x.shape[2:])


def _prepare(q, k, v, beta, decay, initial_state, qk_l2norm):
    acc = acc_dtype(q.dtype)
    b, hk, s, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    qa, ka = q.to(acc), k.to(acc)
    if qk_l2norm:
        qa, ka = l2norm(qa), l2norm(ka)
    st = (initial_state.to(acc) if initial_state is not None
          else torch.zeros(b, hv, d, dv, dtype=acc, device=q.device))
    g = None if decay is None else _by_kv_head(decay.to(torch.float64).clamp(min=G_FLOOR), hk)
    return (qa[:, :, None], ka[:, :, None], _by_kv_head(v.to(acc), hk), _by_kv_head(beta.to(acc), hk), g,
            _by_kv_head(st, hk), acc)


def _chunk_terms(qc, kc, vc, bc, gc, acc):
    """Everything of a group of whole chunks that does not depend on the entering state.

    qc, kc `(B, Hk, 1, n, C, D)`; vc `(B, Hk, G, n, C, Dv)`; bc `(B, Hk, G, n, C)`; gc float64
    `(B, Hk, G, n, C[, D])` or None. Returns `(wv, w, qd, p, kend, cdec)`: the solve's right-hand
    sides solved (`W_v`, `W`), the decayed queries, the scaled-free intra-chunk P, the keys decayed
    to the chunk end and the whole chunk's decay (None without decay)."""
    c = qc.shape[-2]
    lower = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()
    if gc is None:
        kk = torch.matmul(kc, kc.transpose(-1, -2))
        p = torch.matmul(qc, kc.transpose(-1, -2)).masked_fill(~lower, 0.0)
        kdec, qd, kend, cdec = kc, qc, kc, None
    else:
        bcum = torch.cumsum(gc, dim=4)  # along the chunk's tokens
        # decay from token s to the chunk end: the sum over [s, last] less g_s (float64)
        to_end = torch.flip(torch.cumsum(torch.flip(gc, [4]), 4), [4]) - gc
        cdec = torch.exp(bcum.select(4, -1)).to(acc)
        if gc.dim() == 5:  # one decay per token and head
            diff = (bcum[..., :, None] - bcum[..., None, :]).masked_fill(~lower, float("-inf")).exp().to(acc)
            kk = torch.matmul(kc, kc.transpose(-1, -2)) * diff
            p = torch.matmul(qc, kc.transpose(-1, -2)) * diff
            ed, ee = torch.exp(bcum).to(acc)[..., None], torch.exp(to_end).to(acc)[..., None]
        else:  # one per key channel: the decays weight the sum over d, formed exactly
            diff = (bcum[..., :, None, :] - bcum[..., None, :, :]).masked_fill(~lower[..., None], float("-inf"))
            diff = diff.exp().to(acc)  # (B, Hk, G, n, C, C, D)
            kk = torch.einsum("...td,...sd,...tsd->...ts", kc, kc, diff)
            p = torch.einsum("...td,...sd,...tsd->...ts", qc, kc, diff)
            ed, ee = torch.exp(bcum).to(acc), torch.exp(to_end).to(acc)
        kdec, qd, kend = kc * ed, qc * ed, kc * ee
    a = kk * bc[..., None]  # row t scaled by beta_t; solve_triangular reads the strict lower part
    lead, dv = a.shape[:-1], vc.shape[-1]  # (B, Hk, G, n, C)
    rhs = torch.cat([vc.expand(*lead, dv), kdec.expand(*lead, kc.shape[-1])], dim=-1) * bc[..., None]
    x = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
    return x[..., :dv], x[..., dv:], qd, p, kend, cdec


def _scan(terms, st, scale):
    """The sequential part over the chunks of one group; returns (outputs `(..., n, C, Dv)`, state)."""
    wv, w, qd, p, kend, cdec = terms
    outs = []
    for i in range(wv.shape[3]):
        u = wv[:, :, :, i] - torch.matmul(w[:, :, :, i], st)
        o = torch.matmul(qd[:, :, :, i], st) + torch.matmul(p[:, :, :, i], u)
        outs.append(o * scale)
        if cdec is None:
            st = st + torch.matmul(kend[:, :, :, i].transpose(-1, -2), u)
        else:
            dec = cdec[:, :, :, i]
            dec = dec[..., None, None] if dec.dim() == 3 else dec[..., None]
            st = dec * st + torch.matmul(kend[:, :, :, i].transpose(-1, -2), u)
    return torch.stack(outs, dim=3), st


def delta_rule_chunked(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False,
                       chunk: int | None = None):
    """q, k `(B, Hk, S, D)`; v `(B, Hv, S, Dv)`; beta `(B, Hv, S)`; decay None, `(B, Hv, S)` or
    `(B, Hv, S, D)`; initial_state `(B, Hv, D, Dv)`. Returns `(o (B, Hv, S, Dv) in v.dtype, final
    state (B, Hv, D, Dv) float32 / float64)`. The sequence is padded to whole chunks with tokens of
    `beta = 0` and `g = 0`, which change neither the outputs before them nor the state."""
    b, hk, s, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    qa, ka, va, ba, g, st, acc = _prepare(q, k, v, beta, decay, initial_state, qk_l2norm)
    if s == 0 or b == 0 or hv == 0:
        return v.new_zeros(b, hv, s, dv), st.reshape(b, hv, d, dv)
    per_channel = decay is not None and decay.dim() == 4
    c = chunk or (PER_CHANNEL_CHUNK if per_channel else DEFAULT_CHUNK)
    c = max(1, min(c, s))
    pad = -s % c
    if pad:
        qa, ka, va = (F.pad(x, (0, 0, 0, pad)) for x in (qa, ka, va))
        ba = F.pad(ba, (0, pad))
        if g is not None:
            g = F.pad(g, (0, 0, 0, pad)) if per_channel else F.pad(g, (0, pad))
    n = (s + pad) // c

    def chunks(x):  # (..., S', X) -> (..., n, C, X)
        return x.reshape(*x.shape[:3], n, c, x.shape[-1])

    qc, kc, vc = chunks(qa), chunks(ka), chunks(va)
    bc = ba.reshape(*ba.shape[:3], n, c)
    gc = None if g is None else (chunks(g) if per_channel else g.reshape(*g.shape[:3], n, c))
    # whole-group precomputation is cheap except the per-channel (C, C, D) weights: bound those
    m = n if not per_channel else max(1, _PER_CHANNEL_GROUP // (b * hv * c * c * d))
    outs = []
    for i0 in range(0, n, m):
        sl = slice(i0, min(n, i0 + m))
        terms = _chunk_terms(qc[:, :, :, sl], kc[:, :, :, sl], vc[:, :, :, sl], bc[:, :, :, sl],
                             None if gc is None else gc[:, :, :, sl], acc)
        o, st = _scan(terms, st, scale)
        outs.append(o)
    o = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    o = o.reshape(b, hv, n * c, dv)[:, :, :s]
    return o.to(v.dtype), st.reshape(b, hv, d, dv)


def delta_rule_recurrent(q, k, v, beta, *, decay=None, scale: float, initial_state=None, qk_l2norm=False):
    """The recurrence itself, one token at a time (decode: 1 to a few tokens). Same arguments and
    results as `delta_rule_chunked`; O(S D Dv), reads and writes the state once per token."""
    b, hk, s, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    qa, ka, va, ba, g, st, acc = _prepare(q, k, v, beta, decay, initial_state, qk_l2norm)
    outs = []
    for t in range(s):
        if g is not None:
            e = torch.exp(g[:, :, :, t]).to(acc)
            st = st * (e[..., None, None] if e.dim() == 3 else e[..., None])
        kt = ka[:, :, :, t]  # (B, Hk, 1, D)
        pred = torch.matmul(kt[..., None, :], st)[..., 0, :]  # S'^T k_t, (B, Hk, G, Dv)
        u = ba[:, :, :, t, None] * (va[:, :, :, t] - pred)
        st = st + kt[..., :, None] * u[..., None, :]
        outs.append(torch.matmul(qa[:, :, :, t, None, :], st)[..., 0, :] * scale)
    o = torch.stack(outs, dim=3).reshape(b, hv, s, dv) if outs else va.new_zeros(b, hv, 0, dv)
    return o.to(v.dtype), st.reshape(b, hv, d, dv)


class ReferenceDeltaChunked(RecurrenceKernel):
    """`delta_rule_chunked`: every decay kind, any device, autograd through PyTorch."""

    name = "reference.delta_chunked"
    backend = "reference"
    patterns = (DeltaRule,)
    supports_backward = True
    form = "chunked"
    efficiency = 0.25
    overhead_s = 300e-6  # ~30 ops of setup
    per_step_overhead_s = 6 * 15e-6  # the scan's ~6 small ops per chunk

    def chunk_for(self, p):
        return PER_CHANNEL_CHUNK if p.pattern.decay == "per-channel" else DEFAULT_CHUNK

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return delta_rule_chunked(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
                                  qk_l2norm=p.pattern.qk_l2norm)


class ReferenceDeltaRecurrent(RecurrenceKernel):
    """`delta_rule_recurrent`: decode (one token, or a few). ~6 ops per token and none of the
    chunked form's setup, so it wins for a token or a few; the cost model decides."""

    name = "reference.delta_recurrent"
    backend = "reference"
    patterns = (DeltaRule,)
    supports_backward = True
    form = "recurrent"
    max_tokens = 16
    efficiency = 0.25
    overhead_s = 60e-6
    per_step_overhead_s = 6 * 15e-6

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        return delta_rule_recurrent(q, k, v, beta, decay=decay, scale=p.scale, initial_state=initial_state,
                                    qk_l2norm=p.pattern.qk_l2norm)
