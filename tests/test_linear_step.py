"""The native linear-attention decode steps (`cpu.linear_step`, csrc/cpu/linear_step.cpp, and
`triton.linear_step`) against the float64 recurrence: many consecutive steps chained through the
state (in place), one token and a few at a time, every decay kind, GQA and GQA-free heads, odd
head dims, low-precision inputs; and the scheduler's choice (step for a few tokens, chunked for
prefill)."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import DTYPE_IDS, TRITON_DEVICE, randn
from sparse_attn.api.linear import plan_linear
from sparse_attn.backends.cpu.linear_step import CpuLinearStep, linear_step_cpu
from sparse_attn.backends.triton.linear_step import TritonLinearStep, triton_linear_step

CPU_STEP_MISSING = CpuLinearStep().unavailable()
needs_cpu_step = pytest.mark.skipif(CPU_STEP_MISSING is not None, reason=f"cpu_step: {CPU_STEP_MISSING}")
needs_triton = pytest.mark.skipif(TritonLinearStep().unavailable() is not None, reason="triton unavailable")


def decay_for(kind, b, h, s, lo=-2.0):
    if kind == "none":
        return None
    shape = (h,) if kind == "per-head" else (b, h, s)
    return lo * torch.rand(shape)


def token_decay(decay, t0, t1):
    return decay if decay is None or decay.dim() == 1 else decay[:, :, t0:t1]


def run_steps(step, q, k, v, decay, s0, chunks, device="cpu"):
    """Chain `step` over the tokens in pieces of `chunks` sizes, the state handed over in place."""
    state = s0.clone().to(device)
    ptr = state.data_ptr()
    outs, t = [], 0
    for c in chunks:
        dt = token_decay(decay, t, t + c)
        o, new = step(*(x[:, :, t:t + c].to(device) for x in (q, k, v)),
                      decay=None if dt is None else dt.to(device), initial_state=state, state_out=state)
        assert new.data_ptr() == ptr  # written where it was read
        outs.append(o.cpu())
        t += c
    return torch.cat(outs, dim=2), state.cpu()


STEP_CASES = [  # (decay, dtype, B, H, Hkv, D, Dv, chunks)
    pytest.param("none", torch.float32, 2, 4, 4, 64, 64, [1] * 40, id="none-f32-gqa1-40steps"),
    pytest.param("per-head", torch.float32, 1, 8, 2, 80, 48, [1] * 30 + [3, 5, 1, 16], id="perhead-f32-gqa4-d80-few"),
    pytest.param("per-token", torch.float32, 2, 3, 3, 17, 23, [1] * 25 + [2, 7], id="pertoken-f32-odd-dims"),
    pytest.param("per-token", torch.bfloat16, 1, 4, 1, 128, 128, [1] * 20 + [4], id="pertoken-bf16-gqa4-d128"),
    pytest.param("per-head", torch.float16, 2, 2, 2, 32, 40, [1] * 20 + [3], id="perhead-f16"),
]


def check_chain(step, decay_kind, dtype, b, h, hkv, d, dv, chunks, device="cpu"):
    s = sum(chunks)
    q, k, v = randn(b, h, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype), randn(b, hkv, s, dv, dtype=dtype)
    decay = decay_for(decay_kind, b, h, s)
    s0 = 0.3 * randn(b, h, d, dv)
    got, state = run_steps(step, q, k, v, decay, s0, chunks, device)
    kx, vx = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    ref, ref_state = oracle.oracle_linear_attention(q, kx, vx, decay=decay, initial_state=s0)
    base = oracle.masked_linear_attention_in_dtype(q, kx, vx, decay=None if decay is None else decay.to(dtype),
                                                   initial_state=s0)
    oracle.assert_close_contract(got, ref, dtype=dtype, device=device, what="step outputs", lowp_baseline=base)
    oracle.assert_close_contract(state, ref_state, dtype=dtype, device=device, what="state", out_dtype=torch.float32,
                                 lowp_baseline=None)


@needs_cpu_step
@pytest.mark.parametrize("decay_kind,dtype,b,h,hkv,d,dv,chunks", STEP_CASES)
def test_cpu_step_chain_equals_recurrence(decay_kind, dtype, b, h, hkv, d, dv, chunks):
    check_chain(linear_step_cpu_kw, decay_kind, dtype, b, h, hkv, d, dv, chunks)


def linear_step_cpu_kw(q, k, v, *, decay, initial_state, state_out):
    return linear_step_cpu(q, k, v, decay=decay, scale=q.shape[-1] ** -0.5, initial_state=initial_state,
                           state_out=state_out)


def triton_step_kw(q, k, v, *, decay, initial_state, state_out):
    return triton_linear_step(q, k, v, decay=decay, scale=q.shape[-1] ** -0.5, initial_state=initial_state,
                              state_out=state_out)


TRITON_CASES = [
    pytest.param("per-token", torch.float32, 1, 4, 2, 32, 24, [1] * 6 + [3], id="pertoken-f32-gqa2"),
    pytest.param("per-head", torch.bfloat16, 1, 2, 2, 80, 80, [1] * 5 + [2], id="perhead-bf16-d80"),
    pytest.param("none", torch.float16, 2, 2, 1, 16, 16, [1] * 4, id="none-f16-gqa2"),
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("decay_kind,dtype,b,h,hkv,d,dv,chunks", TRITON_CASES)
def test_triton_step_chain_equals_recurrence(decay_kind, dtype, b, h, hkv, d, dv, chunks):
    check_chain(triton_step_kw, decay_kind, dtype, b, h, hkv, d, dv, chunks, device=TRITON_DEVICE)


@needs_cpu_step
def test_step_from_zero_state_and_full_reset():
    """No initial state is a zero state; a log-decay of -inf is a full reset (never NaN)."""
    b, h, d = 1, 2, 16
    q, k, v = randn(b, h, 1, d), randn(b, h, 1, d), randn(b, h, 1, d)
    o, st = linear_step_cpu(q, k, v, scale=0.25)
    ref, ref_st = oracle.oracle_linear_attention(q, k, v, scale=0.25)
    oracle.assert_close_contract(o, ref, dtype=torch.float32, device="cpu")
    oracle.assert_close_contract(st, ref_st, dtype=torch.float32, device="cpu", what="state")
    reset = torch.full((b, h, 1), float("-inf"))
    o2, st2 = linear_step_cpu(q, k, v, decay=reset, scale=0.25, initial_state=randn(b, h, d, d) * 100)
    oracle.assert_close_contract(o2, ref, dtype=torch.float32, device="cpu", what="after a reset")
    assert torch.isfinite(st2).all()


@needs_cpu_step
@pytest.mark.parametrize("decay_kind", ["none", "per-head", "per-token"])
def test_scheduler_picks_the_step_for_decode_and_chunked_for_prefill(decay_kind):
    b, h, d = 1, 4, 64
    q, k, v = randn(b, h, 200, d), randn(b, h, 200, d), randn(b, h, 200, d)
    decay = decay_for(decay_kind, b, h, 200)
    s0 = randn(b, h, d, d)
    one = token_decay(decay, 0, 1)
    p = plan_linear(q[:, :, :1], k[:, :, :1], v[:, :, :1], decay=one, initial_state=s0)
    text = p.explain()
    assert p.kernel.name == "cpu.linear_step" and p.problem.phase == "decode", text
    for name in ("reference.linear_recurrent", "cpu.linear_chunked", "triton.linear_step"):
        assert name in text
    long = plan_linear(q, k, v, decay=decay)
    assert long.kernel.name == "cpu.linear_chunked", long.explain()
    assert "S=200 > 16" in long.explain()
    with torch.enable_grad():
        qg = q[:, :, :1].clone().requires_grad_()
        pg = plan_linear(qg, k[:, :, :1], v[:, :, :1], decay=one, initial_state=s0)
    assert pg.kernel.name != "cpu.linear_step" and "no backward pass" in pg.explain()


@needs_cpu_step
def test_linear_decode_step_updates_the_state_in_place():
    """`sa.linear_decode_step` (the public in-place step) equals linear_attention's state hand-over,
    writes into the caller's state, and refuses a state it cannot update in place."""
    b, h, hkv, d, dv, s = 2, 4, 2, 32, 16, 12
    q, k, v = randn(b, h, s, d), randn(b, hkv, s, d), randn(b, hkv, s, dv)
    decay = decay_for("per-token", b, h, s)
    s0 = randn(b, h, d, dv)
    whole, whole_state = sa.linear_attention(q, k, v, decay=decay, initial_state=s0, return_state=True)
    state = s0.clone()
    ptr = state.data_ptr()
    outs = []
    for t in range(s):
        outs.append(sa.linear_decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                          decay=decay[:, :, t:t + 1]))
    assert state.data_ptr() == ptr
    oracle.assert_close_contract(torch.cat(outs, 2), whole, dtype=torch.float32, device="cpu")
    oracle.assert_close_contract(state, whole_state, dtype=torch.float32, device="cpu", what="state")
    # a kernel that cannot write in place (the reference one) has its result copied in
    st2 = s0.clone()
    o = sa.linear_decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], st2, decay=decay[:, :, :1], backend="reference")
    oracle.assert_close_contract(o, whole[:, :, :1], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="state"):
        sa.linear_decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], s0.double())
    with pytest.raises(ValueError, match="state"):
        sa.linear_decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], s0.transpose(-1, -2))
    with pytest.raises(ValueError, match="no backward"):
        sa.linear_decode_step(q[:, :, :1].requires_grad_(), k[:, :, :1], v[:, :, :1], s0.clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_default_decode_loop_matches_prefill(dtype):
    """Whatever the scheduler picks for one token, a decode loop after a prefill gives the prefill rows."""
    b, h, d, s, pre = 1, 3, 32, 30, 20
    q, k, v = randn(b, h, s, d, dtype=dtype), randn(b, h, s, d, dtype=dtype), randn(b, h, s, d, dtype=dtype)
    decay = decay_for("per-head", b, h, s)
    o_pre, state = sa.linear_attention(q[:, :, :pre], k[:, :, :pre], v[:, :, :pre], decay=decay, return_state=True)
    outs = [o_pre]
    for t in range(pre, s):
        o, state = sa.linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], decay=decay,
                                       initial_state=state, return_state=True)
        outs.append(o)
    ref, _ = oracle.oracle_linear_attention(q, k, v, decay=decay)
    base = oracle.masked_linear_attention_in_dtype(q, k, v, decay=decay.to(dtype))
    oracle.assert_close_contract(torch.cat(outs, 2), ref, dtype=dtype, device="cpu", lowp_baseline=base)


@needs_cpu_step
def test_step_with_no_token_passes_the_state_through():
    """S = 0 (an empty sequence of a varlen batch) returns the initial state (or zeros), never garbage."""
    s0 = randn(1, 2, 16, 8)
    o, st = linear_step_cpu(randn(1, 2, 0, 16), randn(1, 2, 0, 16), randn(1, 2, 0, 8), scale=0.25, initial_state=s0)
    assert o.shape == (1, 2, 0, 8) and torch.equal(st, s0)
    _, st0 = linear_step_cpu(randn(1, 2, 0, 16), randn(1, 2, 0, 16), randn(1, 2, 0, 8), scale=0.25)
    assert torch.equal(st0, torch.zeros(1, 2, 16, 8))
