"""Linear attention with decay in plain PyTorch: the chunked form (prefill, training) and the
recurrent form (decode).

Recurrence (contract): `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`.
Chunked form over a chunk starting at `c0`, with `b_t = sum_{u=c0..t} g_u` (inclusive, in log
space, relative to the chunk start so it never grows without bound):

    o_t    = scale * ( exp(b_t) q_t^T S_prev + sum_{s<=t} exp(b_t - b_s) (q_t . k_s) v_s )
    S_next = exp(b_last) S_prev + sum_s exp(b_last - b_s) k_s v_s^T

Every exponent is `<= 0` for decays `g <= 0`; the upper triangle is masked to `-inf` BEFORE the
exp, so no `exp` of a large positive number appears. The state is float32 (float64 inputs: float64).

Shape of the computation (why it is fast on a CPU): the sequence is cut into `n` chunks of `C`
tokens and viewed as `(B, H, n, C, D)`, so every intra-chunk product (`q k^T`, `(.) v`, the
chunk's state contribution `k^T v` and `q S_prev`) is ONE batched matrix product over all chunks
at once; the only sequential part is the scan of `n` small `(D, Dv)` states across chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel, roofline_seconds
from .softmax import acc_dtype

DEFAULT_CHUNK = 64


def log_decay(decay, b: int, h: int, s: int, device, dtype) -> torch.Tensor | None:
    """Normalise `decay` (None, `(H,)` or `(B, H, S)`) to `(B, H, S)` log-decays, or None."""
    if decay is None:
        return None
    if decay.dim() == 1:
        return decay.to(dtype)[None, :, None].expand(b, h, s)
    return decay.to(dtype)


#: elements of the largest temporary of one group of chunks (scores `C x C` or states `D x Dv` per
#: chunk and head): ~2 MB in float32, so a group's temporaries stay near the cache and come from the
#: allocator's free lists, not fresh pages (first touch ran at ~0.5 GB/s on the shared build machine;
#: 1 << 19 beat 1 << 20 and 1 << 21 by 1.2x-1.4x in /work/notes/linear_bench.py, 1 thread)
_GROUP_ELEMS = 1 << 19


def _scan(chunk_decay, updates, s0):
    """States entering each chunk of a group, `P_0 = s0`, `P_{i+1} = exp(a_i) P_i + U_i`, as ONE
    matrix product instead of `m` sequential steps (the steps are memory-bound passes over the
    `(D, Dv)` states; the product costs `m` times their FLOPs at the matrix rate, `m` ~ 8):

        P_i = exp(A_{i-1}) s0 + sum_{j<i} exp(A_{i-1} - A_j) U_j,   A = cumsum(a), A_{-1} = 0

    `chunk_decay` `(B, H, m)` log-decay of each whole chunk (or None), `updates` `(B, H, m, D, Dv)`.
    Returns (P `(B, H, m, D, Dv)`, final state `P_m`)."""
    b, h, m, d, dv = updates.shape
    flat = updates.reshape(b, h, m, d * dv)
    s0f = s0.reshape(b, h, 1, d * dv)
    if chunk_decay is None:
        w = torch.ones(m, m, dtype=flat.dtype, device=flat.device).tril(-1)  # row i: chunks j < i
        entering = torch.matmul(w, flat).add_(s0f)
        final = s0 + updates.sum(dim=2)
    else:
        cum = torch.cumsum(chunk_decay, dim=-1)  # A_i, (B, H, m)
        prev = F.pad(cum[..., :-1], (1, 0))  # A_{i-1}
        lower = torch.ones(m, m, dtype=torch.bool, device=flat.device).tril(-1)
        diff = (prev[..., :, None] - cum[..., None, :]).masked_fill_(~lower, float("-inf"))
        entering = torch.addcmul(torch.matmul(diff.exp_(), flat), torch.exp(prev)[..., None], s0f)
        last = torch.exp(cum[..., -1:] - cum)  # (B, H, m): chunk j's update decayed to the group end
        final = torch.addcmul(torch.matmul(last[..., None, :], flat), torch.exp(cum[..., -1:])[..., None], s0f)
        final = final.reshape(b, h, d, dv)
    return entering.reshape(b, h, m, d, dv), final


def _group(qc, kc, vc, gc, s0, scale):
    """One group of `m` whole chunks: q/k `(B, H, m, C, D)`, v `(B, H, m, C, Dv)`, log-decays `gc`
    `(B, H, m, C)` or None (or `(1, H, 1, C)` for a per-head decay: the decay weights are then the
    same for every chunk and are computed once), entering state `s0`. Returns (scaled output
    `(B, H, m, C, Dv)`, state)."""
    c = qc.shape[3]
    scores = torch.matmul(qc, kc.transpose(-1, -2))  # (B, H, m, C, C): all chunks in one product
    if gc is None:
        intra = torch.matmul(scores.tril_(), vc)  # (in place: matmul's backward needs its inputs only)
        entering, final = _scan(None, torch.matmul(kc.transpose(-1, -2), vc), s0)
        out = torch.matmul(qc, entering).add_(intra)
    else:
        bcum = torch.cumsum(gc, dim=-1)  # relative to each chunk's start; non-increasing for g <= 0
        strict = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril(-1)
        # The diagonal (weight exp(0) = 1) and the chunk's last key in the state update carry no
        # decay; keeping them out of exp(differences) keeps O(1) terms that cancel exactly in
        # theory out of d(decay), where float32 would leave eps-sized residue against a gradient
        # as small as exp(g).
        diff = (bcum[..., :, None] - bcum[..., None, :]).masked_fill_(~strict, float("-inf"))
        intra = torch.matmul(scores * diff.exp_(), vc)
        intra = torch.addcmul(intra, torch.diagonal(scores, dim1=-2, dim2=-1)[..., None], vc)
        # decay from key j to its chunk's end: the sum of g over (j, last], summed directly (not a
        # difference of two cumulative sums) so it is exact for the keys near the end
        to_end = F.pad(torch.flip(torch.cumsum(torch.flip(gc[..., 1:], [-1]), -1), [-1]), (0, 1))
        updates = torch.matmul((kc * torch.exp(to_end)[..., None]).transpose(-1, -2), vc)
        entering, final = _scan(bcum[..., -1].expand(qc.shape[:3]), updates, s0)
        out = torch.addcmul(intra, torch.exp(bcum)[..., None], torch.matmul(qc, entering))
    return out.mul_(scale), final


def linear_attention_chunked(q, k, v, *, decay=None, scale: float, initial_state=None, chunk: int = DEFAULT_CHUNK):
    """q/k `(B, H, S, D)`, v `(B, H, S, Dv)` (k/v already expanded to H heads); returns
    `(o (B, H, S, Dv) in q.dtype, final state (B, H, D, Dv) in the accumulation dtype)`.

    Whole chunks are processed in groups of `m` chunks (views of the inputs, no padding copy); a
    last partial chunk is one more group with a shorter chunk."""
    b, h, s, d = q.shape
    dv = v.shape[-1]
    acc = acc_dtype(q.dtype)
    st = (initial_state.to(acc) if initial_state is not None
          else torch.zeros(b, h, d, dv, dtype=acc, device=q.device))
    if s == 0 or b == 0 or h == 0:
        return q.new_zeros(b, h, s, dv), st
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    per_head = decay is not None and decay.dim() == 1
    g = None if per_head else log_decay(decay, b, h, s, q.device, acc)
    c = max(1, min(chunk, s))
    m = max(1, _GROUP_ELEMS // (b * h * max(c * c, d * dv, c * max(d, dv))))
    full = s - s % c
    outs = []
    r0 = 0
    while r0 < s:
        r1 = min(full, r0 + m * c) if r0 < full else s
        cc = c if r0 < full else r1 - r0
        n = (r1 - r0) // cc

        def view(x):
            return x[:, :, r0:r1].reshape(b, h, n, cc, x.shape[-1])

        if per_head:
            gc = decay.to(acc)[None, :, None, None].expand(1, h, 1, cc)
        else:
            gc = None if g is None else g[:, :, r0:r1].reshape(b, h, n, cc)
        o, st = _group(view(qa), view(ka), view(va), gc, st, scale)
        outs.append(o.reshape(b, h, r1 - r0, dv))
        r0 = r1
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return o.to(q.dtype), st


def linear_attention_recurrent(q, k, v, *, decay=None, scale: float, initial_state=None):
    """The recurrence itself, one token at a time (decode: `S` of 1 to a few tokens).

    Same arguments and results as `linear_attention_chunked`; O(S * D * Dv), no `S x S` term."""
    b, h, s, d = q.shape
    dv = v.shape[-1]
    acc = acc_dtype(q.dtype)
    st = (initial_state.to(acc) if initial_state is not None
          else torch.zeros(b, h, d, dv, dtype=acc, device=q.device))
    g = log_decay(decay, b, h, s, q.device, acc)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    outs = []
    for t in range(s):
        upd = ka[:, :, t, :, None] * va[:, :, t, None, :]
        st = upd + st if g is None else torch.addcmul(upd, torch.exp(g[:, :, t])[..., None, None], st)
        outs.append(torch.matmul(qa[:, :, t, None, :], st)[:, :, 0] * scale)
    o = torch.stack(outs, dim=2) if outs else qa.new_zeros(b, h, 0, dv)
    return o.to(q.dtype), st


# ----------------------------------------------------------------------------------------------
# cost models and the recurrent (decode) kernel
# ----------------------------------------------------------------------------------------------
_OP_OVERHEAD_S = 15e-6  # one small PyTorch op on the host (dispatch, allocation)
#: with gradients, every op also records an autograd node and runs its backward: a one-token
#: forward + backward of the recurrent kernel measured 270 us (B = 1, H = 3, D = 16, one Zen 4
#: core, 2026-11-23) where its forward ops alone are modelled at 90 us
_BACKWARD_OP_FACTOR = 3.0


def _op_overhead(p, ops: float) -> float:
    return ops * _OP_OVERHEAD_S * (_BACKWARD_OP_FACTOR if p.requires_grad else 1.0)


def linear_chunked_cost(p, chunk: int) -> float:
    """Roofline of `linear_attention_chunked`: the batched products (`q k^T`, `(.) v` over a chunk,
    `k^T v` and `q S_prev`), plus ~20 fixed ops and one op per chunk in the scan when decaying."""
    c = max(1, min(chunk, max(p.sq, 1)))
    n = -(-max(p.sq, 1) // c)
    tokens = n * c * p.batch * p.q_heads
    flops = 2.0 * tokens * (c * (p.head_dim + p.v_head_dim) + 2 * p.head_dim * p.v_head_dim)
    elem = 4 if p.dtype != torch.float64 else 8
    nbytes = elem * tokens * (c + 2 * p.head_dim + 2 * p.v_head_dim)
    scan_ops = n if p.pattern.decay != "none" else 2
    return roofline_seconds(p, flops=flops * (3.5 if p.requires_grad else 1.0), bytes_moved=nbytes,
                            efficiency=0.5, overhead_s=_op_overhead(p, 20 + scan_ops),
                            compute_dtype=acc_dtype(p.dtype))


class ReferenceLinearRecurrent(Kernel):
    """The recurrence token by token: the decode path (one token, or a few: speculative decode).

    Reads and writes the `(B, H, D, Dv)` state once per token, with ~4 ops per token and none of the
    chunked form's fixed setup, so it wins for `S` of 1 to a few tokens; the cost model decides."""

    name = "reference.linear_recurrent"
    backend = "reference"
    patterns = (LinearAttention,)
    supports_backward = True
    max_tokens = 16

    def extra_reasons(self, p):
        if p.sq > self.max_tokens:
            return [f"S={p.sq} > {self.max_tokens}: steps token by token (decode); "
                    "the chunked kernel serves long inputs"]
        return []

    def cost(self, p):
        s = max(p.sq, 1)
        flops = 4.0 * p.batch * p.q_heads * s * p.head_dim * p.v_head_dim
        nbytes = 4.0 * 2 * p.batch * p.q_heads * p.head_dim * p.v_head_dim * s  # the state, read + written
        return roofline_seconds(p, flops=flops * (3.5 if p.requires_grad else 1.0), bytes_moved=nbytes,
                                efficiency=0.5, overhead_s=_op_overhead(p, 2 + 4 * s),
                                compute_dtype=acc_dtype(p.dtype))

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None):
        return linear_attention_recurrent(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state)

