"""The Triton delta-rule kernels (backends/triton/delta.py: the chunked forward and the decode step)
against the float64 step-by-step evaluation (tests/delta_oracle.py): outputs and final states for
every decay kind, value heads shared by q/k heads, odd lengths and head dims, initial states,
qk_l2norm, float32 / bfloat16 / float16, varlen, chained calls, extreme decays and `-inf` resets,
and the scheduler's declarations. On a CPU-only machine they run in Triton's interpreter (conftest
sets TRITON_INTERPRET=1), so sizes stay small; on a GPU the same tests run compiled."""
from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from conftest import DTYPE_IDS, TRITON_DEVICE
from delta_oracle import oracle_delta_rule
from test_delta_rule import check, make_inputs, run_and_compare

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)

DEV = TRITON_DEVICE


def _on(ins):
    return {n: None if x is None else x.to(DEV) for n, x in ins.items()}


def _compare(ins, *, dtype, qk_l2norm=False, scale=None, backend="triton", bound_dtype=None):
    o, st = sa.delta_rule(**_on(ins), scale=scale, return_state=True, qk_l2norm=qk_l2norm, backend=backend)
    assert o.dtype == dtype and st.dtype == torch.float32
    o64, st64 = oracle_delta_rule(**ins, scale=scale, qk_l2norm=qk_l2norm)
    bd = bound_dtype or (dtype if dtype != torch.float32 or DEV == "cpu" else torch.bfloat16)
    check(o.cpu(), o64, bd, "output")
    check(st.cpu(), st64, bd, "state")
    return o, st


# (dtype, decay, (Hk, Hv), S, (D, Dv), initial state, qk_l2norm, gradients)
CASES = [
    (torch.float32, "none", (2, 2), 37, (16, 24), False, False, True),
    (torch.float32, "per-token", (1, 4), 50, (32, 16), True, True, False),
    (torch.float32, "per-token", (1, 2), 21, (16, 8), True, True, True),
    (torch.float32, "per-channel", (2, 4), 33, (20, 12), True, False, False),   # D, Dv not powers of two
    (torch.float32, "per-channel", (1, 2), 19, (16, 8), True, False, True),
    (torch.float32, "per-token", (2, 2), 1, (16, 16), True, False, False),      # one token, chunked form
    (torch.bfloat16, "per-channel", (1, 2), 40, (16, 16), False, True, True),
    (torch.float16, "per-token", (2, 4), 29, (16, 80), True, True, False),      # Dv over two 64-column tiles
]


def cid(c):
    dtype, kind, (hk, hv), s, (d, dv), s0, l2, grad = c
    return (f"{DTYPE_IDS[dtype]}-{kind}-hk{hk}hv{hv}-s{s}-d{d}dv{dv}{'-s0' if s0 else ''}{'-l2' if l2 else ''}"
            f"{'-grad' if grad else ''}")


@pytest.mark.parametrize("case", CASES, ids=[cid(c) for c in CASES])
def test_triton_delta_chunked(case):
    """The chunked kernel (forward; with gradients, the backward of every input through the output
    and the returned state) against the oracle."""
    dtype, kind, (hk, hv), s, (d, dv), s0, l2, grad = case
    ins = make_inputs(1, hk, hv, s, d, dv, dtype=dtype, decay=kind, state=s0, unit_keys=not l2)
    if grad:
        ins = {n: None if x is None else x.to(DEV).requires_grad_() for n, x in ins.items()}
        p = sa.plan_delta_rule(**ins, qk_l2norm=l2, backend="triton")
        assert p.kernel.name == "triton.delta_chunked", p.explain()
        run_and_compare(ins, dtype=dtype, backend="triton", qk_l2norm=l2)
        return
    p = sa.plan_delta_rule(**_on(ins), qk_l2norm=l2, backend="triton")
    assert p.kernel.name == ("triton.delta_step" if s <= 16 else "triton.delta_chunked"), p.explain()
    from sparse_attn.backends.triton.delta import triton_delta_chunked
    o, st = triton_delta_chunked(**_on(ins), scale=d ** -0.5, qk_l2norm=l2)
    o64, st64 = oracle_delta_rule(**ins, qk_l2norm=l2)
    bd = dtype if dtype != torch.float32 or DEV == "cpu" else torch.bfloat16
    assert o.dtype == dtype
    check(o.cpu(), o64, bd, "output")
    check(st.cpu(), st64, bd, "state")


@pytest.mark.parametrize("decay", ["none", "per-token", "per-channel"])
def test_triton_delta_step(decay):
    """The decode kernel: 1 and 3 tokens on a state, GQA-style value heads, qk_l2norm, bfloat16 too."""
    for s, dtype in ((1, torch.float32), (3, torch.bfloat16)):
        ins = make_inputs(2, 1, 2, s, 32, 24, dtype=dtype, decay=decay, state=True)
        p = sa.plan_delta_rule(**_on(ins), qk_l2norm=True, scale=0.2, backend="triton")
        assert p.kernel.name == "triton.delta_step", p.explain()
        _compare(ins, dtype=dtype, qk_l2norm=True, scale=0.2)


def test_triton_delta_extreme_decays_and_resets():
    """Decays near -5 with beta near 1 (per channel), and `-inf` resets mid-chunk (per token)."""
    ins = make_inputs(1, 1, 2, 45, 16, 16, decay="per-channel", glo=-5.0, ghi=-4.5, blo=0.95, bhi=1.0, state=True)
    _compare(ins, dtype=torch.float32)
    ins = make_inputs(1, 1, 2, 40, 16, 16, decay="per-token", glo=-0.01, ghi=0.0, blo=0.0, bhi=0.05, state=True)
    ins["decay"][:, :, 7] = float("-inf")
    ins["decay"][:, 1, 20] = float("-inf")
    o, _ = _compare(ins, dtype=torch.float32)
    assert torch.isfinite(o).all()


def test_triton_delta_chained_calls_equal_one_call():
    ins = make_inputs(1, 1, 2, 50, 16, 16, decay="per-token", state=True)
    o, st = sa.delta_rule(**_on(ins), return_state=True, backend="triton")
    first = {n: None if x is None else (x if n == "initial_state" else x[:, :, :31]) for n, x in ins.items()}
    rest = {n: None if x is None else x[:, :, 31:] for n, x in ins.items() if n != "initial_state"}
    o1, s1 = sa.delta_rule(**_on(first), return_state=True, backend="triton")
    o2, s2 = sa.delta_rule(**_on(rest), initial_state=s1, return_state=True, backend="triton")
    o64, st64 = oracle_delta_rule(**ins)
    check(torch.cat([o1, o2], dim=2).cpu(), o64, torch.float32, "chained output")
    check(s2.cpu(), st64, torch.float32, "chained state")
    assert (torch.cat([o1, o2], dim=2) - o).abs().max() <= 1e-5 * o.abs().max()


def test_triton_delta_varlen_equals_per_sequence():
    torch.manual_seed(3)
    lens = [19, 1, 33]
    t, hk, hv, d, dv = sum(lens), 1, 2, 16, 16
    q = torch.randn(t, hk, d)
    k = torch.randn(t, hk, d) * d ** -0.5
    v = torch.randn(t, hv, dv)
    beta = torch.rand(t, hv)
    g = -torch.rand(t, hv, d)
    s0 = torch.randn(len(lens), hv, d, dv)
    cu = torch.tensor([0, 19, 20, 53], dtype=torch.int32)
    o, st = sa.delta_rule_varlen(*(x.to(DEV) for x in (q, k, v, beta)), cu.to(DEV), decay=g.to(DEV),
                                 initial_state=s0.to(DEV), return_state=True, backend="triton")
    for i, (a, z) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        def seq(x):
            return x[a:z].transpose(0, 1)[None]
        o64, st64 = oracle_delta_rule(seq(q), seq(k), seq(v), seq(beta), decay=seq(g), initial_state=s0[i:i + 1])
        check(o[a:z].transpose(0, 1)[None].cpu(), o64, torch.float32, f"output of sequence {i}")
        check(st[i:i + 1].cpu(), st64, torch.float32, f"state of sequence {i}")


def test_triton_delta_declarations():
    """The decode step has no backward and the kernels stop at D = 256: the plan says why not."""
    ins = make_inputs(1, 1, 2, 5, 16, 16, decay="per-token", grad=True)
    text = sa.plan_delta_rule(**_on(ins), backend="triton").explain()
    assert "chosen: triton.delta_chunked" in text and "no backward pass" in text, text
    big = make_inputs(1, 1, 1, 20, 264, 16)
    text = sa.plan_delta_rule(**_on(big)).explain()
    assert "head dims 264/16 outside [1, 256]" in text, text
