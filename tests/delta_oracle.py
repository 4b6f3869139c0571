"""The float64 oracle of the delta rule (contract, "Delta-rule linear attention"), evaluated literally.

One token at a time, per value head, with the state `S` of shape `(D, Dv)`:

    S'  = diag(exp(g_t)) S_{t-1}                 (a scalar g_t scales every row)
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T
    o_t = scale S_t^T q_t

Value head `h` reads q/k head `h // (Hv // Hk)`. `qk_l2norm` first divides each `q_t`, `k_t` by
`||x|| + 1e-6`. Everything is upcast to float64 differentiably, so `torch.autograd` on the result is
the float64 gradient of every input (slow: keep gradient checks small). Imports nothing from
`sparse_attn`, like tests/oracle.py.
"""
from __future__ import annotations

import torch

F64 = torch.float64
L2_EPS = 1e-6

#: the contract's bounds for the delta rule (relative error against this oracle); float64 is ours
DELTA_BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + L2_EPS)


def oracle_delta_rule(q, k, v, beta, *, decay=None, scale=None, initial_state=None, qk_l2norm=False):
    """q, k `(B, Hk, S, D)`, v `(B, Hv, S, Dv)`, beta `(B, Hv, S)`, decay None | `(B, Hv, S)` |
    `(B, Hv, S, D)` log-decays, initial_state `(B, Hv, D, Dv)`.
    Returns `(o (B, Hv, S, Dv), S_final (B, Hv, D, Dv))` in float64."""
    q, k, v, beta = (x.to(F64) for x in (q, k, v, beta))
    b, hk, s, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    grp = hv // hk
    scale = d ** -0.5 if scale is None else scale
    if qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = q.repeat_interleave(grp, dim=1), k.repeat_interleave(grp, dim=1)  # readable, not fast
    st = (torch.zeros(b, hv, d, dv, dtype=F64, device=q.device) if initial_state is None
          else initial_state.to(F64))
    g = None if decay is None else decay.to(F64)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: the pool's sync costs more than it gives
    try:
        outs = []
        for t in range(s):
            if g is not None:
                gt = g[:, :, t]
                st = st * (torch.exp(gt)[..., None, None] if gt.dim() == 2 else torch.exp(gt)[..., None])
            kt = k[:, :, t]
            pred = (kt[..., None, :] @ st)[..., 0, :]                       # S'^T k_t, (B, Hv, Dv)
            u = beta[:, :, t, None] * (v[:, :, t] - pred)
            st = st + kt[..., :, None] * u[..., None, :]
            outs.append(scale * (q[:, :, t, None, :] @ st)[..., 0, :])
    finally:
        torch.set_num_threads(n)
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(b, hv, 0, dv)
    return o, st


def delta_bound(dtype: torch.dtype) -> float:
    return DELTA_BOUNDS[dtype]
