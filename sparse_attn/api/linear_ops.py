"""`linear_attention` as torch custom ops, so `torch.compile(fullgraph=True)` traces it.

* ``sparse_attn::linear_attention_fwd(q, k, v, decay, initial_state, scale, backend) -> (o, state)``
* ``sparse_attn::linear_attention_bwd(q, k, v, decay, initial_state, do, dstate, scale, backend)
  -> (dq, dk, dv, ddecay, dinitial_state)``

As for `attention` (ops.py): dynamo traces only the validation (`_check_linear`, shapes and dtypes),
and the scheduler runs inside the op on the real tensors, so a compiled call picks the kernel an
eager call picks. The backward recomputes the forward under autograd and differentiates it (the
linear kernels are autograd functions; their states are checkpointed per chunk). Absent optional
gradients come back as empty `(0,)` tensors (custom ops cannot return None). Eager calls do not
use these ops. Packed varlen calls (`cu_seqlens`) are not traced: they read offsets on the host.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import _autograd_enabled, _fresh


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eager(q, k, v, decay, initial_state, scale, backend):
    from .linear import _problem, _run_kernel
    from ..scheduler.plan import choose

    problem = _problem(q, k, v, decay, initial_state, scale, None)
    kern = choose(problem, backend=backend or None, op="linear_attention").kernel
    return _run_kernel(kern, q, k, v, problem, decay, initial_state)


@torch.library.custom_op("sparse_attn::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor],
                         scale: float, backend: str) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        o, state = _eager(q, k, v, decay, initial_state, scale, backend)
    return _fresh(o.to(q.dtype), q, k, v), _fresh(state.to(_state_dtype(q.dtype)), initial_state)


@linear_attention_fwd.register_fake
def _fwd_fake(q, k, v, decay, initial_state, scale, backend):
    b, h, s, d = q.shape
    return q.new_empty((b, h, s, v.shape[3])), q.new_empty((b, h, d, v.shape[3]), dtype=_state_dtype(q.dtype))


@torch.library.custom_op("sparse_attn::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], initial_state: Optional[Tensor],
                         do: Tensor, dstate: Tensor, scale: float,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _autograd_enabled():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        extra = [x.detach().requires_grad_() if x is not None else None for x in (decay, initial_state)]
        o, state = _eager(*inputs, extra[0], extra[1], scale, backend)
        wrt = inputs + [x for x in extra if x is not None]
        grads = torch.autograd.grad((o, state), wrt, (do, dstate), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
    dq, dk, dv = grads[:3]
    rest = iter(grads[3:])
    ddecay = next(rest) if decay is not None else q.new_empty((0,))
    dinit = next(rest) if initial_state is not None else q.new_empty((0,))
    ins = (q, k, v, decay, initial_state, do, dstate)
    return tuple(_fresh(g, *ins) for g in (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ddecay, dinit))


@linear_attention_bwd.register_fake
def _bwd_fake(q, k, v, decay, initial_state, do, dstate, scale, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((0,)) if decay is None else decay.new_empty(decay.shape),
            q.new_empty((0,)) if initial_state is None else initial_state.new_empty(initial_state.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, decay, initial_state, scale, backend = inputs
    ctx.save_for_backward(q, k, v, decay, initial_state)
    ctx.args = (scale, backend)


def _backward(ctx, do, dstate):
    q, k, v, decay, initial_state = ctx.saved_tensors
    if dstate is None:
        dstate = torch.zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3], dtype=_state_dtype(q.dtype),
                             device=q.device)
    if do is None:
        do = torch.zeros(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
    dq, dk, dv, ddecay, dinit = linear_attention_bwd(q, k, v, decay, initial_state, do.contiguous(),
                                                     dstate.contiguous(), *ctx.args)
    return (dq, dk, dv, ddecay if decay is not None else None, dinit if initial_state is not None else None,
            None, None)


linear_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_attention_op(q, k, v, *, decay=None, scale=None, initial_state=None, return_state=False, backend=None):
    """`linear_attention` through the custom ops (what a compiled call runs); no `cu_seqlens`."""
    from ..scheduler.problem import check_backend, check_scale
    from .linear import _check_linear

    check_backend(backend)
    _check_linear(q, k, v, decay, initial_state)
    sc = check_scale(scale, q.shape[3])
    o, state = linear_attention_fwd(q, k, v, decay, initial_state, sc, backend or "")
    return (o, state) if return_state else o
