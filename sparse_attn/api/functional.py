"""The public functional API: `attention`, `attention_varlen`, `select_blocks`,
and `plan` (`linear_attention` lives in linear.py). Each validates its inputs once (clear `ValueError`/`TypeError`
naming the argument), asks the scheduler for a kernel and runs it."""
from __future__ import annotations

import dataclasses

import torch

from ..layout.infllmv2_selection import infllmv2_select_mask
from ..layout.topk_selection import select_blocks_mask
from ..patterns import BlockSparse, Dense, InfLLMv2, Pattern, TopK
from ..scheduler.kernel import with_sinks
from ..scheduler.plan import Plan, choose
from ..scheduler.device import device_info
from ..scheduler.problem import (Problem, check_backend, check_qkv, check_scale, check_softmax_options,
                                 effective_pattern, make_problem)
from .ops import attention_op, encode_pattern, select_blocks_op, validate


def plan(q, k, v, pattern: Pattern = Dense(), *, scale=None, gate=None, backend=None, requires_grad=None,
         sink_logits=None, softcap=None) -> Plan:
    """The scheduler's decision for `attention(q, k, v, pattern, ...)`, without running it.

    Returns a :class:`~sparse_attn.scheduler.Plan`: `.kernel` is the chosen kernel, `.run(q, k, v)`
    runs it (`.run(q, k, v, sink_logits=...)` when planned with sinks), and `.explain()` lists every
    candidate with its estimated cost or its reasons not to run. `requires_grad` defaults to whether
    autograd would track the call.
    """
    check_backend(backend)
    problem = make_problem(q, k, v, pattern, scale=scale, gate=gate, requires_grad=requires_grad,
                           sink_logits=sink_logits, softcap=softcap)
    return choose(problem, backend=backend)


def attention(q, k, v, pattern: Pattern = Dense(), *, scale=None, gate=None, backend=None, sink_logits=None,
              softcap=None) -> torch.Tensor:
    """Attention of `pattern` (contract) in SDPA layout.

    Args:
        q: `(B, Hq, Sq, D)`; query row `t` has absolute position `Sk - Sq + t`.
        k: `(B, Hkv, Sk, D)` with `Hq % Hkv == 0` (query head `h` reads kv head `h // (Hq // Hkv)`).
        v: `(B, Hkv, Sk, Dv)`.
        pattern: `Dense`, `SlidingWindow`, `BlockSparse`, `TopK` or `WindowLinear`.
        scale: softmax scale, default `D ** -0.5`.
        gate: `(Hq,)` gate logits, required by (and only by) `WindowLinear`.
        backend: None (scheduler's choice) or "reference" | "triton" | "cpu" | "cuda" | "npu".
        sink_logits: `(Hq,)` floating tensor of learned per-head sink logits (GPT-OSS): each joins its
            head's softmax denominator and contributes no value. Softmax patterns only.
        softcap: float > 0: scores become `softcap * tanh(s / softcap)` before the softmax (Gemma 2).
            Softmax patterns only.
    Returns:
        `(B, Hq, Sq, Dv)` in q's dtype. Differentiable in q, k, v (and gate, sink_logits).

    Under `torch.compile` the call goes through the `sparse_attn::attention_fwd/bwd` custom ops
    (api/ops.py): no graph break, the same kernel choice, made when the compiled graph runs.
    """
    if torch.compiler.is_compiling():
        return attention_op(q, k, v, pattern, scale=scale, gate=gate, backend=backend, sink_logits=sink_logits,
                            softcap=softcap)
    p = plan(q, k, v, pattern, scale=scale, gate=gate, backend=backend, sink_logits=sink_logits, softcap=softcap)
    # the plan's own inputs: no need to re-check them
    return p.kernel.run(q, k, v, p.problem, gate=gate, **with_sinks(sink_logits))


def _check_cu(name, cu, total: int, device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int32 tensor of nseq+1 offsets, got {cu.dtype} {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")


def _varlen_problem(q, k, v, pattern, *, nseq, max_seqlen_q, max_seqlen_k, scale, gate, sink_logits,
                    softcap) -> Problem:
    """The packed call as one `Problem` (`varlen=True`): batch = nseq, `sq` / `sk` the bounds
    `max_seqlen_q/k` (the packed lengths when not given: no host read). Inputs already checked."""
    tq, hq, d = q.shape
    tk, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    msq = tq if max_seqlen_q is None else min(int(max_seqlen_q), tq)
    msk = tk if max_seqlen_k is None else min(int(max_seqlen_k), tk)
    if isinstance(pattern, BlockSparse):
        msk = min(msk, pattern.block_size * pattern.layout.shape[2])  # every Sk_i fits its layout
    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, gate, sink_logits))
    run, requested = effective_pattern(pattern, max(msk, 1))
    return Problem(batch=nseq, q_heads=hq, kv_heads=hkv, sq=msq, sk=msk, head_dim=d, v_head_dim=dv, dtype=q.dtype,
                   device=device_info(q.device), pattern=run, scale=check_scale(scale, d),
                   requires_grad=requires_grad, varlen=True, torch_device=q.device, softcap=softcap,
                   sinks=sink_logits is not None, requested=requested)


def plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, pattern: Pattern = Dense(), *, max_seqlen_q=None,
                max_seqlen_k=None, scale=None, gate=None, backend=None, sink_logits=None, softcap=None):
    """`(plan, packed)`: the scheduler's decision for `attention_varlen(...)` without running it.

    `packed` True: `plan.kernel` runs every sequence in one call (`supports_varlen`); False: the
    packed call's candidates all refuse (`plan.explain()` says why) or the kernel the scheduler
    prefers for one sequence of this size is not a packed one, and `attention_varlen` calls
    `attention` once per sequence; the returned plan is then the per-sequence choice for a
    sequence of the bounds `max_seqlen_q/k`."""
    check_backend(backend)
    check_qkv(q, k, v, ndim=3)
    cap = check_softmax_options(pattern, sink_logits, softcap, q_heads=q.shape[1], device=q.device)
    nseq = cu_seqlens_q.numel() - 1 if isinstance(cu_seqlens_q, torch.Tensor) else 0
    prob = _varlen_problem(q, k, v, pattern, nseq=nseq, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                           scale=scale, gate=gate, sink_logits=sink_logits, softcap=cap)
    try:
        packed = choose(prob, backend=backend)
    except ValueError:
        packed = None
    try:
        loop = choose(dataclasses.replace(prob, varlen=False), backend=backend)
    except ValueError:
        if packed is None:
            raise
        return packed, True
    if packed is not None and packed.candidates and _cost(packed) <= _cost(loop):
        return packed, True
    return loop, False


def _cost(plan: Plan) -> float:
    return next(c.cost for c in plan.candidates if c.kernel is plan.kernel)


def _check_offsets_on_host(cu_q, cu_k, q, k, pattern, max_seqlen_q, max_seqlen_k):
    """The offsets' values (CPU tensors only: reading them costs nothing there; on a GPU they are
    trusted, as FlashAttention's varlen kernels trust them). Returns the host lists."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for name, cu, total in (("cu_seqlens_q", cq, q.shape[0]), ("cu_seqlens_k", ck, k.shape[0])):
        if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length "
                             f"{total}, got {cu}")
    lq = [b - a for a, b in zip(cq, cq[1:])]
    lk = [b - a for a, b in zip(ck, ck[1:])]
    for name, bound, lens in (("max_seqlen_q", max_seqlen_q, lq), ("max_seqlen_k", max_seqlen_k, lk)):
        if bound is not None and lens and bound < max(lens):
            raise ValueError(f"{name}={bound} is below the longest sequence ({max(lens)})")
    if pattern.causal and any(a > b for a, b in zip(lq, lk)):
        raise ValueError(f"queries are aligned to the end of the keys, so a causal pattern needs Sq_i <= Sk_i "
                         f"for every sequence; got q lengths {lq}, k lengths {lk}")
    if isinstance(pattern, BlockSparse):
        lay = pattern.layout
        nb = max([-(-s // pattern.block_size) for s in lk] + [0])
        if lay.shape[0] not in (1, len(lk)) or lay.shape[1] not in (1, k.shape[1]) or lay.shape[2] < nb \
                or lay.shape[3] < nb:
            raise ValueError(f"BlockSparse.layout for varlen must have shape (nseq or 1, Hkv or 1, >= {nb}, "
                             f">= {nb}), got {tuple(lay.shape)}")
    return cq, ck


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, pattern: Pattern = Dense(), *, max_seqlen_q=None,
                     max_seqlen_k=None, scale=None, gate=None, backend=None, sink_logits=None,
                     softcap=None) -> torch.Tensor:
    """Attention over packed sequences, FlashAttention varlen layout.

    q `(Tq, Hq, D)`, k `(Tk, Hkv, D)`, v `(Tk, Hkv, Dv)`; `cu_seqlens_q/k` int32 `(nseq + 1,)`
    offsets. Each sequence obeys the contract on its own (end-aligned queries); `sink_logits` `(Hq,)`
    and `softcap` apply to every sequence as in :func:`attention`. For `BlockSparse`
    the layout's batch axis is `nseq` or 1 and sequence `i` reads its top-left
    `ceil(Sk_i/bs) x ceil(Sk_i/bs)` corner. `max_seqlen_q/k`: optional host bounds (>= every
    sequence's length); they size the packed kernels' work lists. Returns `(Tq, Hq, Dv)`.

    When the chosen kernel runs packed calls (`plan_varlen` says which), every sequence goes
    through one call, and on a GPU the offsets are never read on the host (they must then be valid:
    the values are checked only for CPU tensors). Otherwise `attention` runs once per sequence
    after one host read of the offsets, as FlashAttention's varlen plan does.
    """
    check_backend(backend)
    check_qkv(q, k, v, ndim=3)
    check_softmax_options(pattern, sink_logits, softcap, q_heads=q.shape[1], device=q.device)
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (nseq + 1), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    cq = ck = None
    if q.device.type == "cpu":
        cq, ck = _check_offsets_on_host(cu_seqlens_q, cu_seqlens_k, q, k, pattern, max_seqlen_q, max_seqlen_k)
    if cu_seqlens_q.numel() == 1:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    p, packed = plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, pattern, max_seqlen_q=max_seqlen_q,
                            max_seqlen_k=max_seqlen_k, scale=scale, gate=gate, backend=backend,
                            sink_logits=sink_logits, softcap=softcap)
    if packed and cq is not None and not getattr(p.kernel, "varlen_sq_above_sk", True) and any(
            b - a > d - c for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])):
        packed = False  # this kernel's packed call needs Sq_i <= Sk_i (a non-causal pattern allows more)
    if packed:
        return p.kernel.run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, p.problem, **with_sinks(sink_logits))
    if cq is None:
        cq, ck = _check_offsets_on_host(cu_seqlens_q, cu_seqlens_k, q, k, pattern, max_seqlen_q, max_seqlen_k)
    outs = []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        pat = pattern
        if isinstance(pattern, BlockSparse):
            lay = pattern.layout
            nb = -(-ki.shape[2] // pattern.block_size)
            row = lay[i:i + 1] if lay.shape[0] > 1 else lay
            pat = BlockSparse(row[:, :, :nb, :nb], block_size=pattern.block_size)
        outs.append(attention(qi, ki, vi, pat, scale=scale, gate=gate, backend=backend, sink_logits=sink_logits,
                              softcap=softcap)[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def select_blocks(q, k, pattern: TopK | InfLLMv2) -> torch.Tensor:
    """The TopK or InfLLMv2 selection as bool `(B, Hkv, Sq, ceil(Sk/bs))`: forced (sink / init,
    local) and selected blocks (InfLLMv2 below `dense_len`: every causal block). Computed in float32
    (float64 for float64 inputs); not differentiable."""
    if not isinstance(pattern, (TopK, InfLLMv2)):
        raise TypeError(f"select_blocks needs a TopK or InfLLMv2 pattern, got {type(pattern).__name__}")
    check_qkv(q, k, k, names=("q", "k", "k"))
    if isinstance(pattern, InfLLMv2):
        validate(q, k, k, pattern)  # the same checks as attention()
        with torch.no_grad():
            return infllmv2_select_mask(q.detach(), k.detach(), pattern.clamped(k.shape[2], keep_block_size=True))
    validate(q, k, k, pattern)  # same checks as attention(), traceable by torch.compile
    pattern = pattern.clamped(k.shape[2])  # same selection; no allocation by topk's face value
    if torch.compiler.is_compiling():
        return select_blocks_op(q.detach(), k.detach(), encode_pattern(pattern)[1])
    with torch.no_grad():
        return select_blocks_mask(q, k, pattern)
