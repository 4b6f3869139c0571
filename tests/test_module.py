"""The `SparseAttention` nn.Module and `plan(...)`: the same numbers as the functional API."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import BACKENDS, make_pattern, make_qkv_for, randn

KINDS = ["dense_causal", "dense_full", "window_sinks", "blocksparse", "topk"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_module_forward_equals_functional(kind, backend):
    pattern = make_pattern(kind, b=2, hkv=2, sk=50)
    q, k, v = make_qkv_for(pattern, 2, 4, 2, 5, 50, 64, requires_grad=True)
    mod = sa.SparseAttention(pattern, backend=backend)
    assert isinstance(mod, torch.nn.Module)
    out = mod(q, k, v)
    oracle.assert_close_contract(out, sa.attention(q, k, v, pattern, backend=backend).detach(),
                                 dtype=torch.float32, device="cpu")
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, pattern), dtype=torch.float32, device="cpu")
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_module_scale_is_used():
    q, k, v = make_qkv_for(sa.Dense(), 1, 2, 2, 9, 9, 64)
    out = sa.SparseAttention(sa.Dense(), scale=0.02)(q, k, v)
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, sa.Dense(), scale=0.02),
                                 dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_linear_module_gate_is_a_trained_parameter(backend):
    pattern = sa.WindowLinear(8, sinks=1)
    mod = sa.SparseAttention(pattern, num_heads=4, backend=backend)
    assert isinstance(mod.gate, torch.nn.Parameter) and mod.gate.shape == (4,)
    assert (mod.gate == 0).all(), "gate initialised to zeros"
    assert any(p is mod.gate for p in mod.parameters())
    with torch.no_grad():
        mod.gate.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    q, k, v = make_qkv_for(pattern, 2, 4, 1, 30, 30, 64, requires_grad=True)
    out = mod(q, k, v)
    oracle.assert_close_contract(out, sa.attention(q, k, v, pattern, gate=mod.gate.detach(), backend=backend)
                                 .detach(), dtype=torch.float32, device="cpu")
    go = randn(*out.shape)
    out.backward(go)
    assert mod.gate.grad is not None and mod.gate.grad.shape == (4,)
    g64 = mod.gate.detach().double().requires_grad_()
    ref = oracle.oracle_attention(q.detach(), k.detach(), v.detach(), pattern, gate=g64)
    (dgate,) = torch.autograd.grad(ref, g64, go.double())
    oracle.assert_close_contract(mod.gate.grad, dgate, dtype=torch.float32, device="cpu", what="dgate")


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------
PLAN_CASES = [
    pytest.param(sa.Dense(), 37, 37, id="dense-prefill"),
    pytest.param(sa.Dense(), 1, 71, id="dense-decode"),
    pytest.param(sa.SlidingWindow(16, sinks=2), 50, 50, id="window"),
    pytest.param(sa.TopK(1, block_size=16), 5, 71, id="topk"),
    pytest.param(sa.WindowLinear(16), 71, 71, id="window-linear"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern,sq,sk", PLAN_CASES)
def test_plan_explains_and_runs(pattern, sq, sk, backend):
    q, k, v = make_qkv_for(pattern, 1, 4, 2, sq, sk, 64)
    gate = randn(4) if isinstance(pattern, sa.WindowLinear) else None
    p = sa.plan(q, k, v, pattern, gate=gate, backend=backend)
    assert isinstance(p.kernel.name, str) and p.kernel.name
    assert isinstance(p.kernel.backend, str)
    if backend is not None:
        assert p.kernel.backend == backend
    text = p.explain()
    assert isinstance(text, str) and p.kernel.name in text
    out = p.run(q, k, v, gate=gate)
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, pattern, gate=gate),
                                 dtype=torch.float32, device="cpu")
    oracle.assert_close_contract(out, sa.attention(q, k, v, pattern, gate=gate, backend=backend),
                                 dtype=torch.float32, device="cpu")


def test_plan_run_on_new_inputs_of_the_same_shape():
    pattern = sa.SlidingWindow(16)
    q, k, v = make_qkv_for(pattern, 1, 2, 2, 40, 40, 64)
    p = sa.plan(q, k, v, pattern, backend="reference")
    q2, k2, v2 = make_qkv_for(pattern, 1, 2, 2, 40, 40, 64)
    oracle.assert_close_contract(p.run(q2, k2, v2), oracle.oracle_attention(q2, k2, v2, pattern),
                                 dtype=torch.float32, device="cpu")


def test_explain_accounts_for_the_candidates():
    """explain() is an account of every candidate kernel, not just the chosen one's name."""
    q, k, v = make_qkv_for(sa.Dense(), 1, 2, 2, 40, 40, 64)
    p = sa.plan(q, k, v, sa.Dense())
    text = p.explain()
    assert "chosen" in text and p.kernel.name in text, text
    assert len(text.strip().splitlines()) >= 2, text
