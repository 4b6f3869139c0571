"""The public delta-rule ops: `delta_rule`, `delta_rule_varlen`, `plan_delta_rule` (contract,
"Delta-rule linear attention": DeltaNet, Gated DeltaNet, KDA)."""
from __future__ import annotations

import torch

from ..patterns.delta import DeltaRule
from ..scheduler.device import device_info
from ..scheduler.plan import Plan, choose
from ..scheduler.problem import FLOAT_DTYPES, Problem, check_backend, check_scale

OP = "delta_rule"


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_delta(q, k, v, beta, decay, initial_state) -> str:
    """Validate a `delta_rule` call (contract shapes); returns the decay kind."""
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _tensor(name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    dev = q.device
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        if x.device != dev:
            raise ValueError(f"{name} is on {x.device} but q is on {dev}")
    b, hk, s, d = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, Hk, S, D) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[0] != b or v.shape[2] != s:
        raise ValueError(f"v must be (B, Hv, S, Dv) with B = {b}, S = {s}, got {tuple(v.shape)}")
    hv, dv = v.shape[1], v.shape[3]
    if hk == 0 and hv != 0:
        raise ValueError("q and k must have at least one head")
    if hk and hv % hk != 0:
        raise ValueError(f"the number of value heads ({hv}) must be a multiple of the number of q/k heads ({hk}) "
                         f"(value head h reads q/k head h // (Hv // Hk))")
    if tuple(beta.shape) != (b, hv, s):
        raise ValueError(f"beta must have shape (B, Hv, S) = ({b}, {hv}, {s}), got {tuple(beta.shape)}")
    kind = "none"
    if decay is not None:
        _tensor("decay", decay)
        if tuple(decay.shape) == (b, hv, s):
            kind = "per-token"
        elif tuple(decay.shape) == (b, hv, s, d):
            kind = "per-channel"
        else:
            raise ValueError(f"decay must have shape (B, Hv, S) = ({b}, {hv}, {s}) or (B, Hv, S, D) = "
                             f"({b}, {hv}, {s}, {d}), got {tuple(decay.shape)}")
        if decay.device != dev:
            raise ValueError(f"decay is on {decay.device} but q is on {dev}")
    if initial_state is not None:
        _tensor("initial_state", initial_state)
        if tuple(initial_state.shape) != (b, hv, d, dv):
            raise ValueError(f"initial_state must have shape (B, Hv, D, Dv) = {(b, hv, d, dv)}, "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.device != dev:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {dev}")
    return kind


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def delta_problem(q, k, v, beta, decay, initial_state, scale, qk_l2norm, requires_grad=None) -> Problem:
    kind = check_delta(q, k, v, beta, decay, initial_state)
    if not isinstance(qk_l2norm, bool):
        raise TypeError(f"qk_l2norm must be a bool, got {type(qk_l2norm).__name__}")
    b, hk, s, d = q.shape
    sc = check_scale(scale, d)
    if requires_grad is None:
        requires_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, beta, decay, initial_state))
    return Problem(batch=b, q_heads=v.shape[1], kv_heads=max(hk, 1), sq=s, sk=s, head_dim=d,
                   v_head_dim=v.shape[3], dtype=q.dtype, device=device_info(q.device),
                   pattern=DeltaRule(decay=kind, qk_l2norm=qk_l2norm), scale=sc, requires_grad=bool(requires_grad))


class DeltaPlan(Plan):
    """A `Plan` for `delta_rule`; `.run` takes its arguments (on the problem it was made for)."""

    def run(self, q, k, v, beta=None, *, decay=None, initial_state=None, return_state=False, gate=None):
        if gate is not None:
            raise ValueError("gate is not an argument of delta_rule")
        if beta is None:
            raise ValueError("beta is required: a (B, Hv, S) tensor of write strengths")
        got = delta_problem(q, k, v, beta, decay, initial_state, self.problem.scale, self.problem.pattern.qk_l2norm,
                            self.problem.requires_grad)
        if got != self.problem:
            raise ValueError(f"this plan was made for {self.problem.describe()}; got {got.describe()}")
        o, state = self.kernel.run(q, k, v, self.problem, beta=beta, decay=decay, initial_state=initial_state)
        return (o, state) if return_state else o


def plan_delta_rule(q, k, v, beta, *, decay=None, scale=None, initial_state=None, qk_l2norm=False, backend=None,
                    requires_grad=None) -> DeltaPlan:
    """The scheduler's decision for `delta_rule(q, k, v, beta, ...)`, without running it.

    `.explain()` lists every delta-rule kernel with its estimated cost or its reasons not to run;
    `.run(q, k, v, beta, decay=..., initial_state=..., return_state=...)` runs the chosen one."""
    check_backend(backend)
    problem = delta_problem(q, k, v, beta, decay, initial_state, scale, qk_l2norm, requires_grad)
    p = choose(problem, backend=backend, op=OP)
    return DeltaPlan(problem=p.problem, candidates=p.candidates, kernel=p.kernel, backend_request=backend)


def delta_rule(q, k, v, beta, *, decay=None, scale=None, initial_state=None, return_state=False,
               qk_l2norm=False, backend=None):
    """The delta rule (contract, "Delta-rule linear attention"): DeltaNet, Gated DeltaNet, KDA.

    Per value head, state `S` `(D, Dv)` float32: `S' = diag(exp(g_t)) S_{t-1}`,
    `S_t = S' + beta_t k_t (v_t - S'^T k_t)^T`, `o_t = scale S_t^T q_t`.

    Args:
        q, k: `(B, Hk, S, D)`; v: `(B, Hv, S, Dv)` with `Hv % Hk == 0` (value head h reads q/k
            head `h // (Hv // Hk)`; q, k are never repeated in memory).
        beta: `(B, Hv, S)` write strengths (normally a sigmoid; any real value is computed as written).
        decay: log-decays `<= 0`: None (DeltaNet), `(B, Hv, S)` (Gated DeltaNet) or `(B, Hv, S, D)`
            (KDA, one per key channel). `-inf` is a full reset.
        scale: default `D ** -0.5`.
        initial_state: `(B, Hv, D, Dv)` state to continue from.
        return_state: also return the final state `(B, Hv, D, Dv)` (float32; float64 for float64 inputs).
        qk_l2norm: divide each q_t, k_t by `||x|| + 1e-6` first.
        backend: None (the scheduler's choice: a step-by-step kernel for a token or a few, a
            chunked one otherwise) or a backend name.
    Returns:
        o `(B, Hv, S, Dv)` in v's dtype, or `(o, state)`. Differentiable in q, k, v, beta, decay
        and initial_state.
    """
    check_backend(backend)
    if torch.compiler.is_compiling():
        from .delta_ops import delta_rule_op  # traced by dynamo: custom ops, no graph break
        return delta_rule_op(q, k, v, beta, decay=decay, scale=scale, initial_state=initial_state,
                             return_state=return_state, qk_l2norm=qk_l2norm, backend=backend)
    problem = delta_problem(q, k, v, beta, decay, initial_state, scale, qk_l2norm)
    kern = choose(problem, backend=backend, op=OP).kernel
    o, state = kern.run(q, k, v, problem, beta=beta, decay=decay, initial_state=initial_state)
    return (o, state) if return_state else o


def delta_rule_varlen(q, k, v, beta, cu_seqlens, *, decay=None, scale=None, initial_state=None,
                      return_state=False, qk_l2norm=False, backend=None):
    """`delta_rule` over packed sequences (the varlen layout of `attention_varlen`).

    q, k `(T, Hk, D)`, v `(T, Hv, Dv)`, beta `(T, Hv)`, decay None, `(T, Hv)` or `(T, Hv, D)`;
    `cu_seqlens` int32 `(nseq + 1,)` offsets (read on the host once). Sequence `i` starts from
    `initial_state[i]` `(nseq, Hv, D, Dv)` (or zeros). Returns o `(T, Hv, Dv)`, or `(o, states
    (nseq, Hv, D, Dv))`."""
    check_backend(backend)
    for name, x, nd in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("beta", beta, 2)):
        _tensor(name, x)
        if x.dim() != nd:
            raise ValueError(f"{name} must be {nd}-D (packed tokens first), got shape {tuple(x.shape)}")
    if decay is not None:
        _tensor("decay", decay)
        if decay.dim() not in (2, 3):
            raise ValueError(f"decay must be (T, Hv) or (T, Hv, D), got shape {tuple(decay.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of nseq + 1 offsets, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    offs = cu_seqlens.tolist()
    total = q.shape[0]
    if offs[0] != 0 or offs[-1] != total or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at the packed length {total}, "
                         f"got {offs}")
    nseq = len(offs) - 1
    # the whole packed call validated once, as one sequence
    check_delta(*(x.transpose(0, 1)[None] for x in (q, k, v, beta)),
                None if decay is None else decay.transpose(0, 1)[None], None)
    hv, d, dv = v.shape[1], q.shape[2], v.shape[2]
    if initial_state is not None:
        _tensor("initial_state", initial_state)
        if tuple(initial_state.shape) != (nseq, hv, d, dv):
            raise ValueError(f"with cu_seqlens, initial_state must have shape (nseq, Hv, D, Dv) = "
                             f"{(nseq, hv, d, dv)}, got {tuple(initial_state.shape)}")

    def seq(x, a, z):  # (T, H, ...) -> (1, H, len, ...)
        return x[a:z].transpose(0, 1)[None]

    outs, states = [], []
    for i in range(nseq):
        a, z = offs[i], offs[i + 1]
        o, st = delta_rule(seq(q, a, z), seq(k, a, z), seq(v, a, z), seq(beta, a, z),
                           decay=None if decay is None else seq(decay, a, z), scale=scale,
                           initial_state=None if initial_state is None else initial_state[i:i + 1],
                           return_state=True, qk_l2norm=qk_l2norm, backend=backend)
        outs.append(o[0].transpose(0, 1))
        states.append(st)
    o = torch.cat(outs, dim=0) if outs else v.new_zeros(0, hv, dv)
    if not return_state:
        return o
    st = torch.cat(states, dim=0) if states else v.new_zeros(0, hv, d, dv, dtype=state_dtype(q.dtype))
    return o, st
