"""`delta_rule` (the scheduler's choice and the reference backend) against the float64 step-by-step
evaluation of the contract (tests/delta_oracle.py): outputs, final states and the gradients of q, k,
v, beta, decay and initial_state; value heads shared by q/k heads; chained calls; varlen; the plan."""
from __future__ import annotations

import math

import pytest
import torch

import sparse_attn as sa
from conftest import DTYPE_IDS, pairwise, randn
from delta_oracle import delta_bound, oracle_delta_rule
from oracle import rel_err

F64 = torch.float64
BACKENDS = [pytest.param("reference", id="ref"), pytest.param(None, id="auto")]


def make_inputs(b, hk, hv, s, d, dv, *, dtype=torch.float32, decay="per-token", glo=-2.0, ghi=0.0, blo=0.0,
                bhi=1.0, state=False, grad=False, unit_keys=True):
    """Random delta-rule inputs. Keys of norm ~1 (`unit_keys`: scaled by D^-1/2) keep the
    recurrence contractive for beta in [0, 1], the documented range (DESIGN-NOTES §8)."""
    q = randn(b, hk, s, d, dtype=dtype)
    k = randn(b, hk, s, d, dtype=torch.float32) * (d ** -0.5 if unit_keys else 1.0)
    k = k.to(dtype)
    v = randn(b, hv, s, dv, dtype=dtype)
    beta = (blo + (bhi - blo) * torch.rand(b, hv, s)).to(dtype)
    g = None
    if decay == "per-token":
        g = (glo + (ghi - glo) * torch.rand(b, hv, s)).to(dtype)
    elif decay == "per-channel":
        g = (glo + (ghi - glo) * torch.rand(b, hv, s, d)).to(dtype)
    s0 = randn(b, hv, d, dv, dtype=F64 if dtype == F64 else torch.float32) if state else None
    ins = dict(q=q, k=k, v=v, beta=beta, decay=g, initial_state=s0)
    if grad:
        for x in ins.values():
            if x is not None:
                x.requires_grad_()
    return ins


def check(out, ref, dtype, what):
    assert torch.isfinite(out.detach().to(F64)).all(), f"{what}: NaN or inf"
    err = rel_err(out, ref)
    assert err <= delta_bound(dtype), f"{what}: relative error {err:.2e} > {delta_bound(dtype):.0e} ({dtype})"
    return err


def run_and_compare(ins, *, dtype, backend, qk_l2norm=False, scale=None, grads=True):
    """delta_rule vs the oracle: output, state and (if inputs require grad) every gradient."""
    o, st = sa.delta_rule(**ins, scale=scale, return_state=True, qk_l2norm=qk_l2norm, backend=backend)
    assert o.dtype == dtype and st.dtype == (F64 if dtype == F64 else torch.float32)
    ins64 = {n: None if x is None else x.detach().to(F64).requires_grad_(x.requires_grad) for n, x in ins.items()}
    o64, st64 = oracle_delta_rule(**ins64, scale=scale, qk_l2norm=qk_l2norm)
    check(o, o64, dtype, "output")
    check(st, st64, dtype, "state")
    names = [n for n, x in ins.items() if x is not None and x.requires_grad]
    if grads and names:
        go = randn(*o.shape, dtype=dtype)
        gs = randn(*st.shape, dtype=st.dtype)
        got = torch.autograd.grad((o, st), [ins[n] for n in names], (go, gs))
        want = torch.autograd.grad((o64, st64), [ins64[n] for n in names], (go.to(F64), gs.to(F64)))
        for n, gp, gr in zip(names, got, want):
            assert gp.dtype == ins[n].dtype, (n, gp.dtype)
            check(gp, gr, dtype, f"d{n}")
    return o, st


AXES = {
    "dtype": [torch.float32, torch.bfloat16, torch.float64, torch.float16],
    "decay": ["none", "per-token", "per-channel"],
    "s": [1, 37, 100],
    "heads": [(2, 2), (2, 4), (1, 4)],
    "state": [False, True],
    "l2": [False, True],
}
CASES = pairwise(AXES) + [dict(dtype=torch.float32, decay="per-channel", s=70, heads=(2, 4), state=True, l2=True,
                               d=32, dv=24, scale=0.3)]


def case_id(c):
    hk, hv = c["heads"]
    return (f"{DTYPE_IDS[c['dtype']]}-{c['decay']}-s{c['s']}-hk{hk}hv{hv}-{'s0' if c['state'] else 'nos0'}"
            f"{'-l2' if c['l2'] else ''}{'-d%d' % c['d'] if 'd' in c else ''}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_delta_rule_matrix(case, backend):
    hk, hv = case["heads"]
    d, dv = case.get("d", 16), case.get("dv", 16)
    ins = make_inputs(2, hk, hv, case["s"], d, dv, dtype=case["dtype"], decay=case["decay"], state=case["state"],
                      grad=True, unit_keys=not case["l2"])
    run_and_compare(ins, dtype=case["dtype"], backend=backend, qk_l2norm=case["l2"], scale=case.get("scale"))


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("decay", ["none", "per-token", "per-channel"])
def test_chunked_and_recurrent_forms_agree(decay, form):
    """Both reference forms against the oracle and each other, at a length not a multiple of the chunk."""
    from sparse_attn.backends.reference.delta import delta_rule_chunked, delta_rule_recurrent
    ins = make_inputs(1, 2, 4, 83, 16, 8, decay=decay, state=True)
    fn = delta_rule_chunked if form == "chunked" else delta_rule_recurrent
    o, st = fn(**ins, scale=0.25)
    other = delta_rule_recurrent if form == "chunked" else delta_rule_chunked
    o2, st2 = other(**ins, scale=0.25)
    o64, st64 = oracle_delta_rule(**ins, scale=0.25)
    check(o, o64, torch.float32, "output")
    check(st, st64, torch.float32, "state")
    assert rel_err(o, o2) <= 1e-4 and rel_err(st, st2) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("glo,ghi,blo,bhi", [(-0.01, 0.0, 0.95, 1.0), (-5.0, -4.5, 0.0, 0.05)],
                         ids=["decay~0-beta~1", "decay~-5-beta~0"])
@pytest.mark.parametrize("decay", ["per-token", "per-channel"])
def test_reference_long_sequence(decay, glo, ghi, blo, bhi):
    """1K+ tokens with the contract's extreme regimes (the 4K case runs on the CPU kernel)."""
    s = 1100 if decay == "per-token" else 600
    ins = make_inputs(1, 1, 2, s, 16, 16, decay=decay, glo=glo, ghi=ghi, blo=blo, bhi=bhi, state=True)
    with torch.no_grad():
        run_and_compare(ins, dtype=torch.float32, backend="reference", qk_l2norm=True, grads=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay", ["none", "per-token", "per-channel"])
def test_chained_calls_equal_one_call(decay, backend):
    ins = make_inputs(1, 2, 4, 150, 16, 16, decay=decay, state=True)
    o, st = sa.delta_rule(**ins, return_state=True, backend=backend)
    cuts = [0, 1, 64, 65, 100, 150]
    state, outs = ins["initial_state"], []
    for a, z in zip(cuts, cuts[1:]):
        part = {n: None if x is None or n == "initial_state" else x[:, :, a:z] for n, x in ins.items()}
        part["initial_state"] = state
        oi, state = sa.delta_rule(**part, return_state=True, backend=backend)
        outs.append(oi)
    assert rel_err(torch.cat(outs, dim=2), o) <= 1e-5
    assert rel_err(state, st) <= 1e-5
    o64, st64 = oracle_delta_rule(**ins)
    check(torch.cat(outs, dim=2), o64, torch.float32, "chained output")


@pytest.mark.parametrize("decay", ["none", "per-token", "per-channel"])
def test_varlen_equals_per_sequence(decay):
    lens = [5, 0, 70, 1, 33]
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    t = offs[-1]
    ins = make_inputs(1, 2, 4, t, 16, 8, decay=decay)
    packed = {n: None if x is None else x[0].transpose(0, 1).contiguous() for n, x in ins.items()
              if n != "initial_state"}
    s0 = randn(len(lens), 4, 16, 8)
    cu = torch.tensor(offs, dtype=torch.int32)
    o, st = sa.delta_rule_varlen(packed["q"], packed["k"], packed["v"], packed["beta"], cu, decay=packed["decay"],
                                 initial_state=s0, return_state=True, qk_l2norm=True)
    assert o.shape == (t, 4, 8) and st.shape == (len(lens), 4, 16, 8)
    for i, (a, z) in enumerate(zip(offs, offs[1:])):
        seq = {n: None if x is None else x[:, :, a:z] for n, x in ins.items() if n != "initial_state"}
        o64, st64 = oracle_delta_rule(**seq, initial_state=s0[i:i + 1], qk_l2norm=True)
        if z > a:
            check(o[a:z].transpose(0, 1)[None], o64, torch.float32, f"sequence {i}")
        check(st[i:i + 1], st64, torch.float32, f"state {i}")


@pytest.mark.parametrize("decay", ["per-token", "per-channel"])
def test_full_reset_and_extreme_decays(decay):
    """A log-decay of -inf is a full reset (never NaN): the output after it equals a fresh start."""
    from sparse_attn.backends.reference.delta import delta_rule_chunked, delta_rule_recurrent
    ins = make_inputs(1, 1, 2, 90, 16, 16, decay=decay, state=True)
    g = ins["decay"].clone()
    g[:, :, 40] = -math.inf
    g[:, :, 41:60] = -80.0
    ins["decay"] = g
    fresh = {n: None if x is None else x[:, :, 40:] for n, x in ins.items() if n != "initial_state"}
    fresh["decay"] = fresh["decay"].clone()
    fresh["decay"][:, :, 0] = 0.0
    for fn in (delta_rule_chunked, delta_rule_recurrent):
        o, st = fn(**ins, scale=0.25)
        assert torch.isfinite(o).all() and torch.isfinite(st).all()
        o2, st2 = fn(**fresh, scale=0.25)
        assert rel_err(o[:, :, 40:], o2) <= 1e-5 and rel_err(st, st2) <= 1e-5
    o, st = sa.delta_rule(**ins, return_state=True)
    o2, st2 = sa.delta_rule(**fresh, return_state=True)
    assert rel_err(o[:, :, 40:], o2) <= 1e-5 and rel_err(st, st2) <= 1e-5


def test_decode_uses_the_recurrent_form_and_plan_explains():
    ins = make_inputs(1, 2, 4, 1, 32, 32, decay="per-channel", state=True)
    p = sa.plan_delta_rule(**ins)
    text = p.explain()
    assert "reference.delta_recurrent" in text and "reference.delta_chunked" in text
    assert p.kernel.name.endswith("recurrent") or p.kernel.backend == "cpu", text
    o, st = p.run(**ins, return_state=True)
    o64, st64 = oracle_delta_rule(**ins)
    check(o, o64, torch.float32, "decode output")
    long = make_inputs(1, 2, 4, 300, 32, 32, decay="per-token")
    pl = sa.plan_delta_rule(**long, backend="reference")
    assert pl.kernel.name == "reference.delta_chunked", pl.explain()
    assert "S=300 > 16" in pl.explain()
    with pytest.raises(ValueError, match="plan was made for"):
        p.run(**make_inputs(1, 2, 4, 2, 32, 32, decay="per-channel", state=True))


def test_empty_inputs():
    for b, s in ((0, 5), (1, 0)):
        ins = make_inputs(b, 1, 2, s, 8, 8, decay="per-token")
        o, st = sa.delta_rule(**ins, return_state=True)
        assert o.shape == (b, 2, s, 8) and st.shape == (b, 2, 8, 8) and not st.any()


def test_bad_inputs_name_the_argument():
    ins = make_inputs(1, 2, 4, 10, 8, 8, decay="per-token")
    bad = [
        (dict(beta=torch.rand(1, 2, 10)), ValueError, "beta"),
        (dict(decay=torch.rand(1, 4, 9)), ValueError, "decay"),
        (dict(v=torch.randn(1, 3, 10, 8)), ValueError, "value heads"),
        (dict(k=torch.randn(1, 2, 10, 4)), ValueError, "k must have"),
        (dict(initial_state=torch.zeros(1, 4, 8, 7)), ValueError, "initial_state"),
        (dict(q=torch.randn(1, 2, 10, 8, dtype=F64)), TypeError, "share one dtype"),
        (dict(beta=[1.0]), TypeError, "beta"),
        (dict(decay=torch.zeros(1, 4, 10, dtype=torch.int64)), TypeError, "decay"),
    ]
    for change, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            sa.delta_rule(**{**ins, **change})
    with pytest.raises(TypeError, match="qk_l2norm"):
        sa.delta_rule(**ins, qk_l2norm=1)
    with pytest.raises(ValueError, match="backend"):
        sa.delta_rule(**ins, backend="tpu")
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed = [x[0].transpose(0, 1) for x in (ins["q"], ins["k"], ins["v"], ins["beta"])]
    with pytest.raises(ValueError, match="cu_seqlens"):
        sa.delta_rule_varlen(*packed, cu)
