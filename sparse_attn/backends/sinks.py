"""Learned sinks on top of any kernel that returns `(out, lse)` (contract, "Learned sinks and logit
soft-capping").

A sink logit `c_h` joins each row's softmax denominator and contributes no value:
`o = sum_j e^{s_j} v_j / (e^{c_h} + sum_j e^{s_j})`. With `L` the row's log-sum-exp over its visible
keys (what every FlashKernel returns beside `out`), that is

    o_sink = o * e^L / (e^c + e^L) = o * sigmoid(L - c),      L_sink = logaddexp(L, c),

so sinks are an O(rows) step after any forward, never a change to a kernel's inner loop. A row that
sees no key has `L = +inf` and `o = 0` (it stays 0: the contract's zeros) and `L_sink = +inf`.

Backward. With `P_j = e^{s_j - L_sink}` (the keys' probabilities with the sink in the denominator)
and `P_c = e^{c - L_sink}`, the sink's score gradient is `dS_c = P_c (dP_c - D)` with `dP_c = 0` (no
value) and `D = sum_j P_j dP_j = dO . o_sink`, so, per head,

    d c_h = - sum over batches and rows of  P_c * (dO . o_sink).

The keys' gradients are the usual flash backward with `L_sink` and `o_sink` in place of `L` and `o`:
`P_j` then already carries the sink in its denominator and `D = dO . o_sink` is unchanged, so every
kernel's backward serves sinks unmodified.
"""
from __future__ import annotations

import torch


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sink_logits: torch.Tensor):
    """`(out, lse)` of the keys alone -> `(out, lse)` with the sinks in the denominator.

    out `(B, Hq, Sq, Dv)` (any float dtype, kept), lse `(B, Hq, Sq)` float32/float64 (`+inf`: no
    key), sink_logits `(Hq,)`. The weight is computed in lse's dtype."""
    c = sink_logits.detach().to(lse.dtype)[None, :, None]
    # sigmoid(+inf - c) = 1 keeps an empty row's zeros; a NaN lse (a non-finite input) stays NaN
    w = torch.sigmoid(lse - c)
    o = (out.to(lse.dtype) * w[..., None]).to(out.dtype)
    return o, torch.logaddexp(lse, c)


def sink_grad(out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, sink_logits: torch.Tensor) -> torch.Tensor:
    """`d sink_logits` `(Hq,)` from the sink-adjusted `out`, `lse` and the output gradient `dout`."""
    acc = lse.dtype
    c = sink_logits.detach().to(acc)[None, :, None]
    p_sink = torch.exp(c - lse)  # 0 for a row that saw no key (lse = +inf)
    d = (dout.to(acc) * out.to(acc)).sum(dim=-1)
    return -(p_sink * d).sum(dim=(0, 2)).to(sink_logits.dtype)
