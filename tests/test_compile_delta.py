"""`delta_rule` under `torch.compile(fullgraph=True)` (sparse_attn/api/delta_ops.py): no graph break,
and the compiled forward and every gradient (q, k, v, beta, decay, initial_state) equal the eager
ones; the compiled forward equals the float64 step-by-step evaluation."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import sparse_attn as sa
from conftest import randn
from delta_oracle import oracle_delta_rule
from sparse_attn.api.delta_ops import delta_rule_fwd


def _inputs(decay_kind, with_state, dtype=torch.float64):
    b, hk, hv, s, d = 2, 1, 2, 37, 16
    q, k = randn(b, hk, s, d, dtype=dtype), randn(b, hk, s, d, dtype=dtype) * d ** -0.5
    v, beta = randn(b, hv, s, d, dtype=dtype), torch.rand(b, hv, s, dtype=dtype)
    decay = {"none": None, "per-token": -torch.rand(b, hv, s, dtype=dtype) * 2,
             "per-channel": -torch.rand(b, hv, s, d, dtype=dtype) * 2}[decay_kind]
    s0 = randn(b, hv, d, d, dtype=dtype) if with_state else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, beta, decay, s0)]


def _loss(q, k, v, beta, decay, s0):
    o, st = sa.delta_rule(q, k, v, beta, decay=decay, initial_state=s0, return_state=True, qk_l2norm=True)
    return (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() + st.square().sum() * 0.1


@pytest.mark.parametrize("decay_kind,with_state", [("none", False), ("per-channel", True)])
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
    q, k, v, beta, decay, s0 = (None if x is None else x.detach() for x in ins)
    o_ref, st_ref = oracle_delta_rule(q, k, v, beta, decay=decay, initial_state=s0, qk_l2norm=True)
    fwd = torch.compile(lambda *a: sa.delta_rule(*a[:4], decay=a[4], initial_state=a[5], return_state=True,
                                                 qk_l2norm=True), fullgraph=True, backend="aot_eager")
    o_c, st_c = fwd(q, k, v, beta, decay, s0)
    torch.testing.assert_close(o_c, o_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(st_c, st_ref, rtol=1e-9, atol=1e-10)


def test_opcheck():
    q, k, v, beta, decay, s0 = _inputs("per-token", True)
    opcheck(delta_rule_fwd, (q, k, v, beta, decay, s0, 0.25, False, ""))
