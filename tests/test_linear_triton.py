"""The Triton linear-attention kernels (forward, backward: dq, dk, dv, d(decay), d(initial_state))
against the float64 step-by-step recurrence. On a CPU-only machine they run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1), so sizes stay small; on a GPU the same tests run compiled."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import DTYPE_IDS, TRITON_DEVICE, check_against_oracle, randn
from sparse_attn.api.linear import plan_linear

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)

DEV = TRITON_DEVICE
F32_BOUND_DEVICE = DEV  # float32 on a GPU runs tf32 products: the contract's GPU bound


def make_decay(kind, b, h, s, dtype, lo=-2.0, hi=0.0):
    if kind == "none":
        return None
    shape = (h,) if kind == "per-head" else (b, h, s)
    return (lo + (hi - lo) * torch.rand(shape)).to(dtype).to(DEV).requires_grad_()


def leaf(x):
    return x.to(DEV).detach().requires_grad_(x.requires_grad)


CASES = [  # (dtype, decay, B, H, Hkv, S, D, Dv, state)
    (torch.float32, "none", 1, 2, 2, 37, 16, 16, "none"),
    (torch.float32, "per-head", 2, 2, 1, 70, 32, 24, "init"),
    (torch.float32, "per-token", 1, 4, 2, 100, 64, 64, "init"),
    (torch.float32, "per-token", 1, 2, 2, 33, 80, 48, "none"),
    (torch.float32, "per-head", 1, 8, 1, 1, 16, 16, "init"),        # one token (decode shape), GQA 8
    (torch.bfloat16, "per-token", 1, 2, 2, 65, 32, 32, "init"),
    (torch.float16, "per-head", 1, 2, 2, 49, 16, 80, "none"),     # Dv over two 64-column tiles
    (torch.float16, "none", 2, 2, 2, 161, 16, 16, "init"),
]


def cid(c):
    return f"{DTYPE_IDS[c[0]]}-{c[1]}-b{c[2]}h{c[3]}kv{c[4]}-s{c[5]}-d{c[6]}dv{c[7]}-{c[8]}"


@pytest.mark.parametrize("case", CASES, ids=[cid(c) for c in CASES])
def test_triton_linear_against_recurrence(case):
    dtype, kind, b, h, hkv, s, d, dv, st = case
    q = leaf(randn(b, h, s, d, dtype=dtype, requires_grad=True))
    k = leaf(randn(b, hkv, s, d, dtype=dtype, requires_grad=True))
    v = leaf(randn(b, hkv, s, dv, dtype=dtype, requires_grad=True))
    decay = make_decay(kind, b, h, s, dtype)
    s0 = leaf(randn(b, h, d, dv, requires_grad=True)) if st == "init" else None
    got = {}

    def run(q, k, v, decay, s0):
        o, got["state"] = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True,
                                              backend="triton")
        return o + 0.0 * got["state"].sum()  # the state's gradient path runs too (with a zero cotangent)

    def ref(q, k, v, decay, s0):
        if k.shape[1] != q.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        return oracle.oracle_linear_attention(q.cpu(), k.cpu(), v.cpu(), decay=None if decay is None else decay.cpu(),
                                              initial_state=None if s0 is None else s0.cpu())[0]

    def base(q, k, v, decay, s0):
        if k.shape[1] != q.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        return oracle.masked_linear_attention_in_dtype(q, k, v, decay=decay, initial_state=s0).cpu()

    check_against_oracle(lambda **kw: run(**kw).cpu(), ref, base, dict(q=q, k=k, v=v, decay=decay, s0=s0),
                         dtype=dtype, device=F32_BOUND_DEVICE)
    kk, vv = (x.repeat_interleave(h // hkv, dim=1) for x in (k, v))
    _, ref_state = oracle.oracle_linear_attention(q.cpu(), kk.cpu(), vv.cpu(),
                                                  decay=None if decay is None else decay.cpu(),
                                                  initial_state=None if s0 is None else s0.cpu())
    assert got["state"].dtype == torch.float32
    oracle.assert_close_contract(got["state"].cpu(), ref_state, dtype=dtype, device=DEV, out_dtype=torch.float32,
                                 what="final state")


def test_triton_state_gradient_and_handoff():
    """A loss on the returned state: d(q, k, v, decay, initial_state) through it; and two calls
    handing the state on equal one call."""
    b, h, s, d, dv = 1, 2, 90, 16, 32
    q, k = (leaf(randn(b, h, s, d, requires_grad=True)) for _ in range(2))
    v = leaf(randn(b, h, s, dv, requires_grad=True))
    decay = make_decay("per-token", b, h, s, torch.float32, lo=-1.0)
    s0 = leaf(randn(b, h, d, dv, requires_grad=True))
    w = randn(b, h, d, dv).to(DEV)
    check_against_oracle(
        lambda q, k, v, decay, s0: sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True,
                                                       backend="triton")[1].cpu() * w.cpu(),
        lambda q, k, v, decay, s0: oracle.oracle_linear_attention(
            q.cpu(), k.cpu(), v.cpu(), decay=decay.cpu(), initial_state=s0.cpu())[1] * w.cpu().double(),
        None, dict(q=q, k=k, v=v, decay=decay, s0=s0), dtype=torch.float32, device=DEV)
    with torch.no_grad():
        whole, st_whole = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True,
                                              backend="triton")
        o1, st1 = sa.linear_attention(q[:, :, :41], k[:, :, :41], v[:, :, :41], decay=decay[:, :, :41],
                                      initial_state=s0, return_state=True, backend="triton")
        o2, st2 = sa.linear_attention(q[:, :, 41:], k[:, :, 41:], v[:, :, 41:], decay=decay[:, :, 41:],
                                      initial_state=st1, return_state=True, backend="triton")
    oracle.assert_close_contract(torch.cat([o1, o2], 2).cpu(), whole.cpu(), dtype=torch.float32, device=DEV)
    oracle.assert_close_contract(st2.cpu(), st_whole.cpu(), dtype=torch.float32, device=DEV, what="state")


@pytest.mark.parametrize("g", [-30.0, -80.0, "mixed"])
def test_triton_extreme_decays(g):
    """Cumulative decays underflow inside a chunk: no inf / NaN, and d(decay) keeps its relative
    accuracy although its true value is ~exp(g) (the diagonal terms are kept out of it)."""
    b, h, s, d = 1, 2, 75, 16
    q, k, v = (leaf(randn(b, h, s, d, requires_grad=True)) for _ in range(3))
    if g == "mixed":
        decay = torch.where(torch.rand(b, h, s) < 0.1, torch.tensor(-60.0), torch.tensor(0.0))
    else:
        decay = torch.full((b, h, s), g)
    decay = leaf(decay.requires_grad_())
    check_against_oracle(
        lambda q, k, v, decay: sa.linear_attention(q, k, v, decay=decay, backend="triton").cpu(),
        lambda q, k, v, decay: oracle.oracle_linear_attention(q.cpu(), k.cpu(), v.cpu(), decay=decay.cpu())[0],
        None, dict(q=q, k=k, v=v, decay=decay), dtype=torch.float32, device=DEV)


def test_triton_scheduler_choice_and_refusals():
    q, k, v = (randn(1, 2, 40, 16).to(DEV) for _ in range(3))
    p = plan_linear(q, k, v)
    text = p.explain()
    assert "triton.linear_chunked" in text
    if DEV == "cpu":  # the interpreter is correct but slow: never chosen unless asked for
        assert p.kernel.backend != "triton"
    assert plan_linear(q, k, v, backend="triton").kernel.name == "triton.linear_chunked"
    with pytest.raises(ValueError, match="dtype float64"):
        sa.linear_attention(q.double(), k.double(), v.double(), backend="triton")
    e = sa.linear_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], backend="triton", return_state=True)
    assert e[0].shape == (1, 2, 0, 16) and (e[1] == 0).all()


def test_triton_two_pass_reverse_sweep_equals_one_pass(monkeypatch):
    """On the GPU at D > 64 the reverse sweep runs twice (dv + d(initial state), then dk + its decay
    part: one program holding both spilled on sm_80); the same split, forced here, gives the gradients
    of the one-pass sweep exactly (the passes compute the same float32 sums in the same order)."""
    from sparse_attn.backends.triton import linear as tlin
    b, h, s, d, dv = 1, 2, 45, 32, 24
    base = [randn(b, h, s, d), randn(b, h, s, d), randn(b, h, s, dv)]
    decay = (-torch.rand(b, h, s)).to(DEV)
    s0 = randn(b, h, d, dv).to(DEV)
    dout, dst = randn(b, h, s, dv).to(DEV), randn(b, h, d, dv).to(DEV)

    def grads():
        x = [t.to(DEV).detach().requires_grad_() for t in base] + [decay.detach().requires_grad_(),
                                                                   s0.detach().requires_grad_()]
        o, st = sa.linear_attention(*x[:3], decay=x[3], initial_state=x[4], return_state=True, backend="triton")
        torch.autograd.backward([o, st], [dout, dst])
        return [t.grad.cpu() for t in x]

    one = grads()
    calls = []
    monkeypatch.setattr(tlin, "_dkv_passes", lambda q, bd: calls.append(bd) or ((True, False), (False, True)))
    two = grads()
    assert calls, "the launcher did not ask _dkv_passes"
    for name, a, c in zip(("dq", "dk", "dv", "d(decay)", "d(initial_state)"), one, two):
        assert torch.equal(a, c), name
