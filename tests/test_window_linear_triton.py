"""The fused Triton `WindowLinear` backward (`triton.window_linear`, sparse_attn/backends/triton/
linear_window.py): dq, dk, dv and d(gate) against the float64 oracle with the contract's bounds.

Runs on TRITON_DEVICE ("cuda" with a GPU, else CPU tensors in Triton's interpreter: small sizes).
The cases are a hand-made covering of the axes: GQA 1/2/4/8, Sq < Sk (chunked prefill, decode),
sinks 0 and > 0, a window longer than the sequence (no linear part), window 1, lengths that are
not tile multiples, D 64/80/128 with Dv equal or not, float32 / float16 / bfloat16.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import DTYPE_IDS, TRITON_DEVICE, check_against_oracle, randn

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)

DEV = TRITON_DEVICE
KERNEL = "triton.window_linear"

CASES = [  # (window, sinks, B, Hq, Hkv, Sq, Sk, D, Dv, dtype)
    pytest.param(16, 0, 2, 2, 2, 37, 37, 64, 64, torch.float32, id="w16-prefill-gqa1-f32"),
    pytest.param(13, 2, 1, 4, 2, 50, 71, 80, 48, torch.float32, id="w13-sinks2-chunk-gqa2-d80-dv48-f32"),
    pytest.param(7, 5, 1, 4, 1, 101, 101, 64, 80, torch.float32, id="w7-sinks5-gqa4-dv80-f32"),
    pytest.param(300, 1, 1, 2, 1, 40, 61, 64, 64, torch.float32, id="w300-longer-than-seq-f32"),
    pytest.param(1, 0, 2, 8, 1, 1, 50, 64, 64, torch.float32, id="w1-decode-gqa8-f32"),
    pytest.param(33, 3, 1, 2, 2, 150, 199, 80, 80, torch.float32, id="w33-sinks3-chunk-long-f32"),
    pytest.param(5, 0, 1, 2, 2, 70, 70, 64, 64, torch.bfloat16, id="w5-prefill-gqa1-bf16"),
    pytest.param(9, 2, 1, 4, 1, 40, 117, 80, 64, torch.bfloat16, id="w9-sinks2-chunk-gqa4-dv64-bf16"),
    pytest.param(20, 3, 1, 4, 2, 65, 97, 128, 128, torch.float16, id="w20-sinks3-gqa2-d128-f16"),
]


def _inputs(b, hq, hkv, sq, sk, d, dv, dtype):
    mk = lambda *s: randn(*s, dtype=dtype).to(DEV).requires_grad_()  # noqa: E731
    return mk(b, hq, sq, d), mk(b, hkv, sk, d), mk(b, hkv, sk, dv), randn(hq, dtype=dtype, scale=2.0).to(
        DEV).requires_grad_()


@pytest.mark.parametrize("window,sinks,b,hq,hkv,sq,sk,d,dv,dtype", CASES)
def test_fused_backward_against_oracle(window, sinks, b, hq, hkv, sq, sk, d, dv, dtype):
    pattern = sa.WindowLinear(window, sinks=sinks)
    q, k, v, gate = _inputs(b, hq, hkv, sq, sk, d, dv, dtype)
    plan = sa.plan(q, k, v, pattern, gate=gate, backend="triton")
    assert plan.kernel.name == KERNEL and plan.problem.phase == "training"
    check_against_oracle(
        lambda q, k, v, gate: sa.attention(q, k, v, pattern, gate=gate, backend="triton"),
        lambda q, k, v, gate: oracle.oracle_attention(q, k, v, pattern, gate=gate),
        lambda q, k, v, gate: oracle.masked_attention_in_dtype(q, k, v, pattern, gate=gate),
        dict(q=q, k=k, v=v, gate=gate), dtype=dtype, device=DEV)


def test_linear_part_carries_gradient():
    """With gate = -40 only the linear memory is left: its gradients alone must match (a kernel
    that dropped the linear part's backward would still pass where the softmax part dominates)."""
    pattern = sa.WindowLinear(6, sinks=1)
    q, k, v, _ = _inputs(1, 4, 2, 45, 77, 64, 48, torch.float32)
    gate = torch.full((4,), -40.0, device=DEV)
    check_against_oracle(
        lambda q, k, v: sa.attention(q, k, v, pattern, gate=gate, backend="triton"),
        lambda q, k, v: oracle.oracle_attention(q, k, v, pattern, gate=gate.double()),
        None, dict(q=q, k=k, v=v), dtype=torch.float32, device=DEV)


def test_only_some_inputs_require_grad_and_deterministic():
    pattern = sa.WindowLinear(8, sinks=2)
    q, k, v, gate = _inputs(1, 4, 2, 30, 53, 64, 64, torch.float32)
    k, v = k.detach(), v.detach()
    go = randn(1, 4, 30, 64).to(DEV)
    g1 = torch.autograd.grad(sa.attention(q, k, v, pattern, gate=gate, backend="triton"), [q, gate], go)
    g2 = torch.autograd.grad(sa.attention(q, k, v, pattern, gate=gate, backend="triton"), [q, gate], go)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)  # no atomics: bitwise the same
    q64, g64 = q.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    ref = torch.autograd.grad(oracle.oracle_attention(q64, k.double(), v.double(), pattern, gate=g64),
                              [q64, g64], go.double())
    for name, a, r in zip(("dq", "dgate"), g1, ref):
        oracle.assert_close_contract(a, r, dtype=torch.float32, device=DEV, what=name)
    # the gate alone
    (dg,) = torch.autograd.grad(sa.attention(q.detach(), k, v, pattern, gate=gate, backend="triton"), [gate], go)
    oracle.assert_close_contract(dg, ref[1], dtype=torch.float32, device=DEV, what="dgate alone")


def test_empty_inputs_backward():
    pattern = sa.WindowLinear(4)
    q, k, v, gate = _inputs(1, 2, 1, 0, 9, 64, 64, torch.float32)
    out = sa.attention(q, k, v, pattern, gate=gate, backend="triton")
    assert out.shape == (1, 2, 0, 64)
    dq, dk, dv, dg = torch.autograd.grad(out.sum(), [q, k, v, gate], allow_unused=True)
    for x in (dk, dv, dg):
        assert x is None or not x.any()


def test_scheduler_reports_fused_training():
    pattern = sa.WindowLinear(8, sinks=1)
    q, k, v, gate = _inputs(1, 2, 2, 20, 20, 64, 64, torch.float32)
    plan = sa.plan(q, k, v, pattern, gate=gate, backend="triton")
    text = plan.explain()
    assert plan.kernel.name == KERNEL and "training" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if KERNEL in line)
    assert "chosen" in row and "no backward" not in row
    if DEV == "cpu":  # the interpreter is never the automatic choice
        assert sa.plan(q, k, v, pattern, gate=gate).kernel.backend == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_gate_gradient_of_a_training_loss(dtype):
    """`loss.backward()` on a non-linear loss fills `gate.grad` (and q/k/v's) like the float64 oracle."""
    pattern = sa.WindowLinear(5, sinks=1)
    q, k, v, gate = _inputs(1, 2, 1, 24, 24, 64, 64, dtype)
    sa.attention(q, k, v, pattern, gate=gate, backend="triton").float().square().sum().backward()
    ins = [x.detach().double().requires_grad_() for x in (q, k, v, gate)]
    oracle.oracle_attention(*ins[:3], pattern, gate=ins[3]).square().sum().backward()
    for name, x, r in zip(("dq", "dk", "dv", "dgate"), (q, k, v, gate), ins):
        oracle.assert_close_contract(x.grad, r.grad, dtype=dtype, device=DEV, what=name)


@pytest.mark.parametrize("gate_value", [None, -40.0], ids=["mixed", "linear-only"])
def test_split_backward_against_oracle(monkeypatch, gate_value):
    """On the GPU above D=64 the backward runs the softmax part alone, then the linear part per Dv
    tile with partial dq / dk sums (`_linear_tile`); the same split, forced here with 16-column tiles
    over Dv = 40 (three tiles, the last partial), meets the oracle, the linear part alone included."""
    from sparse_attn.backends.triton import linear_window as tw
    asked = []
    monkeypatch.setattr(tw, "_linear_tile", lambda q, bd, bdv: asked.append(bdv) or 16)
    pattern = sa.WindowLinear(9, sinks=2)
    q, k, v, gate = _inputs(1, 4, 2, 41, 70, 32, 40, torch.float32)
    if gate_value is not None:
        gate = torch.full((4,), gate_value, device=DEV)
    check_against_oracle(
        lambda q, k, v: sa.attention(q, k, v, pattern, gate=gate, backend="triton"),
        lambda q, k, v: oracle.oracle_attention(q, k, v, pattern, gate=gate.detach().double()),
        None, dict(q=q, k=k, v=v), dtype=torch.float32, device=DEV)
    assert asked, "the backward did not ask _linear_tile"
