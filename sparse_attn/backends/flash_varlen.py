"""`VarlenFlash`: the packed-varlen side of a native softmax kernel (`attention_varlen` in one call).

A kernel that declares `supports_varlen = True` implements, over packed `(T, H, D)` inputs and
int32 `cu_seqlens_q/k` `(nseq + 1,)` on the inputs' device:

* ``prepare_varlen(q, k, p, nseq) -> layout``: the layout every sequence reads (no host sync);
* ``forward_varlen(q, k, v, cu_q, cu_k, p, layout) -> (out (Tq, Hq, Dv), lse float32 (Hq, Tq))``;
* ``backward_varlen(q, k, v, out, lse, dout, cu_q, cu_k, p, layout) -> (dq, dk, dv)``.

`p` is the varlen `Problem` (`p.varlen`, `p.batch` = nseq, `p.sq` / `p.sk` the bounds
`max_seqlen_q` / `max_seqlen_k`). `run_varlen` (autograd and learned sinks) is written here once.
"""
from __future__ import annotations

import torch

from .sinks import apply_sinks, sink_grad


def _as4(out, lse):
    """(Tq, Hq, Dv), (Hq, Tq) -> the (1, Hq, Tq, Dv), (1, Hq, Tq) views sinks.py takes."""
    return out.transpose(0, 1)[None], lse[None]


class _FlashVarlenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_logits, cu_q, cu_k, kernel, problem, layout):
        out, lse = kernel.forward_varlen_sinks(q, k, v, cu_q, cu_k, problem, layout, sink_logits)
        ctx.save_for_backward(q, k, v, out, lse, sink_logits, cu_q, cu_k)
        ctx.kernel, ctx.problem, ctx.layout = kernel, problem, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink_logits, cu_q, cu_k = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = ctx.kernel.backward_varlen(q, k, v, out, lse, dout, cu_q, cu_k, ctx.problem, ctx.layout)
        dsink = None
        if sink_logits is not None:
            o4, l4 = _as4(out, lse)
            dsink = sink_grad(o4, l4, dout.transpose(0, 1)[None], sink_logits)
        return dq, dk, dv, dsink, None, None, None, None, None


class VarlenFlash:
    """Mixin of a `FlashKernel` that runs packed varlen calls in one pass over all sequences."""

    supports_varlen = True

    def forward_varlen_sinks(self, q, k, v, cu_q, cu_k, p, layout, sink_logits=None):
        out, lse = self.forward_varlen(q, k, v, cu_q, cu_k, p, layout)
        if sink_logits is not None:
            o4, l4 = apply_sinks(*_as4(out, lse), sink_logits)
            out, lse = o4[0].transpose(0, 1), l4[0]
        return out, lse

    def run_varlen(self, q, k, v, cu_q, cu_k, p, *, sink_logits=None) -> torch.Tensor:
        """`(Tq, Hq, Dv)`: attention of every packed sequence (contract, per sequence)."""
        layout = self.prepare_varlen(q, k, p)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink_logits)):
            return _FlashVarlenFn.apply(q, k, v, sink_logits, cu_q, cu_k, self, p, layout)
        out, _ = self.forward_varlen_sinks(q, k, v, cu_q, cu_k, p, layout, sink_logits)
        return out
