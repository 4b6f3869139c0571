"""`delta_rule` as torch custom ops, so `torch.compile(fullgraph=True)` traces it.

* ``sparse_attn::delta_rule_fwd(q, k, v, beta, decay, initial_state, scale, qk_l2norm, backend) -> (o, state)``
* ``sparse_attn::delta_rule_bwd(q, k, v, beta, decay, initial_state, do, dstate, scale, qk_l2norm, backend)
  -> (dq, dk, dv, dbeta, ddecay, dinitial_state)``

As for `linear_attention` (linear_ops.py): dynamo traces only the validation, the scheduler runs
inside the op on the real tensors (a compiled call picks the kernel an eager call picks), and the
backward recomputes the forward under autograd and differentiates it. Absent optional gradients
come back as empty `(0,)` tensors (custom ops cannot return None). Eager calls do not use these ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .delta import state_dtype
from .ops import _autograd_enabled, _fresh


def _eager(q, k, v, beta, decay, initial_state, scale, qk_l2norm, backend):
    from ..scheduler.plan import choose
    from .delta import OP, delta_problem

    problem = delta_problem(q, k, v, beta, decay, initial_state, scale, qk_l2norm)
    kern = choose(problem, backend=backend or None, op=OP).kernel
    return kern.run(q, k, v, problem, beta=beta, decay=decay, initial_state=initial_state)


@torch.library.custom_op("sparse_attn::delta_rule_fwd", mutates_args=())
def delta_rule_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, decay: Optional[Tensor],
                   initial_state: Optional[Tensor], scale: float, qk_l2norm: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        o, state = _eager(q, k, v, beta, decay, initial_state, scale, qk_l2norm, backend)
    return _fresh(o.to(v.dtype), q, k, v), _fresh(state.to(state_dtype(q.dtype)), initial_state)


@delta_rule_fwd.register_fake
def _fwd_fake(q, k, v, beta, decay, initial_state, scale, qk_l2norm, backend):
    b, hv, s, dv = v.shape
    return v.new_empty((b, hv, s, dv)), v.new_empty((b, hv, q.shape[3], dv), dtype=state_dtype(q.dtype))


@torch.library.custom_op("sparse_attn::delta_rule_bwd", mutates_args=())
def delta_rule_bwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, decay: Optional[Tensor],
                   initial_state: Optional[Tensor], do: Tensor, dstate: Tensor, scale: float, qk_l2norm: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _autograd_enabled():
        inputs = [x.detach().requires_grad_() for x in (q, k, v, beta)]
        extra = [x.detach().requires_grad_() if x is not None else None for x in (decay, initial_state)]
        o, state = _eager(*inputs, extra[0], extra[1], scale, qk_l2norm, backend)
        wrt = inputs + [x for x in extra if x is not None]
        grads = torch.autograd.grad((o, state), wrt, (do, dstate), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
    rest = iter(grads[4:])
    ddecay = next(rest).to(decay.dtype) if decay is not None else q.new_empty((0,))
    dinit = next(rest).to(initial_state.dtype) if initial_state is not None else q.new_empty((0,))
    ins = (q, k, v, beta, decay, initial_state, do, dstate)
    first = [g.to(x.dtype) for g, x in zip(grads[:4], (q, k, v, beta))]
    return tuple(_fresh(g, *ins) for g in first + [ddecay, dinit])


@delta_rule_bwd.register_fake
def _bwd_fake(q, k, v, beta, decay, initial_state, do, dstate, scale, qk_l2norm, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), beta.new_empty(beta.shape),
            q.new_empty((0,)) if decay is None else decay.new_empty(decay.shape),
            q.new_empty((0,)) if initial_state is None else initial_state.new_empty(initial_state.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, beta, decay, initial_state, scale, qk_l2norm, backend = inputs
    ctx.save_for_backward(q, k, v, beta, decay, initial_state)
    ctx.args = (scale, qk_l2norm, backend)


def _backward(ctx, do, dstate):
    q, k, v, beta, decay, initial_state = ctx.saved_tensors
    b, hv, s, dv = v.shape
    if dstate is None:
        dstate = torch.zeros(b, hv, q.shape[3], dv, dtype=state_dtype(q.dtype), device=q.device)
    if do is None:
        do = torch.zeros(b, hv, s, dv, dtype=v.dtype, device=v.device)
    dq, dk, dv_, dbeta, ddecay, dinit = delta_rule_bwd(q, k, v, beta, decay, initial_state, do.contiguous(),
                                                       dstate.contiguous(), *ctx.args)
    return (dq, dk, dv_, dbeta, ddecay if decay is not None else None,
            dinit if initial_state is not None else None, None, None, None)


delta_rule_fwd.register_autograd(_backward, setup_context=_setup_context)


def delta_rule_op(q, k, v, beta, *, decay=None, scale=None, initial_state=None, return_state=False,
                  qk_l2norm=False, backend=None):
    """`delta_rule` through the custom ops (what a compiled call runs)."""
    from ..scheduler.problem import check_backend, check_scale
    from .delta import check_delta

    check_backend(backend)
    check_delta(q, k, v, beta, decay, initial_state)
    if not isinstance(qk_l2norm, bool):
        raise TypeError(f"qk_l2norm must be a bool, got {type(qk_l2norm).__name__}")
    sc = check_scale(scale, q.shape[3])
    o, state = delta_rule_fwd(q, k, v, beta, decay, initial_state, sc, qk_l2norm, backend or "")
    return (o, state) if return_state else o
