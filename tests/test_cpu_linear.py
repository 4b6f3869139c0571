"""`cpu.linear_chunked`'s backward (csrc/cpu/linear.cpp `linear_bwd`, the autograd.Function in
sparse_attn/backends/cpu/linear.py) against the float64 recurrence of tests/oracle.py: dq, dk, dv,
d(decay) (none / per-head `(H,)` / per-token `(B, H, S)`), d(initial_state) and the gradient that
flows in through the returned final state; GQA read in place (Hq = 4 over Hkv = 4, 2, 1); lengths
around the chunk (32) and not multiples of it; strong decays over 1K tokens; float32, bfloat16 and float16
inputs; and the scheduler's choice of this kernel for training."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import DTYPE_IDS, check_against_oracle, pairwise, randn
from sparse_attn.api.linear import plan_linear
from sparse_attn.backends.cpu.linear import CHUNK, CpuLinearChunked

F64 = torch.float64
MISSING = CpuLinearChunked().unavailable()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"cpu_linear: {MISSING}")


def make_decay(kind, b, h, s, lo, hi=0.0, dtype=torch.float32):
    """Log-decays uniform in [lo, hi]: None, `(H,)` or `(B, H, S)`, requiring grad."""
    if kind == "none":
        return None
    shape = (h,) if kind == "per-head" else (b, h, s)
    return (lo + (hi - lo) * torch.rand(shape)).to(dtype).requires_grad_()


def expand_kv(x, h):
    return x.repeat_interleave(h // x.shape[1], dim=1)


class threads:
    """torch's intra-op thread count inside the block (only around the kernel: the oracle's many
    small ops crawl with more threads than cores)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def check_with_state(q, k, v, decay, s0, *, what="", nthreads=None):
    """float32: loss = <o, go> + <state, gs> through `linear_attention(backend="cpu")` (with
    `nthreads` threads); every gradient (q, k, v, decay, s0) against the float64 recurrence's."""
    h = q.shape[1]
    ins = {n: x for n, x in dict(q=q, k=k, v=v, decay=decay, s0=s0).items() if x is not None and x.requires_grad}
    with threads(nthreads or torch.get_num_threads()):
        o, st = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True, backend="cpu")
        go, gs = randn(*o.shape), randn(*st.shape)
        grads = torch.autograd.grad((o * go).sum() + (st * gs).sum(), list(ins.values()))
    i64 = {n: x.detach().to(F64).requires_grad_() for n, x in ins.items()}
    full = {n: i64.get(n, None if x is None else x.detach().to(F64))
            for n, x in dict(q=q, k=k, v=v, decay=decay, s0=s0).items()}
    o64, st64 = oracle.oracle_linear_attention(full["q"], expand_kv(full["k"], h), expand_kv(full["v"], h),
                                               decay=full["decay"], initial_state=full["s0"])
    g64 = torch.autograd.grad((o64 * go.to(F64)).sum() + (st64 * gs.to(F64)).sum(), list(i64.values()))
    oracle.assert_close_contract(o, o64, dtype=torch.float32, device="cpu", what=f"{what} output")
    oracle.assert_close_contract(st, st64, dtype=torch.float32, device="cpu", what=f"{what} state")
    for (n, x), g, r in zip(ins.items(), grads, g64):
        oracle.assert_close_contract(g, r, dtype=x.dtype, device="cpu", what=f"{what} d{n}")


# ----------------------------------------------------------------------------------------------
# the matrix: output-only loss (check_against_oracle; bfloat16 against its in-dtype baseline)
# ----------------------------------------------------------------------------------------------
AXES = {
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "decay": ["none", "per-head", "per-token"],
    "s": [1, 31, 33, 100],  # around the chunk (32), and not multiples of it
    "hkv": [4, 2, 1],  # Hq = 4: no GQA, groups of 2, one shared kv head
    "state": ["none", "init"],
    "dims": [(16, 16), (20, 24), (64, 80)],  # (D, Dv): not multiples of the vector width too
}
CASES = pairwise(AXES)


def case_id(c):
    return f"{DTYPE_IDS[c['dtype']]}-{c['decay']}-s{c['s']}-hkv{c['hkv']}-{c['state']}-d{c['dims'][0]}x{c['dims'][1]}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_cpu_linear_backward_matrix(case):
    dtype, s, hkv, (d, dv) = case["dtype"], case["s"], case["hkv"], case["dims"]
    b, h = 2, 4
    q = randn(b, h, s, d, dtype=dtype, requires_grad=True)
    k, v = randn(b, hkv, s, d, dtype=dtype, requires_grad=True), randn(b, hkv, s, dv, dtype=dtype, requires_grad=True)
    decay = make_decay(case["decay"], b, h, s, lo=-1.0)
    s0 = randn(b, h, d, dv, requires_grad=True) if case["state"] == "init" else None
    p = plan_linear(q, k, v, decay=decay, initial_state=s0)
    assert p.problem.phase == "training"
    if s > 1:  # (one token: the recurrent kernel's cost model ranks it first)
        assert p.kernel.name == "cpu.linear_chunked", p.explain()

    def run(q, k, v, decay, s0):
        return sa.linear_attention(q, k, v, decay=decay, initial_state=s0, backend="cpu")

    def ref(q, k, v, decay, s0):
        return oracle.oracle_linear_attention(q, expand_kv(k, h), expand_kv(v, h), decay=decay, initial_state=s0)[0]

    def base(q, k, v, decay, s0):
        return oracle.masked_linear_attention_in_dtype(q, expand_kv(k, h), expand_kv(v, h), decay=decay,
                                                       initial_state=s0)

    out = check_against_oracle(run, ref, base, dict(q=q, k=k, v=v, decay=decay, s0=s0), dtype=dtype)
    assert out.shape == (b, h, s, dv) and out.dtype == dtype


# ----------------------------------------------------------------------------------------------
# the final state's gradient, chained calls, strong decays and long sequences (float32)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("s", [1, 31, 33, 100])
def test_cpu_linear_backward_through_state(s, hkv, decay_kind):
    b, h, d, dv = 2, 4, 16, 24
    q, k, v = (randn(b, n, s, x, requires_grad=True) for n, x in ((h, d), (hkv, d), (hkv, dv)))
    decay = make_decay(decay_kind, b, h, s, lo=-1.0)
    s0 = randn(b, h, d, dv, requires_grad=True)
    check_with_state(q, k, v, decay, s0)


@pytest.mark.parametrize("kind,lo,hi", [
    pytest.param("per-token", -5.5, -4.5, id="per-token-near-minus5"),
    pytest.param("per-head", -5.2, -4.8, id="per-head-near-minus5"),
    pytest.param("per-token", -1e-3, 0.0, id="per-token-near-0"),
    pytest.param("per-head", -1e-3, -1e-4, id="per-head-near-0"),
    pytest.param("none", 0.0, 0.0, id="none"),
])
def test_cpu_linear_backward_long(kind, lo, hi):
    """1024 tokens (32 chunks), strong and weak decays: every exponent stays relative to a chunk,
    and d(decay) must not degrade with the length."""
    b, h, hkv, s, d, dv = 1, 2, 1, 1024, 16, 16
    q, k, v = (randn(b, n, s, x, requires_grad=True) for n, x in ((h, d), (hkv, d), (hkv, dv)))
    decay = make_decay(kind, b, h, s, lo=lo, hi=hi)
    check_with_state(q, k, v, decay, randn(b, h, d, dv, requires_grad=True))


@pytest.mark.parametrize("g", [-30.0, -80.0, "mixed"])
def test_cpu_linear_backward_extreme_decays(g):
    """exp of a cumulative decay underflows within a chunk: gradients stay finite and exact."""
    b, h, s, d = 1, 2, 333, 16
    q, k, v = (randn(b, h, s, d, requires_grad=True) for _ in range(3))
    if g == "mixed":  # long stretches of no decay broken by near-resets
        decay = torch.where(torch.rand(b, h, s) < 0.1, torch.tensor(-60.0), torch.tensor(0.0))
    else:
        decay = torch.full((b, h, s), g)
    check_with_state(q, k, v, decay.requires_grad_(), None)


def test_cpu_linear_backward_chained_calls():
    """Two calls handing the state on, differentiated through the hand-over, equal one long call."""
    b, h, hkv, s, d, dv, cut = 1, 4, 2, 150, 16, 24, 70
    q, k, v = (randn(b, n, s, x) for n, x in ((h, d), (hkv, d), (hkv, dv)))
    decay = make_decay("per-token", b, h, s, lo=-1.0).detach()
    s0 = randn(b, h, d, dv)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, decay, s0)]
    qa, ka, va, da, sa0 = leaves
    o1, st1 = sa.linear_attention(qa[:, :, :cut], ka[:, :, :cut], va[:, :, :cut], decay=da[:, :, :cut],
                                  initial_state=sa0, return_state=True, backend="cpu")
    o2, st2 = sa.linear_attention(qa[:, :, cut:], ka[:, :, cut:], va[:, :, cut:], decay=da[:, :, cut:],
                                  initial_state=st1, return_state=True, backend="cpu")
    go, gs = randn(b, h, s, dv), randn(b, h, d, dv)
    grads = torch.autograd.grad((torch.cat([o1, o2], 2) * go).sum() + (st2 * gs).sum(), leaves)
    l64 = [x.to(F64).requires_grad_() for x in (q, k, v, decay, s0)]
    o64, st64 = oracle.oracle_linear_attention(l64[0], expand_kv(l64[1], h), expand_kv(l64[2], h), decay=l64[3],
                                               initial_state=l64[4])
    g64 = torch.autograd.grad((o64 * go.to(F64)).sum() + (st64 * gs.to(F64)).sum(), l64)
    for n, g, r in zip(("q", "k", "v", "decay", "s0"), grads, g64):
        oracle.assert_close_contract(g, r, dtype=torch.float32, device="cpu", what=f"d{n}")


@pytest.mark.parametrize("b", [2, 1])
def test_cpu_linear_backward_threads_strides_partial_grads(b):
    """Several threads over (batch, kv head) tasks (b = 2: 4 tasks for 3 threads), or over (batch,
    query head) with per-head dk, dv buffers summed after (b = 1: 2 kv heads for 3 threads);
    transposed (non-contiguous) inputs and a non-contiguous output gradient; only some inputs
    require grad."""
    h, hkv, s, d, dv = 4, 2, 77, 32, 48
    q = randn(b, s, h, d).transpose(1, 2).requires_grad_()
    k, v = randn(b, s, hkv, d).transpose(1, 2), randn(b, s, hkv, dv).transpose(1, 2).requires_grad_()
    decay = make_decay("per-head", b, h, s, lo=-0.5)
    s0 = randn(b, h, d, dv)
    with threads(3):
        o = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, backend="cpu")
        go = randn(b, h, dv, s).transpose(-1, -2)  # stride(-1) != 1
        grads = torch.autograd.grad((o * go).sum(), [q, v, decay])
    check_with_state(*(randn(b, n, s, x, requires_grad=True) for n, x in ((h, d), (hkv, d), (hkv, dv))),
                     make_decay("per-token", b, h, s, lo=-1.0), randn(b, h, d, dv, requires_grad=True), nthreads=3)
    l64 = [x.detach().to(F64).requires_grad_() for x in (q, v, decay)]
    o64, _ = oracle.oracle_linear_attention(l64[0], expand_kv(k.to(F64), h), expand_kv(l64[1], h), decay=l64[2],
                                            initial_state=s0)
    g64 = torch.autograd.grad((o64 * go.to(F64)).sum(), l64)
    for n, g, r in zip(("q", "v", "decay"), grads, g64):
        oracle.assert_close_contract(g, r, dtype=torch.float32, device="cpu", what=f"d{n}")


@pytest.mark.parametrize("decay_kind", ["per-head", "per-token"])
def test_cpu_linear_backward_fixed_decay(decay_kind):
    """A decay that does not require grad (the kernel then skips d(decay)), q, k, v that do."""
    b, h, hkv, s, d = 2, 4, 2, 70, 16
    q, k, v = (randn(b, n, s, d, requires_grad=True) for n in (h, hkv, hkv))
    decay = make_decay(decay_kind, b, h, s, lo=-1.0).detach()
    check_with_state(q, k, v, decay, randn(b, h, d, d, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_cpu_linear_backward_dtypes_of_gradients(dtype):
    """Gradients come back in each input's dtype: q, k, v in theirs, a bfloat16 decay in bfloat16, a
    float64 initial state in float64."""
    b, h, s, d = 1, 2, 40, 16
    q, k, v = (randn(b, h, s, d, dtype=dtype, requires_grad=True) for _ in range(3))
    decay = make_decay("per-token", b, h, s, lo=-1.0, dtype=torch.bfloat16)
    s0 = randn(b, h, d, d, dtype=F64, requires_grad=True)
    o, st = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True, backend="cpu")
    assert o.dtype == dtype and st.dtype == torch.float32
    grads = torch.autograd.grad(o.float().sum() + st.sum(), [q, k, v, decay, s0])
    assert [g.dtype for g in grads] == [dtype, dtype, dtype, torch.bfloat16, F64]
    assert all(torch.isfinite(g.float()).all() for g in grads)


def test_cpu_linear_backward_empty():
    """S = 0: no output, the state passes through (its gradient reaches initial_state unchanged)."""
    b, h, d, dv = 2, 2, 16, 8
    q, k = randn(b, h, 0, d, requires_grad=True), randn(b, h, 0, d, requires_grad=True)
    v = randn(b, h, 0, dv, requires_grad=True)
    s0 = randn(b, h, d, dv, requires_grad=True)
    o, st = sa.linear_attention(q, k, v, initial_state=s0, return_state=True, backend="cpu")
    assert o.shape == (b, h, 0, dv)
    gs = randn(b, h, d, dv)
    (ds0,) = torch.autograd.grad((st * gs).sum(), [s0])
    assert torch.equal(ds0, gs)


# ----------------------------------------------------------------------------------------------
# the scheduler
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
def test_scheduler_picks_cpu_linear_for_training(decay_kind):
    b, h, hkv, s, d = 1, 4, 2, 200, 32
    q, k, v = (randn(b, n, s, d, requires_grad=True) for n in (h, hkv, hkv))
    decay = make_decay(decay_kind, b, h, s, lo=-1.0)
    p = plan_linear(q, k, v, decay=decay, initial_state=randn(b, h, d, d))
    text = p.explain()
    assert p.problem.phase == "training" and p.kernel.name == "cpu.linear_chunked", text
    assert "cpu.linear_chunked" in text and "chosen" in text
    ref = next(c for c in p.candidates if c.kernel.name == "reference.linear_chunked")
    mine = next(c for c in p.candidates if c.kernel.name == "cpu.linear_chunked")
    assert mine.cost < ref.cost, text
    # the training cost counts the backward (2-3x the forward's work; at a size where the fixed
    # overheads do not matter)
    big = [torch.empty(1, 8, 4096, 128) for _ in range(3)]
    big_decay = make_decay(decay_kind, 1, 8, 4096, lo=-1.0)
    est = {rg: plan_linear(*big, decay=big_decay, requires_grad=rg) for rg in (False, True)}
    costs = [next(c.cost for c in est[rg].candidates if c.kernel.name == "cpu.linear_chunked") for rg in (False, True)]
    assert est[True].kernel.name == "cpu.linear_chunked", est[True].explain()
    assert 3.0 * costs[0] < costs[1] < 4.5 * costs[0], costs
    # and linear_attention with no backend runs it: the gradient matches backend="cpu" exactly
    o = sa.linear_attention(q, k, v, decay=decay)
    o2 = sa.linear_attention(q, k, v, decay=decay, backend="cpu")
    go = randn(*o.shape)
    assert torch.equal(o, o2)
    for g, g2 in zip(torch.autograd.grad(o, [q, k, v], go), torch.autograd.grad(o2, [q, k, v], go)):
        assert torch.equal(g, g2)
    assert CHUNK == 32  # the lengths above (31, 33, 100, 1024) are chosen around it
