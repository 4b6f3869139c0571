"""Linear attention with decay in plain PyTorch, chunked (the reference path).

Recurrence (contract): `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`.
Chunked form over a chunk starting at `c0`, with `b_t = sum_{u=c0..t} g_u` (inclusive, in log
space, relative to the chunk start so it never grows without bound):

    o_t    = scale * ( exp(b_t) q_t^T S_prev + sum_{s<=t} exp(b_t - b_s) (q_t . k_s) v_s )
    S_next = exp(b_last) S_prev + sum_s exp(b_last - b_s) k_s v_s^T

Every exponent is `<= 0` for decays `g <= 0`; the upper triangle is masked to `-inf` BEFORE the
exp, so no `exp` of a large positive number appears. The state is float32 (float64 inputs: float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .softmax import acc_dtype

DEFAULT_CHUNK = 64


def log_decay(decay, b: int, h: int, s: int, device, dtype) -> torch.Tensor | None:
    """Normalise `decay` (None, `(H,)` or `(B, H, S)`) to `(B, H, S)` log-decays, or None."""
    if decay is None:
        return None
    if decay.dim() == 1:
        return decay.to(dtype)[None, :, None].expand(b, h, s)
    return decay.to(dtype)


def linear_attention_chunked(q, k, v, *, decay=None, scale: float, initial_state=None, chunk: int = DEFAULT_CHUNK):
    """q/k `(B, H, S, D)`, v `(B, H, S, Dv)` (k/v already expanded to H heads); returns
    `(o (B, H, S, Dv) in q.dtype, final state (B, H, D, Dv) in the accumulation dtype)`."""
    b, h, s, d = q.shape
    dv = v.shape[-1]
    acc = acc_dtype(q.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    g = log_decay(decay, b, h, s, q.device, acc)
    state = (initial_state.to(acc) if initial_state is not None
             else torch.zeros(b, h, d, dv, dtype=acc, device=q.device))
    outs = []
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    strict = causal.tril(-1)
    for c0 in range(0, s, chunk):
        c1 = min(s, c0 + chunk)
        n = c1 - c0
        qc, kc, vc = qa[:, :, c0:c1], ka[:, :, c0:c1], va[:, :, c0:c1]
        tri = causal[:n, :n]
        scores = torch.matmul(qc, kc.transpose(-1, -2))  # (B, H, n, n)
        if g is None:
            intra = torch.matmul(scores.masked_fill(~tri, 0.0), vc)
            inter = torch.matmul(qc, state)
            state = state + torch.matmul(kc.transpose(-1, -2), vc)
        else:
            bcum = torch.cumsum(g[:, :, c0:c1], dim=-1)  # (B, H, n), non-increasing for g <= 0
            # The diagonal (weight exp(0) = 1) and the chunk's last key in the state update carry
            # no decay; keeping them out of the exp(differences) keeps O(1) terms that cancel
            # exactly in theory out of d(decay), where float32 would leave eps-sized residue
            # against a gradient as small as exp(g).
            diff = (bcum[..., :, None] - bcum[..., None, :]).masked_fill(~strict[:n, :n], float("-inf"))
            intra = torch.matmul(scores * torch.exp(diff), vc) + torch.diagonal(scores, dim1=-2, dim2=-1)[..., None] * vc
            inter = torch.exp(bcum)[..., None] * torch.matmul(qc, state)
            gc = g[:, :, c0 + 1:c1]  # decay from key s to the chunk's end: sum of g over (s, last]
            to_end = F.pad(torch.flip(torch.cumsum(torch.flip(gc, [-1]), -1), [-1]), (0, 1))
            state = torch.exp(bcum[..., -1:])[..., None] * state \
                + torch.matmul((kc * torch.exp(to_end)[..., None]).transpose(-1, -2), vc)
        outs.append((intra + inter) * scale)
    o = torch.cat(outs, dim=2) if outs else va.new_zeros(b, h, 0, dv)
    return o.to(q.dtype), state
