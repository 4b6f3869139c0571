"""`attention` as torch custom ops, so `torch.compile(fullgraph=True)` traces it without a graph break.

Two ops, registered with `torch.library.custom_op` under the `sparse_attn` namespace:

* ``sparse_attn::attention_fwd(q, k, v, layout, gate, kind, params, scale, backend, requires_grad,
  sink_logits, softcap) -> (out, lse)``
* ``sparse_attn::attention_bwd(q, k, v, out, lse, dout, layout, gate, kind, params, scale, backend,
  sink_logits, softcap) -> (dq, dk, dv, dgate, dsink)``

A pattern (a frozen dataclass) is passed as a kind string plus a list of ints; `BlockSparse`'s
layout and `WindowLinear`'s gate are optional tensor arguments. The fake (meta) implementations
give the outputs' shapes and dtypes from the inputs' alone; `register_autograd` ties the two ops
together.

Where the scheduler runs. Dynamo traces the Python before the op call, so that part is only
validation (shapes, dtypes, pattern parameters: no `.item()`, no file reads). The kernel choice,
`make_problem` + `choose`, runs INSIDE the op on the real tensors, with the same inputs and the
same code as eager mode, so a compiled call picks the kernel an eager call picks. The backward
op plans again (same problem, same choice) and then:

* a :class:`~sparse_attn.backends.flash.FlashKernel` (the reference chunked softmax, the native
  kernels): `prepare` again (TopK's selection is recomputed, deterministic), then `backward`
  from the saved `(out, lse)`;
* any other kernel (SDPA, WindowLinear's composite): the forward is recomputed under autograd and
  differentiated (`torch.autograd.grad`); the op re-enables autograd, which the dispatcher turns
  off inside a custom op.

Eager calls of `sparse_attn.attention` do not go through these ops (`torch.compiler.is_compiling()`
picks the path): eager behaviour, errors and costs stay exactly as they were, and tests that watch
every aten op under a dispatch mode still see the kernels' own ops. `attention_op` calls the op
path directly (tests use it eagerly).

`lse` is float32 (float64 for float64 inputs), `+inf` for rows with no visible key; for kernels
that are not FlashKernels it is not computed (zeros: the backward recomputes instead).
The ops are not twice differentiable.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..patterns import BlockSparse, Dense, InfLLMv2, Pattern, SlidingWindow, TopK, WindowLinear
from ..patterns.infllmv2 import NORMALIZERS, VARIANTS
from ..scheduler.kernel import with_sinks
from ..scheduler.problem import check_backend, check_pattern, check_qkv, check_scale, check_softmax_options

_KINDS = {"dense": Dense, "window": SlidingWindow, "block_sparse": BlockSparse, "topk": TopK,
          "window_linear": WindowLinear, "infllmv2": InfLLMv2}


# --------------------------------------------------------------------------------------------
# pattern <-> op arguments
# --------------------------------------------------------------------------------------------
def encode_pattern(pattern: Pattern) -> tuple[str, list[int], Optional[Tensor]]:
    """A pattern as op arguments: `(kind, params, layout)` (layout only for BlockSparse)."""
    if isinstance(pattern, Dense):
        return "dense", [int(pattern.causal)], None
    if isinstance(pattern, SlidingWindow):
        return "window", [pattern.window, pattern.sinks], None
    if isinstance(pattern, BlockSparse):
        return "block_sparse", [pattern.block_size], pattern.layout
    if isinstance(pattern, TopK):
        return "topk", [pattern.topk, pattern.block_size, pattern.sink_blocks, pattern.local_blocks], None
    if isinstance(pattern, WindowLinear):
        return "window_linear", [pattern.window, pattern.sinks], None
    if isinstance(pattern, InfLLMv2):  # the two strings as their index in the tuples of allowed values
        return "infllmv2", [pattern.topk, pattern.block_size, pattern.kernel_size, pattern.kernel_stride,
                            pattern.init_blocks, pattern.local_blocks, pattern.dense_len,
                            NORMALIZERS.index(pattern.normalizer), VARIANTS.index(pattern.variant)], None
    raise TypeError(f"pattern must be one of Dense, SlidingWindow, BlockSparse, TopK, WindowLinear; "
                    f"got {type(pattern).__name__}")


def decode_pattern(kind: str, params: list[int], layout: Optional[Tensor]) -> Pattern:
    if kind not in _KINDS:
        raise ValueError(f"unknown pattern kind {kind!r}; expected one of {sorted(_KINDS)}")
    if kind == "dense":
        return Dense(causal=bool(params[0]))
    if kind == "block_sparse":
        if layout is None:
            raise ValueError("pattern kind 'block_sparse' needs its layout tensor")
        return BlockSparse(layout, block_size=params[0])
    if kind == "infllmv2":
        *ints, norm, variant = params
        return InfLLMv2(*ints, normalizer=NORMALIZERS[norm], variant=VARIANTS[variant])
    return _KINDS[kind](*params)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan(q, k, v, kind, params, layout, gate, scale, backend, requires_grad, sink_logits=None, softcap=None):
    from ..scheduler.plan import choose
    from ..scheduler.problem import make_problem

    pattern = decode_pattern(kind, params, layout)
    problem = make_problem(q, k, v, pattern, scale=scale, gate=gate, requires_grad=requires_grad,
                           sink_logits=sink_logits, softcap=softcap)
    return problem, choose(problem, backend=backend or None).kernel


def _is_flash(kernel, pattern) -> bool:
    from ..backends.flash import FlashKernel

    return isinstance(kernel, FlashKernel) and not isinstance(pattern, WindowLinear)


def _fresh(x: Tensor, *inputs: Tensor) -> Tensor:
    """Custom-op outputs must be new, contiguous tensors (the fake implementation says so), never
    an input or a view of one."""
    x = x.contiguous()
    if x.numel() and any(t is not None and x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                         for t in inputs):
        x = x.clone()
    return x


@contextlib.contextmanager
def _autograd_enabled():
    """Autograd inside a custom op: the dispatcher excludes the autograd keys while an op's
    implementation runs; put them back (and grad mode on) for a local recompute."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(torch._C.DispatchKey.AutogradFunctionality)
    exclude = exclude.remove(torch._C.DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


# --------------------------------------------------------------------------------------------
# the ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("sparse_attn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, layout: Optional[Tensor], gate: Optional[Tensor], kind: str,
                  params: list[int], scale: float, backend: str, requires_grad: bool,
                  sink_logits: Optional[Tensor] = None, softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """`(out (B, Hq, Sq, Dv) q.dtype, lse (B, Hq, Sq) float32/float64)`; `backend` "" = scheduler's choice."""
    problem, kern = _plan(q, k, v, kind, params, layout, gate, scale, backend, requires_grad, sink_logits, softcap)
    if _is_flash(kern, problem.pattern):
        lay = kern.prepare(q, k, problem)
        out, lse = kern.forward_sinks(q, k, v, problem, lay, sink_logits)
    else:
        with torch.no_grad():
            out = kern.run(q, k, v, problem, gate=gate, **with_sinks(sink_logits))
        lse = torch.zeros(q.shape[:3], dtype=_lse_dtype(q.dtype), device=q.device)  # not computed
    return _fresh(out.to(q.dtype), q, k, v), _fresh(lse.to(_lse_dtype(q.dtype)))


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, layout, gate, kind, params, scale, backend, requires_grad, sink_logits=None,
                        softcap=None):
    b, hq, sq, _ = q.shape
    return (q.new_empty((b, hq, sq, v.shape[3])),
            q.new_empty((b, hq, sq), dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("sparse_attn::attention_bwd", mutates_args=())
def attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, layout: Optional[Tensor],
                  gate: Optional[Tensor], kind: str, params: list[int], scale: float,
                  backend: str, sink_logits: Optional[Tensor] = None,
                  softcap: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(dq, dk, dv, dgate, dsink)`; `dgate` / `dsink` are empty `(0,)` when there is no gate / sink."""
    problem, kern = _plan(q, k, v, kind, params, layout, gate, scale, backend, True, sink_logits, softcap)
    dgate = dsink = None
    if _is_flash(kern, problem.pattern):
        lay = kern.prepare(q, k, problem)
        dq, dk, dv, dsink = kern.backward_sinks(q, k, v, out, lse, dout.contiguous(), problem, lay, sink_logits)
    else:
        with _autograd_enabled():
            inputs = [x.detach().requires_grad_() for x in (q, k, v)]
            if gate is not None:
                inputs.append(gate.detach().requires_grad_())
            res = kern.run(*inputs[:3], problem, gate=inputs[3] if gate is not None else None)
            grads = torch.autograd.grad(res, inputs, dout, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        dq, dk, dv = grads[:3]
        if gate is not None:
            dgate = grads[3]
    if dgate is None:
        dgate = q.new_empty((0,)) if gate is None else torch.zeros_like(gate)
    if dsink is None:
        dsink = q.new_empty((0,)) if sink_logits is None else torch.zeros_like(sink_logits)
    ins = (q, k, v, out, lse, dout, gate, sink_logits)
    return (_fresh(dq.to(q.dtype), *ins), _fresh(dk.to(k.dtype), *ins), _fresh(dv.to(v.dtype), *ins),
            _fresh(dgate, *ins), _fresh(dsink, *ins))


@attention_bwd.register_fake
def _attention_bwd_fake(q, k, v, out, lse, dout, layout, gate, kind, params, scale, backend, sink_logits=None,
                        softcap=None):
    dgate = q.new_empty((0,)) if gate is None else gate.new_empty(gate.shape)
    dsink = q.new_empty((0,)) if sink_logits is None else sink_logits.new_empty(sink_logits.shape)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate, dsink)


def _setup_context(ctx, inputs, output):
    q, k, v, layout, gate, kind, params, scale, backend, _, sink_logits, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, layout, gate, sink_logits)
    ctx.args = (kind, params, scale, backend)
    ctx.softcap = softcap


def _backward(ctx, dout, dlse):
    # `lse` is an auxiliary output (the public op returns `out` only): its gradient is ignored
    q, k, v, out, lse, layout, gate, sink_logits = ctx.saved_tensors
    dq, dk, dv, dgate, dsink = attention_bwd(q, k, v, out, lse, dout, layout, gate, *ctx.args, sink_logits,
                                             ctx.softcap)
    return (dq, dk, dv, None, (dgate if gate is not None else None), None, None, None, None, None,
            (dsink if sink_logits is not None else None), None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("sparse_attn::select_blocks", mutates_args=())
def select_blocks_op(q: Tensor, k: Tensor, params: list[int]) -> Tensor:
    """TopK's selection (`params` = topk, block_size, sink_blocks, local_blocks) as bool
    `(B, Hkv, Sq, ceil(Sk/bs))`; the selection's loops and `out=` writes stay out of dynamo."""
    from ..layout.topk_selection import select_blocks_mask

    return select_blocks_mask(q, k, TopK(*params)).contiguous()


@select_blocks_op.register_fake
def _select_blocks_fake(q, k, params):
    b, hkv, sk = k.shape[0], k.shape[1], k.shape[2]
    return q.new_empty((b, hkv, q.shape[2], -(-sk // params[1])), dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# the public entry of the op path
# --------------------------------------------------------------------------------------------
def validate(q, k, v, pattern, *, scale=None, gate=None, backend=None, sink_logits=None, softcap=None) -> float:
    """The checks of `make_problem` that need no device query: safe to trace with dynamo.
    Returns the resolved scale."""
    check_backend(backend)
    check_qkv(q, k, v)
    b, hq, sq, d = q.shape
    check_pattern(pattern, q_heads=hq, kv_heads=k.shape[1], batch=b, sq=sq, sk=k.shape[2], gate=gate,
                  device=q.device)
    check_softmax_options(pattern, sink_logits, softcap, q_heads=hq, device=q.device)
    return check_scale(scale, d)


def attention_op(q, k, v, pattern: Pattern = Dense(), *, scale=None, gate=None, backend=None, sink_logits=None,
                 softcap=None) -> Tensor:
    """`sparse_attn.attention` through the custom ops (what a `torch.compile`d call runs): same
    arguments, same result, same kernel choice."""
    sc = validate(q, k, v, pattern, scale=scale, gate=gate, backend=backend, sink_logits=sink_logits,
                  softcap=softcap)
    kind, params, layout = encode_pattern(pattern.clamped(k.shape[2]))  # op ints are int64: never a face value
    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, gate, sink_logits))
    cap = None if softcap is None else float(softcap)
    out, _ = attention_fwd(q, k, v, layout, gate, kind, params, sc, backend or "", requires_grad, sink_logits, cap)
    return out
