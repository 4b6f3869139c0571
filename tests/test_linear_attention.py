"""`linear_attention` (whatever chunking the package uses) against the float64 step-by-step recurrence
`S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale q_t^T S_t`: outputs, final state and gradients
(dq, dk, dv, d(decay)); long sequences with weak and strong decay; state hand-over between calls."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import BACKENDS, DTYPE_IDS, DTYPES, check_against_oracle, pairwise, randn

F64 = torch.float64

AXES = {
    "dtype": DTYPES,
    "decay": ["none", "per-head", "per-token"],
    "s": [1, 37, 100, 259],
    "d": [16, 32, 64],
    "state": ["none", "return", "init+return"],
}
EXTRA = [
    dict(dtype=torch.float32, decay="per-token", s=130, d=32, dv=16, state="init+return", scale=0.1),
    dict(dtype=torch.bfloat16, decay="per-head", s=77, d=16, dv=48, state="return"),
]
CASES = pairwise(AXES) + EXTRA


def case_id(c):
    extra = "".join(f"-{n}{c[n]}" for n in ("dv", "scale") if n in c)
    return f"{DTYPE_IDS[c['dtype']]}-{c['decay']}-s{c['s']}-d{c['d']}-{c['state']}{extra}"


def make_decay(kind, b, h, s, dtype, lo=-3.0, hi=0.0):
    """Log-decays drawn uniformly in [lo, hi]: (H,) per head or (B, H, S) per token."""
    if kind == "none":
        return None
    shape = (h,) if kind == "per-head" else (b, h, s)
    return (lo + (hi - lo) * torch.rand(shape)).to(dtype).requires_grad_()


def state_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_linear_attention_matrix(case, backend):
    dtype, s, d = case["dtype"], case["s"], case["d"]
    b, h, dv = 2, 3, case.get("dv", d)
    scale = case.get("scale")
    q, k = randn(b, h, s, d, dtype=dtype, requires_grad=True), randn(b, h, s, d, dtype=dtype, requires_grad=True)
    v = randn(b, h, s, dv, dtype=dtype, requires_grad=True)
    decay = make_decay(case["decay"], b, h, s, dtype, lo=-1.0)
    s0 = randn(b, h, d, dv, dtype=state_dtype(dtype)) if case["state"] == "init+return" else None
    ret = case["state"] != "none"
    got = {}

    def run(q, k, v, decay):
        res = sa.linear_attention(q, k, v, decay=decay, scale=scale, initial_state=s0, return_state=ret,
                                  backend=backend)
        if ret:
            assert isinstance(res, tuple) and len(res) == 2, type(res)
            res, got["state"] = res
        else:
            assert isinstance(res, torch.Tensor), type(res)
        return res

    out = check_against_oracle(
        run,
        lambda q, k, v, decay: oracle.oracle_linear_attention(q, k, v, decay=decay, scale=scale,
                                                              initial_state=s0)[0],
        lambda q, k, v, decay: oracle.masked_linear_attention_in_dtype(q, k, v, decay=decay, scale=scale,
                                                                       initial_state=s0),
        dict(q=q, k=k, v=v, decay=decay), dtype=dtype)
    assert out.shape == (b, h, s, dv)
    if ret:
        _, ref_state = oracle.oracle_linear_attention(q, k, v, decay=decay, scale=scale, initial_state=s0)
        assert got["state"].shape == (b, h, d, dv)
        oracle.assert_close_contract(got["state"], ref_state, dtype=dtype, device="cpu",
                                     out_dtype=state_dtype(dtype), what="final state")


LONG = [  # 4096 tokens: the chunked form must keep cumulative decays in log space
    pytest.param("per-token", -1e-3, 0.0, id="per-token-near-0"),
    pytest.param("per-token", -5.5, -4.5, id="per-token-near-minus5"),
    pytest.param("per-head", -1e-3, -1e-4, id="per-head-near-0"),
    pytest.param("per-head", -5.2, -4.8, id="per-head-near-minus5"),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,lo,hi", LONG)
def test_long_sequence_against_recurrence(kind, lo, hi, backend):
    b, h, s, d, dv = 1, 2, 4096, 32, 16
    q, k, v = (randn(b, h, s, n, requires_grad=True) for n in (d, d, dv))
    decay = make_decay(kind, b, h, s, torch.float32, lo=lo, hi=hi)
    res = {}

    def run(q, k, v, decay):
        o, res["state"] = sa.linear_attention(q, k, v, decay=decay, return_state=True, backend=backend)
        return o

    check_against_oracle(run, lambda q, k, v, decay: oracle.oracle_linear_attention(q, k, v, decay=decay)[0],
                         None, dict(q=q, k=k, v=v, decay=decay), dtype=torch.float32)
    _, ref_state = oracle.oracle_linear_attention(q, k, v, decay=decay)
    oracle.assert_close_contract(res["state"], ref_state, dtype=torch.float32, device="cpu", what="state")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_long_sequence_low_precision(dtype, backend):
    b, h, s, d = 1, 2, 4096, 16
    q, k, v = (randn(b, h, s, d, dtype=dtype) for _ in range(3))
    decay = make_decay("per-token", b, h, s, dtype, lo=-5.5, hi=-4.5).detach()
    out = sa.linear_attention(q, k, v, decay=decay, backend=backend)
    ref, _ = oracle.oracle_linear_attention(q, k, v, decay=decay)
    base = oracle.masked_linear_attention_in_dtype(q, k, v, decay=decay)
    oracle.assert_close_contract(out, ref, dtype=dtype, device="cpu", lowp_baseline=base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=DTYPE_IDS.get)
def test_chained_calls_equal_one_call(dtype, decay_kind, backend):
    """Prefill in pieces, handing the state on, then decode token by token == one long call."""
    b, h, s, d, dv = 2, 2, 300, 32, 24
    q, k, v = (randn(b, h, s, n, dtype=dtype) for n in (d, d, dv))
    decay = make_decay(decay_kind, b, h, s, dtype, lo=-2.0)
    decay = None if decay is None else decay.detach()
    s0 = randn(b, h, d, dv, dtype=state_dtype(dtype))
    whole, whole_state = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True,
                                             backend=backend)
    cuts = [0, 77, 78, 200, 296, 297, 298, 299, 300]   # uneven pieces, then single-token decode steps
    outs, state = [], s0
    for a, z in zip(cuts[:-1], cuts[1:]):
        dec = decay if decay is None or decay.dim() == 1 else decay[:, :, a:z]
        o, state = sa.linear_attention(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], decay=dec,
                                       initial_state=state, return_state=True, backend=backend)
        assert state.dtype == state_dtype(dtype)
        outs.append(o)
    oracle.assert_close_contract(torch.cat(outs, dim=2), whole, dtype=dtype, device="cpu", what="chained output")
    oracle.assert_close_contract(state, whole_state, dtype=dtype, device="cpu", what="chained state",
                                 out_dtype=state_dtype(dtype))
    ref, ref_state = oracle.oracle_linear_attention(q, k, v, decay=decay, initial_state=s0)
    oracle.assert_close_contract(whole, ref, dtype=dtype, device="cpu")
    oracle.assert_close_contract(whole_state, ref_state, dtype=dtype, device="cpu", out_dtype=state_dtype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g", [-30.0, -80.0, "mixed"])
def test_extreme_decays_stay_finite_and_exact(g, backend):
    """exp of a cumulative decay over a chunk underflows; nothing may overflow into inf / NaN."""
    b, h, s, d = 1, 2, 333, 16
    q, k, v = (randn(b, h, s, d) for _ in range(3))
    if g == "mixed":   # long stretches of no decay broken by near-resets
        decay = torch.where(torch.rand(b, h, s) < 0.1, torch.tensor(-60.0), torch.tensor(0.0))
    else:
        decay = torch.full((b, h, s), g)
    decay.requires_grad_()
    check_against_oracle(
        lambda q, k, v, decay: sa.linear_attention(q, k, v, decay=decay, backend=backend),
        lambda q, k, v, decay: oracle.oracle_linear_attention(q, k, v, decay=decay)[0], None,
        dict(q=q.requires_grad_(), k=k.requires_grad_(), v=v.requires_grad_(), decay=decay), dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_and_return_types(backend):
    q, k, v = (randn(1, 2, 50, 20) for _ in range(3))
    o = sa.linear_attention(q, k, v, backend=backend)
    assert isinstance(o, torch.Tensor) and o.shape == (1, 2, 50, 20) and o.dtype == torch.float32
    oracle.assert_close_contract(o, sa.linear_attention(q, k, v, scale=20 ** -0.5, backend=backend),
                                 dtype=torch.float32, device="cpu")
    o2, st = sa.linear_attention(q.half(), k.half(), v.half(), return_state=True, backend=backend)
    assert o2.dtype == torch.float16 and st.dtype == torch.float32 and st.shape == (1, 2, 20, 20)


# ----------------------------------------------------------------------------------------------
# decode (recurrent kernel), varlen, plan
# ----------------------------------------------------------------------------------------------
from sparse_attn.api.linear import plan_linear  # noqa: E402
from sparse_attn.backends.cpu.linear import CpuLinearChunked  # noqa: E402
from sparse_attn.backends.cpu.linear_step import CpuLinearStep  # noqa: E402

#: why the C++ kernel cannot run here (None: it builds); it then serves inference prefill
CPU_LINEAR_MISSING = CpuLinearChunked().unavailable()
PREFILL_KERNEL = "reference.linear_chunked" if CPU_LINEAR_MISSING else "cpu.linear_chunked"
#: the one-token (decode) kernel: the native step where its extension builds (tests/test_linear_step.py)
DECODE_KERNEL = "reference.linear_recurrent" if CpuLinearStep().unavailable() else "cpu.linear_step"
needs_cpu_linear = pytest.mark.skipif(CPU_LINEAR_MISSING is not None, reason=f"cpu_linear: {CPU_LINEAR_MISSING}")


@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
def test_decode_step_uses_recurrent_kernel(decay_kind):
    """S = 1 with a state: the scheduler picks the recurrent kernel; a decode loop equals prefill rows."""
    b, h, hkv, s, d, dv = 2, 4, 2, 40, 32, 16
    q, k, v = randn(b, h, s, d), randn(b, hkv, s, d), randn(b, hkv, s, dv)
    decay = make_decay(decay_kind, b, h, s, torch.float32, lo=-2.0)
    decay = None if decay is None else decay.detach()
    s0 = randn(b, h, d, dv)
    one = decay if decay is None or decay.dim() == 1 else decay[:, :, :1]
    p = plan_linear(q[:, :, :1], k[:, :, :1], v[:, :, :1], decay=one, initial_state=s0)
    assert p.kernel.name == DECODE_KERNEL, p.explain()
    assert "reference.linear_chunked" in p.explain() and p.problem.phase == "decode"
    assert plan_linear(q, k, v, decay=decay).kernel.name == PREFILL_KERNEL
    whole, whole_state = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True)
    state, outs = s0, []
    for t in range(s):
        dt = decay if decay is None or decay.dim() == 1 else decay[:, :, t:t + 1]
        o, state = p.run(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], decay=dt, initial_state=state,
                         return_state=True)
        outs.append(o)
    oracle.assert_close_contract(torch.cat(outs, 2), whole, dtype=torch.float32, device="cpu", what="decode rows")
    oracle.assert_close_contract(state, whole_state, dtype=torch.float32, device="cpu", what="decode state")
    ref, ref_state = oracle.oracle_linear_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                    decay=decay, initial_state=s0)
    oracle.assert_close_contract(torch.cat(outs, 2), ref, dtype=torch.float32, device="cpu")


@needs_cpu_linear
def test_one_token_training_step_goes_to_the_cpu_kernel():
    """With gradients, one token costs the recurrent kernel its autograd overhead (270 us measured
    against 146 us for the C++ kernel at this size): the scheduler must count it and pick the C++
    kernel; without gradients (decode) the recurrent kernel keeps the step."""
    q, k, v = (randn(1, 3, 1, 16, requires_grad=True) for _ in range(3))
    p = plan_linear(q, k, v)
    assert p.problem.phase == "training" and p.kernel.name == "cpu.linear_chunked", p.explain()
    with torch.no_grad():
        assert plan_linear(q, k, v).kernel.name == DECODE_KERNEL
    check_against_oracle(lambda q, k, v: sa.linear_attention(q, k, v),
                         lambda q, k, v: oracle.oracle_linear_attention(q, k, v)[0], None,
                         dict(q=q, k=k, v=v), dtype=torch.float32)


def test_recurrent_kernel_gradients():
    b, h, s, d = 1, 3, 3, 16
    q, k, v = (randn(b, h, s, d, requires_grad=True) for _ in range(3))
    decay = make_decay("per-token", b, h, s, torch.float32, lo=-3.0)
    s0 = randn(b, h, d, d, requires_grad=True)
    # the recurrent kernel itself (the scheduler prefers cpu.linear_chunked for training at S = 3)
    check_against_oracle(
        lambda q, k, v, decay, s0: sa.linear_attention(q, k, v, decay=decay, initial_state=s0, backend="reference"),
        lambda q, k, v, decay, s0: oracle.oracle_linear_attention(q, k, v, decay=decay, initial_state=s0)[0],
        None, dict(q=q, k=k, v=v, decay=decay, s0=s0), dtype=torch.float32)
    p = plan_linear(q, k, v, decay=decay, initial_state=s0, backend="reference")
    assert p.kernel.name == "reference.linear_recurrent", p.explain()


def cu(*lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def check_varlen(o, st, q, k, v, decay, s0, lens, per_seq=None):
    """Each packed sequence of a varlen call against the float64 oracle run on it alone (its
    output rows and its final state); `per_seq(i, (q, k, v, decay, s0) of sequence i)` adds checks."""
    offs = cu(*lens).tolist()
    for i in range(len(lens)):
        a, z = offs[i], offs[i + 1]
        di = decay if decay is None or decay.dim() == 1 else decay[:, :, a:z]
        args = (q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], di, s0[i:i + 1])
        ref, ref_st = oracle.oracle_linear_attention(*args[:3], decay=di, initial_state=args[4])
        if per_seq is not None:
            per_seq(i, args)
        if z > a:
            oracle.assert_close_contract(o[:, :, a:z], ref, dtype=torch.float32, device="cpu", what=f"seq {i}")
        oracle.assert_close_contract(st[i:i + 1], ref_st, dtype=torch.float32, device="cpu", what=f"state {i}")


@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
def test_varlen_cu_seqlens(decay_kind):
    lens = [5, 0, 70, 1, 33]
    h, d, dv, t = 2, 16, 24, sum(lens)
    q, k, v = randn(1, h, t, d, requires_grad=True), randn(1, h, t, d), randn(1, h, t, dv)
    decay = make_decay(decay_kind, 1, h, t, torch.float32, lo=-2.0)
    s0 = randn(len(lens), h, d, dv, requires_grad=True)
    o, st = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True, cu_seqlens=cu(*lens))
    assert o.shape == (1, h, t, dv) and st.shape == (len(lens), h, d, dv)
    check_varlen(o, st, q, k, v, decay, s0, lens)
    (o.square().sum() + st.sum()).backward()  # gradients flow to q and every sequence's initial state
    assert torch.isfinite(q.grad).all() and (s0.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_varlen_rejects_bad_offsets():
    q = randn(1, 2, 10, 16)
    with pytest.raises(TypeError, match="cu_seqlens"):
        sa.linear_attention(q, q, q, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        sa.linear_attention(q, q, q, cu_seqlens=torch.tensor([0, 10]))          # int64
    with pytest.raises(ValueError, match="cu_seqlens"):
        sa.linear_attention(q, q, q, cu_seqlens=cu(3, 4))                        # ends at 7, not 10
    with pytest.raises(ValueError, match="cu_seqlens"):
        sa.linear_attention(q, q, q, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    q2 = randn(2, 2, 10, 16)
    with pytest.raises(ValueError, match=r"\(1, H, T, D\)"):
        sa.linear_attention(q2, q2, q2, cu_seqlens=cu(4, 6))
    with pytest.raises(ValueError, match="initial_state"):
        sa.linear_attention(q, q, q, cu_seqlens=cu(4, 6), initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="initial_state"):
        sa.linear_attention(q, q, q, cu_seqlens=cu(4, 6), initial_state=torch.zeros(2, 2, 16, 8))
    with pytest.raises(ValueError, match="decay"):
        sa.linear_attention(q, q, q, cu_seqlens=cu(4, 6), decay=torch.zeros(1, 2, 9))


def test_plan_linear_explain_and_run():
    q, k, v = randn(1, 2, 300, 32), randn(1, 2, 300, 32), randn(1, 2, 300, 16)
    p = plan_linear(q, k, v, decay=torch.full((2,), -0.1))
    text = p.explain()
    assert "linear_attention(decay=per-head)" in text and f"* {PREFILL_KERNEL}" in text
    assert "S=300 > 16" in text  # the recurrent kernel's reason
    o = p.run(q, k, v, decay=torch.full((2,), -0.1))
    oracle.assert_close_contract(o, sa.linear_attention(q, k, v, decay=torch.full((2,), -0.1)), dtype=torch.float32,
                                 device="cpu")
    with pytest.raises(ValueError, match="backend 'cuda'"):  # the cuda backend has no linear kernel
        plan_linear(q, k, v, backend="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("kind,lo,hi", [pytest.param("per-token", -1e-3, 0.0, id="near-0"),
                                        pytest.param("per-token", -5.5, -4.5, id="near-minus5")])
def test_long_handoff_with_state_gradient(kind, lo, hi):
    """4K tokens in two chunked calls handing the state on == the recurrence, with gradients for q, k,
    v, the per-token decay and the initial state."""
    b, h, s, d, dv = 1, 2, 4096, 16, 16
    q, k, v = (randn(b, h, s, n, requires_grad=True) for n in (d, d, dv))
    decay = make_decay(kind, b, h, s, torch.float32, lo=lo, hi=hi)
    s0 = randn(b, h, d, dv, requires_grad=True)

    def run(q, k, v, decay, s0):
        o1, st = sa.linear_attention(q[:, :, :2500], k[:, :, :2500], v[:, :, :2500], decay=decay[:, :, :2500],
                                     initial_state=s0, return_state=True)
        o2 = sa.linear_attention(q[:, :, 2500:], k[:, :, 2500:], v[:, :, 2500:], decay=decay[:, :, 2500:],
                                 initial_state=st)
        return torch.cat([o1, o2], dim=2)

    check_against_oracle(run, lambda q, k, v, decay, s0: oracle.oracle_linear_attention(
        q, k, v, decay=decay, initial_state=s0)[0], None, dict(q=q, k=k, v=v, decay=decay, s0=s0),
        dtype=torch.float32)


@pytest.mark.slow
def test_long_bf16_per_head_near_zero():
    b, h, s, d = 1, 2, 4096, 16
    q, k, v = (randn(b, h, s, d, dtype=torch.bfloat16) for _ in range(3))
    decay = make_decay("per-head", b, h, s, torch.bfloat16, lo=-1e-3, hi=-1e-4).detach()
    out = sa.linear_attention(q, k, v, decay=decay)
    ref, _ = oracle.oracle_linear_attention(q, k, v, decay=decay)
    base = oracle.masked_linear_attention_in_dtype(q, k, v, decay=decay)
    oracle.assert_close_contract(out, ref, dtype=torch.bfloat16, device="cpu", lowp_baseline=base)


# ----------------------------------------------------------------------------------------------
# cpu.linear_chunked: the C++ forward (csrc/cpu/linear.cpp), inference only
# ----------------------------------------------------------------------------------------------
CPU_AXES = {
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "decay": ["none", "per-head", "per-token"],
    "s": [2, 31, 32, 33, 97, 259],  # around the chunk (32) and its multiples, and not
    "dims": [(16, 16), (20, 24), (64, 80), (128, 128)],  # (D, Dv): not multiples of the vector too
    "state": ["none", "init"],
    "hkv": [2, 6],  # GQA (query heads 3i..3i+2 share kv head i, read in place) and not
}
CPU_CASES = pairwise(CPU_AXES)


def cpu_case_id(c):
    return f"{DTYPE_IDS[c['dtype']]}-{c['decay']}-s{c['s']}-d{c['dims'][0]}x{c['dims'][1]}-{c['state']}-hkv{c['hkv']}"


@needs_cpu_linear
@pytest.mark.parametrize("case", CPU_CASES, ids=[cpu_case_id(c) for c in CPU_CASES])
def test_cpu_linear_matrix(case):
    dtype, s, (d, dv) = case["dtype"], case["s"], case["dims"]
    b, h, hkv = 2, 6, case["hkv"]
    q, k, v = randn(b, h, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype), randn(b, hkv, s, dv, dtype=dtype)
    decay = make_decay(case["decay"], b, h, s, dtype, lo=-2.0)
    decay = None if decay is None else decay.detach()
    s0 = randn(b, h, d, dv) if case["state"] == "init" else None
    p = plan_linear(q, k, v, decay=decay, initial_state=s0)
    # a few tokens may go to the decode step (tests/test_linear_step.py); the chunked kernel itself runs below
    chosen = ("cpu.linear_chunked",) if s > CpuLinearStep.max_tokens else ("cpu.linear_chunked", "cpu.linear_step")
    assert p.kernel.name in chosen, p.explain()
    o, st = CpuLinearChunked().run(q, k, v, p.problem, decay=decay, initial_state=s0)
    g = h // hkv
    k64, v64 = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    ref, ref_st = oracle.oracle_linear_attention(q, k64, v64, decay=decay, initial_state=s0)
    base = oracle.masked_linear_attention_in_dtype(q, k64, v64, decay=decay, initial_state=s0)
    assert o.shape == (b, h, s, dv)
    oracle.assert_close_contract(o, ref, dtype=dtype, device="cpu", lowp_baseline=base)
    oracle.assert_close_contract(st, ref_st, dtype=dtype, device="cpu", out_dtype=torch.float32, what="final state")


@needs_cpu_linear
@pytest.mark.slow
@pytest.mark.parametrize("kind,lo,hi", LONG + [pytest.param("none", 0.0, 0.0, id="none")])
def test_cpu_linear_long_against_recurrence(kind, lo, hi):
    """4K tokens, strong and weak decays: cumulative decays stay relative to each chunk's start."""
    b, h, s, d, dv = 1, 2, 4096, 32, 48
    q, k, v = (randn(b, h, s, n) for n in (d, d, dv))
    decay = make_decay(kind, b, h, s, torch.float32, lo=lo, hi=hi)
    decay = None if decay is None else decay.detach()
    o, st = sa.linear_attention(q, k, v, decay=decay, return_state=True, backend="cpu")
    ref, ref_st = oracle.oracle_linear_attention(q, k, v, decay=decay)
    oracle.assert_close_contract(o, ref, dtype=torch.float32, device="cpu")
    oracle.assert_close_contract(st, ref_st, dtype=torch.float32, device="cpu", what="state")


@needs_cpu_linear
@pytest.mark.parametrize("g", [-30.0, -80.0, "mixed"])
def test_cpu_linear_extreme_decays(g):
    b, h, s, d = 1, 2, 333, 16
    q, k, v = (randn(b, h, s, d) for _ in range(3))
    if g == "mixed":
        decay = torch.where(torch.rand(b, h, s) < 0.1, torch.tensor(-60.0), torch.tensor(0.0))
    else:
        decay = torch.full((b, h, s), g)
    o, st = sa.linear_attention(q, k, v, decay=decay, return_state=True, backend="cpu")
    ref, ref_st = oracle.oracle_linear_attention(q, k, v, decay=decay)
    oracle.assert_close_contract(o, ref, dtype=torch.float32, device="cpu")
    oracle.assert_close_contract(st, ref_st, dtype=torch.float32, device="cpu", what="state")


@needs_cpu_linear
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dv", [80, 128])
def test_cpu_linear_column_split_and_strides(threads, dv):
    """Fewer (batch, head) pairs than threads: the kernel splits the Dv columns (80 = a padded block
    of 48 and one of 32); inputs are non-contiguous views (a transposed layout)."""
    b, h, s, d = 1, 1, 150, 32
    q, k = randn(b, s, h, d).transpose(1, 2), randn(b, s, h, d).transpose(1, 2)
    v = randn(b, s, h, dv).transpose(1, 2)
    decay = make_decay("per-token", b, h, s, torch.float32, lo=-1.0).detach()
    s0 = randn(b, h, d, dv)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o, st = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True, backend="cpu")
    finally:
        torch.set_num_threads(old)
    ref, ref_st = oracle.oracle_linear_attention(q, k, v, decay=decay, initial_state=s0)
    oracle.assert_close_contract(o, ref, dtype=torch.float32, device="cpu")
    oracle.assert_close_contract(st, ref_st, dtype=torch.float32, device="cpu", what="state")


@needs_cpu_linear
@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
def test_cpu_linear_varlen(decay_kind):
    lens = [5, 0, 70, 1, 33]
    h, d, dv, t = 2, 16, 24, sum(lens)
    q, k, v = randn(1, h, t, d), randn(1, h, t, d), randn(1, h, t, dv)
    decay = make_decay(decay_kind, 1, h, t, torch.float32, lo=-2.0)
    decay = None if decay is None else decay.detach()
    s0 = randn(len(lens), h, d, dv)
    o, st = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True, cu_seqlens=cu(*lens))

    def chunked_kernel_runs(i, args):
        qi, ki, vi, di, si = args
        if qi.shape[2] > CpuLinearStep.max_tokens:  # a few tokens are a decode step (tests/test_linear_step.py)
            assert plan_linear(qi, ki, vi, decay=di, initial_state=si).kernel.name == "cpu.linear_chunked"

    check_varlen(o, st, q, k, v, decay, s0, lens, chunked_kernel_runs)


@needs_cpu_linear
def test_cpu_linear_scheduler_and_training():
    """The C++ kernel runs inference prefill and training (its own backward); the gradients of
    linear_attention on CPU match the recurrence."""
    b, h, s, d = 1, 2, 100, 32
    q, k, v = (randn(b, h, s, d, requires_grad=True) for _ in range(3))
    decay = make_decay("per-token", b, h, s, torch.float32, lo=-2.0)
    p = plan_linear(q, k, v, decay=decay)
    assert p.kernel.name == "cpu.linear_chunked" and p.problem.phase == "training", p.explain()
    with torch.no_grad():
        p2 = plan_linear(q, k, v, decay=decay)
        assert p2.kernel.name == "cpu.linear_chunked" and "chosen" in p2.explain(), p2.explain()
    check_against_oracle(lambda q, k, v, decay: sa.linear_attention(q, k, v, decay=decay),
                         lambda q, k, v, decay: oracle.oracle_linear_attention(q, k, v, decay=decay)[0], None,
                         dict(q=q, k=k, v=v, decay=decay), dtype=torch.float32)
    q1 = q.detach()[:, :, :1]
    assert plan_linear(q1, q1, q1).kernel.name == DECODE_KERNEL  # decode: the step kernel
