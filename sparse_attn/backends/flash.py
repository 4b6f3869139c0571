"""`FlashKernel`: the interface every native (non-reference) softmax kernel implements, and the
one autograd wrapper they all share.

A native kernel provides three steps over the shared :class:`~sparse_attn.layout.BlockLayout`:

* ``prepare(q, k, p) -> layout``: build the layout this kernel runs (tile sizes of its choice,
  TopK's per-token selection included), on the device, without host synchronisation and
  without autograd;
* ``forward(q, k, v, p, layout) -> (out, lse)``: `out` `(B, Hq, Sq, Dv)` in q's dtype and the
  natural-log log-sum-exp `lse` float32 `(B, Hq, Sq)` of each row's scaled scores, `+inf` for a
  row that sees no key (its output is 0, and `exp(s - lse)` is then 0 in the backward pass);
* ``backward(q, k, v, out, lse, dout, p, layout) -> (dq, dk, dv)``: the flash backward over the
  same layout (dk/dv through the transposed layout), gradients in the inputs' dtypes.

`run()` (what the scheduler calls) is written once, here: inference calls `forward` and drops
`lse`; training goes through :class:`_FlashAttentionFn`, which saves `out` and `lse` (O(Sq)
memory, never `Sq x Sk`) and calls `backward`. Learned sinks (`sink_logits`) are applied here too,
for every FlashKernel, on `(out, lse)` after `forward` (backends/sinks.py says why that is exact and
why `backward` needs no change); `softcap` is the kernel's own work (`p.softcap`, declared by
`supports_softcap`). The TopK selection is part of the layout and
gets no gradient (contract). A kernel that has no backward sets `supports_backward = False`
and the scheduler never gives it a training call.
"""
from __future__ import annotations

import torch

from ..scheduler.kernel import Kernel
from ..scheduler.problem import Problem
from .sinks import apply_sinks, sink_grad


class _FlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_logits, kernel, problem, layout):
        out, lse = kernel.forward_sinks(q, k, v, problem, layout, sink_logits)
        ctx.save_for_backward(q, k, v, out, lse, sink_logits)
        ctx.kernel, ctx.problem, ctx.layout = kernel, problem, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink_logits = ctx.saved_tensors
        dq, dk, dv, dsink = ctx.kernel.backward_sinks(q, k, v, out, lse, dout.contiguous(), ctx.problem,
                                                      ctx.layout, sink_logits)
        return dq, dk, dv, dsink, None, None, None


class FlashKernel(Kernel):
    """Base class of native softmax kernels: implement `prepare`, `forward` (and `backward` when
    `supports_backward`); `run` and autograd come from here."""

    def prepare(self, q: torch.Tensor, k: torch.Tensor, p: Problem):
        raise NotImplementedError

    def forward(self, q, k, v, p: Problem, layout) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, q, k, v, out, lse, dout, p: Problem, layout):
        raise NotImplementedError(f"{self.name} has no backward pass")

    #: sinks are applied on (out, lse) after any forward (backends/sinks.py)
    supports_sinks = True

    def forward_sinks(self, q, k, v, p: Problem, layout, sink_logits=None):
        """`forward`, then the learned sinks (when given): `(out, lse)` of the contract's softmax."""
        out, lse = self.forward(q, k, v, p, layout)
        if sink_logits is not None:
            out, lse = apply_sinks(out, lse, sink_logits)
        return out, lse

    def backward_sinks(self, q, k, v, out, lse, dout, p: Problem, layout, sink_logits=None):
        """`backward` from the outputs of `forward_sinks`; returns `(dq, dk, dv, d sink_logits or None)`."""
        dq, dk, dv = self.backward(q, k, v, out, lse, dout, p, layout)
        dsink = sink_grad(out, lse, dout, sink_logits) if sink_logits is not None else None
        return dq, dk, dv, dsink

    def run(self, q, k, v, p: Problem, *, gate=None, sink_logits=None) -> torch.Tensor:
        layout = self.prepare(q, k, p)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink_logits)):
            if not self.supports_backward:
                raise RuntimeError(f"{self.name} has no backward pass; the scheduler should not have chosen it "
                                   f"for inputs that require grad")
            return _FlashAttentionFn.apply(q, k, v, sink_logits, self, p, layout)
        out, _ = self.forward_sinks(q, k, v, p, layout, sink_logits)
        return out

    def forward_cache(self, q, view, p: Problem):
        """`(out, lse)` of `q` over a cache's read view; kernels of the "attention_with_cache" op
        implement it, and `run_cache` (sinks included) comes from here."""
        raise NotImplementedError(f"{self.name} does not read caches")

    def run_cache(self, q, view, p: Problem, *, sink_logits=None) -> torch.Tensor:
        out, lse = self.forward_cache(q, view, p)
        if sink_logits is not None:
            out, _ = apply_sinks(out, lse, sink_logits)
        return out
