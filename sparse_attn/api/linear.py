"""The public linear-attention op: `linear_attention` (contract, "Linear attention")."""
from __future__ import annotations

import torch

from ..patterns.linear import LinearAttention
from ..scheduler.device import device_info
from ..scheduler.plan import Plan, choose
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


class LinearPlan(Plan):
    """A `Plan` for `linear_attention`: `.run` takes the decay and state arguments too."""

    def run(self, q, k, v, *, decay=None, initial_state=None, return_state=False, gate=None):
        if gate is not None:
            raise ValueError("gate is not an argument of linear_attention")
        check = _problem(q, k, v, decay, initial_state, self.problem.scale, self.problem.requires_grad)
        if check.pattern != self.problem.pattern:
            raise ValueError(f"decay is {check.pattern.describe()} but this plan was made for "
                             f"{self.problem.pattern.describe()}; make a new plan")
        self.problem.check_inputs(q, k, v)
        o, state = _run_kernel(self.kernel, q, k, v, self.problem, decay, initial_state)
        return (o, state) if return_state else o


def _problem(q, k, v, decay, initial_state, scale, requires_grad):
    kind = _check_linear(q, k, v, decay, initial_state)
    b, h, s, d = q.shape
    sc = check_scale(scale, d)
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, decay, initial_state))
    return Problem(batch=b, q_heads=h, kv_heads=k.shape[1], sq=s, sk=s, head_dim=d, v_head_dim=v.shape[3],
                   dtype=q.dtype, device=device_info(q.device), pattern=LinearAttention(kind), scale=sc,
                   requires_grad=bool(requires_grad), torch_device=q.device)


#: log-decays at or below these are a full reset (`exp(g)` < 1e-10 of float32 / 1e-86 of float64
#: accumulation): `-inf` (a zero gate) would make the chunked forms' `exp(G_t - G_s)` NaN
#: (`-inf - -inf`). Kept small so the in-chunk cumulative sums after a reset keep their precision.
_RESET_LOG_DECAY = {torch.float64: -200.0}
_RESET_LOG_DECAY_DEFAULT = -24.0


def reset_floor(decay, dtype):
    """`decay` with every `-inf` log-decay replaced by the reset floor (contract: a log-decay of `-inf`
    is a full reset, never NaN); finite decays, and their gradients, are untouched. None stays None."""
    if decay is None:
        return None
    floor = _RESET_LOG_DECAY.get(dtype, _RESET_LOG_DECAY_DEFAULT)
    return torch.where(torch.isneginf(decay), torch.full_like(decay, floor), decay)


def _run_kernel(kernel, q, k, v, problem, decay, initial_state, state_out=None):
    decay = reset_floor(decay, q.dtype)
    if problem.q_heads == 0:  # zero heads: empty output and state (no kernel is written for H = 0)
        b, _, s, d = q.shape
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(b, 0, s, v.shape[3]), q.new_zeros(b, 0, d, v.shape[3], dtype=sdt)
    g = problem.group
    if g > 1 and not getattr(kernel, "native_gqa", False):  # kernels that read shared kv heads in place say so
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if state_out is None:
        return kernel.run(q, k, v, problem, decay=decay, initial_state=initial_state)
    if getattr(kernel, "writes_state_out", False):  # the step kernels write the new state where asked
        return kernel.run(q, k, v, problem, decay=decay, initial_state=initial_state, state_out=state_out)
    o, state = kernel.run(q, k, v, problem, decay=decay, initial_state=initial_state)
    return o, state_out.copy_(state)


def plan_linear(q, k, v, *, decay=None, scale=None, initial_state=None, backend=None,
                requires_grad=None) -> LinearPlan:
    """The scheduler's decision for `linear_attention(q, k, v, ...)`, without running it.

    Same arguments as `linear_attention` (no `cu_seqlens`: plan one sequence). `.explain()` lists
    every linear-attention kernel with its estimated cost or its reasons not to run;
    `.run(q, k, v, decay=..., initial_state=..., return_state=...)` runs the chosen one.
    """
    check_backend(backend)
    problem = _problem(q, k, v, decay, initial_state, scale, requires_grad)
    p = choose(problem, backend=backend, op="linear_attention")
    return LinearPlan(problem=p.problem, candidates=p.candidates, kernel=p.kernel, backend_request=backend)


def _check_cu_seqlens(cu, q, initial_state):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of nseq + 1 offsets, got {cu.dtype} "
                         f"{tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu.device} but q is on {q.device}")
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q/k/v hold the packed sequences as batch 1: (1, H, T, D); "
                         f"got q of shape {tuple(q.shape)}")
    offs = cu.tolist()  # the one host read of the varlen path (as attention_varlen)
    total = q.shape[2]
    if offs[0] != 0 or offs[-1] != total or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at the packed length {total}, "
                         f"got {offs}")
    nseq = len(offs) - 1
    if initial_state is not None and isinstance(initial_state, torch.Tensor) and initial_state.dim() == 4 \
            and initial_state.shape[0] != nseq:
        raise ValueError(f"with cu_seqlens, initial_state must have shape (nseq, H, D, Dv) with nseq = {nseq}, "
                         f"got {tuple(initial_state.shape)}")
    return offs


def _linear_varlen(q, k, v, cu_seqlens, *, decay, scale, initial_state, return_state, backend):
    offs = _check_cu_seqlens(cu_seqlens, q, initial_state)
    nseq = len(offs) - 1
    # validate the packed call once, as one sequence of the full length (shapes, dtypes, decay)
    _check_linear(q, k, v, decay, None)
    h, d, dv = q.shape[1], q.shape[3], v.shape[3]
    if initial_state is not None:
        _check_linear(q[:, :, :0].expand(nseq, -1, -1, -1), k[:, :, :0].expand(nseq, -1, -1, -1),
                      v[:, :, :0].expand(nseq, -1, -1, -1), None, initial_state)
    outs, states = [], []
    for i in range(nseq):
        a, z = offs[i], offs[i + 1]
        dec = decay if decay is None or decay.dim() == 1 else decay[:, :, a:z]
        s0 = None if initial_state is None else initial_state[i:i + 1]
        o, st = linear_attention(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], decay=dec, scale=scale,
                                 initial_state=s0, return_state=True, backend=backend)
        outs.append(o)
        states.append(st)
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(1, h, 0, dv)
    if not return_state:
        return o
    sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    st = torch.cat(states, dim=0) if states else q.new_zeros(0, h, d, dv, dtype=sdt)
    return o, st


def linear_attention(q, k, v, *, decay=None, scale=None, initial_state=None, return_state=False,
                     cu_seqlens=None, backend=None):
    """Causal linear attention with optional decay (contract, "Linear attention").

    `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale * q_t^T S_t`, identity feature map.

    Args:
        q: `(B, H, S, D)`; k: `(B, Hkv, S, D)`; v: `(B, Hkv, S, Dv)` (GQA: k/v heads are shared).
        decay: None, per-head log-decays `(H,)`, or per-token log-decays `(B, H, S)`.
        scale: default `D ** -0.5`.
        initial_state: `(B, H, D, Dv)` state to continue from (e.g. a previous chunk's).
        return_state: also return the final state `(B, H, D, Dv)` (float32; float64 for float64 inputs).
        cu_seqlens: packed sequences (FLA-style varlen): q/k/v are `(1, H, T, D)` holding the
            sequences back to back, `cu_seqlens` the int32 offsets `(nseq + 1,)`; each sequence
            starts from its own state: `initial_state` and the returned state are `(nseq, H, D, Dv)`,
            a per-token decay is `(1, H, T)`. The offsets are read on the host once.
        backend: None (the scheduler's choice: the recurrent kernel for a token or a few, the
            chunked one otherwise) or a backend name.
    Returns:
        o `(B, H, S, Dv)` in q's dtype, or `(o, state)`.
    """
    check_backend(backend)
    if cu_seqlens is None and torch.compiler.is_compiling():
        from .linear_ops import linear_attention_op  # traced by dynamo: custom ops, no graph break
        return linear_attention_op(q, k, v, decay=decay, scale=scale, initial_state=initial_state,
                                   return_state=return_state, backend=backend)
    if cu_seqlens is not None:
        return _linear_varlen(q, k, v, cu_seqlens, decay=decay, scale=scale, initial_state=initial_state,
                              return_state=return_state, backend=backend)
    problem = _problem(q, k, v, decay, initial_state, scale, None)
    p = choose(problem, backend=backend, op="linear_attention")
    o, state = _run_kernel(p.kernel, q, k, v, problem, decay, initial_state)
    return (o, state) if return_state else o


def linear_decode_step(q, k, v, state, *, decay=None, scale=None, backend=None):
    """One decode step (or a few tokens) of `linear_attention` that updates `state` in place.

    Same meaning as `linear_attention(q, k, v, decay=decay, initial_state=state, return_state=True)`,
    but the new state is written into `state` itself (a native step kernel reads and writes it once,
    with no new allocation; a kernel that cannot write in place has its result copied in). The
    scheduler plans it like `linear_attention` (`plan_linear(q, k, v, ..., initial_state=state)`).
    Inference only: inputs that require grad raise.

    Args:
        q: `(B, H, S, D)` (S = 1 for decode); k: `(B, Hkv, S, D)`; v: `(B, Hkv, S, Dv)`.
        state: contiguous float32 `(B, H, D, Dv)`, the state before these tokens; updated in place.
        decay: None, `(H,)` or `(B, H, S)` log-decays; scale: default `D ** -0.5`.
    Returns:
        o `(B, H, S, Dv)` in q's dtype.
    """
    check_backend(backend)
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor (it is updated in place), got {state.dtype}"
                         f"{'' if state.is_contiguous() else ', not contiguous'}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, decay, state)):
        raise ValueError("linear_decode_step updates state in place and has no backward: call it under "
                         "torch.no_grad() with inputs that do not require grad (linear_attention differentiates)")
    problem = _problem(q, k, v, decay, state, scale, False)
    p = choose(problem, backend=backend, op="linear_attention")
    o, _ = _run_kernel(p.kernel, q, k, v, problem, decay, state, state_out=state)
    return o
