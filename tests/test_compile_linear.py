"""`linear_attention` under `torch.compile(fullgraph=True)` (sparse_attn/api/linear_ops.py): no graph
break, and the compiled forward and every gradient (q, k, v, decay, initial_state) equal the eager
ones and the float64 recurrence."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import oracle
import sparse_attn as sa
from conftest import randn
from sparse_attn.api.linear_ops import linear_attention_fwd


def _inputs(decay_kind, with_state, dtype=torch.float64):
    b, h, hkv, s, d = 2, 4, 2, 37, 16
    q, k, v = randn(b, h, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype)
    decay = {"none": None, "per-head": -torch.rand(h, dtype=dtype) * 2,
             "per-token": -torch.rand(b, h, s, dtype=dtype) * 2}[decay_kind]
    s0 = randn(b, h, d, d, dtype=dtype) if with_state else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, decay, s0)]


def _loss(q, k, v, decay, s0):
    o, st = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True)
    return (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() + st.square().sum() * 0.1


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
def test_compiled_equals_eager_and_oracle(decay_kind, with_state):
    torch._dynamo.reset()
    ins = _inputs(decay_kind, with_state)
    wrt = [x for x in ins if x is not None]
    ref = _loss(*ins)
    gref = torch.autograd.grad(ref, wrt)
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    out = compiled(*ins)
    grads = torch.autograd.grad(out, wrt)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, gr in zip(grads, gref):
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
    q, k, v, decay, s0 = (None if x is None else x.detach() for x in ins)
    o_ref, st_ref = oracle.oracle_linear_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                   decay=decay, initial_state=s0)
    o_c, st_c = torch.compile(_forward, fullgraph=True, backend="aot_eager")(q, k, v, decay, s0)
    torch.testing.assert_close(o_c, o_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(st_c, st_ref, rtol=1e-9, atol=1e-10)


def _forward(q, k, v, decay, s0):
    return sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True)


def test_opcheck():
    q, k, v, decay, s0 = _inputs("per-token", True)
    opcheck(linear_attention_fwd, (q, k, v, decay, s0, 0.25, ""))
