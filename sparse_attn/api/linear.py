"""The public linear-attention op: `linear_attention` (contract, "Linear attention")."""
from __future__ import annotations

import torch

from ..patterns.linear import LinearAttention
from ..scheduler.device import device_info
from ..scheduler.plan import choose
from ..scheduler.problem import FLOAT_DTYPES, Problem, check_backend, check_qkv, check_scale


def _check_linear(q, k, v, decay, initial_state):
    check_qkv(q, k, v)
    b, h, s, d = q.shape
    if k.shape[2] != s:
        raise ValueError(f"linear_attention needs q and k of the same length, got q={s}, k={k.shape[2]}")
    kind = "none"
    if decay is not None:
        if not isinstance(decay, torch.Tensor):
            raise TypeError(f"decay must be a torch.Tensor or None, got {type(decay).__name__}")
        if not decay.is_floating_point():
            raise TypeError(f"decay must be a floating-point tensor, got {decay.dtype}")
        if decay.shape == (h,):
            kind = "per-head"
        elif decay.shape == (b, h, s):
            kind = "per-token"
        else:
            raise ValueError(f"decay must have shape (H,) = ({h},) or (B, H, S) = ({b}, {h}, {s}), "
                             f"got {tuple(decay.shape)}")
        if decay.device != q.device:
            raise ValueError(f"decay is on {decay.device} but q is on {q.device}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}")
        want = (b, h, d, v.shape[3])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape (B, H, D, Dv) = {want}, got {tuple(initial_state.shape)}")
        if initial_state.dtype not in FLOAT_DTYPES:
            raise TypeError(f"initial_state must be a floating-point tensor, got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return kind


def linear_attention(q, k, v, *, decay=None, scale=None, initial_state=None, return_state=False, backend=None):
    """Causal linear attention with optional decay (contract, "Linear attention").

    `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale * q_t^T S_t`, identity feature map.

    Args:
        q: `(B, H, S, D)`; k: `(B, Hkv, S, D)`; v: `(B, Hkv, S, Dv)` (GQA: k/v heads are shared).
        decay: None, per-head log-decays `(H,)`, or per-token log-decays `(B, H, S)`.
        scale: default `D ** -0.5`.
        initial_state: `(B, H, D, Dv)` state to continue from (e.g. a previous chunk's).
        return_state: also return the final state `(B, H, D, Dv)` (float32; float64 for float64 inputs).
    Returns:
        o `(B, H, S, Dv)` in q's dtype, or `(o, state)`.
    """
    check_backend(backend)
    kind = _check_linear(q, k, v, decay, initial_state)
    b, h, s, d = q.shape
    sc = check_scale(scale, d)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, decay, initial_state))
    problem = Problem(batch=b, q_heads=h, kv_heads=k.shape[1], sq=s, sk=s, head_dim=d, v_head_dim=v.shape[3],
                      dtype=q.dtype, device=device_info(q.device), pattern=LinearAttention(kind), scale=sc,
                      requires_grad=grad)
    p = choose(problem, backend=backend, op="linear_attention")
    g = h // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    o, state = p.kernel.run(q, k, v, problem, decay=decay, initial_state=initial_state)
    return (o, state) if return_state else o
