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
memory, never `Sq x Sk`) and calls `backward`. The TopK selection is part of the layout and
gets no gradient (contract). A kernel that has no backward sets `supports_backward = False`
and the scheduler never gives it a training call.
"""
from __future__ import annotations

import torch

from ..scheduler.kernel import Kernel
from ..scheduler.problem import Problem


class _FlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernel, problem, layout):
        out, lse = kernel.forward(q, k, v, problem, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.problem, ctx.layout = kernel, problem, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(q, k, v, out, lse, dout.contiguous(), ctx.problem, ctx.layout)
        return dq, dk, dv, None, None, None


class FlashKernel(Kernel):
    """Base class of native softmax kernels: implement `prepare`, `forward` (and `backward` when
    `supports_backward`); `run` and autograd come from here."""

    def prepare(self, q: torch.Tensor, k: torch.Tensor, p: Problem):
        raise NotImplementedError

    def forward(self, q, k, v, p: Problem, layout) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, q, k, v, out, lse, dout, p: Problem, layout):
        raise NotImplementedError(f"{self.name} has no backward pass")

    def run(self, q, k, v, p: Problem, *, gate=None) -> torch.Tensor:
        layout = self.prepare(q, k, p)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            if not self.supports_backward:
                raise RuntimeError(f"{self.name} has no backward pass; the scheduler should not have chosen it "
                                   f"for inputs that require grad")
            return _FlashAttentionFn.apply(q, k, v, self, p, layout)
        out, _ = self.forward(q, k, v, p, layout)
        return out
