"""`Plan.prepared()`: a kept inference plan's lighter re-run (`PreparedForward`), the binding called
with the plan's fixed layout, scale and softcap, writing the caller's rows in place.

It must give `run()`'s bits and the float64 evaluation within the contract's tolerance; exist only
where nothing is computed per call (Dense, SlidingWindow, a TopK that covers every causal key;
no sinks, no autograd); and the binding it calls must refuse what `Plan.run` would (wrong
lengths, dtypes, an `out` over the inputs or with a stride-0 dim) by name.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit

pytestmark = needs_jit  # every test plans backend="cpu" (the C++ kernel's prepared call)


def _inputs(t, s, *, hq=4, hkv=2, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, n, d, generator=g).to(dtype) for h, n in ((hq, t), (hkv, s), (hkv, s)))


def _rows_view(t, hq, d, dtype):
    """A `(T + 2, Hq, D)` buffer of NaN sentinels and its `(1, Hq, T, D)` view of rows 1..T."""
    buf = torch.full((t + 2, hq, d), float("nan"), dtype=dtype)
    return buf, buf[1:t + 1].transpose(0, 1)[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("pattern,softcap", [(sa.Dense(), None), (sa.SlidingWindow(40, sinks=2), None),
                                             (sa.Dense(), 5.0)], ids=["dense", "window", "dense_softcap"])
@pytest.mark.parametrize("t,s,hq,hkv", [(77, 77, 4, 2), (33, 150, 4, 2), (130, 130, 3, 3)],
                         ids=["prefill_gqa", "sq_lt_sk", "mha_odd"])
def test_prepared_gives_run_bits_and_the_float64_evaluation(pattern, softcap, t, s, hq, hkv, dtype):
    q, k, v = _inputs(t, s, hq=hq, hkv=hkv, dtype=dtype)
    p = sa.plan(q, k, v, pattern, scale=0.2, softcap=softcap, backend="cpu")
    fast = p.prepared()
    assert fast is not None
    buf, out = _rows_view(t, hq, 32, dtype)
    assert fast.run(q, k, v, out) is None
    assert torch.equal(out, p.run(q, k, v))
    assert buf[0].isnan().all() and buf[-1].isnan().all()  # nothing written outside out
    ref = oracle.oracle_attention(q.double(), k.double(), v.double(), pattern, scale=0.2, softcap=softcap)
    oracle.assert_close_contract(out, ref, dtype=dtype, device="cpu", lowp_baseline=oracle.masked_attention_in_dtype(
        q, k, v, pattern, scale=0.2, softcap=softcap))
    q2, k2, v2 = _inputs(t, s, hq=hq, hkv=hkv, dtype=dtype, seed=1)  # the same plan, new data: no stale state
    fast.run(q2, k2, v2, out)
    assert torch.equal(out, p.run(q2, k2, v2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("t,s", [(77, 77), (33, 150)], ids=["prefill", "sq_lt_sk"])
def test_prepared_reads_token_major_rows(t, s, dtype):
    """q, k, v and out as a server holds them, `(S, H, D)` rows (here strided: K and V side by side
    in one buffer, out inside a larger one): run()'s bits on the `(1, H, S, D)` views."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(t, 4, 32, generator=g).to(dtype)
    kv = torch.randn(s, 2, 2, 32, generator=g).to(dtype)  # (S, Hkv, K|V, D)
    k, v = kv[:, :, 0], kv[:, :, 1]
    heads = [x.transpose(0, 1)[None] for x in (q, k, v)]
    p = sa.plan(*heads, sa.SlidingWindow(40, sinks=2), scale=0.2, backend="cpu")
    fast = p.prepared()
    buf = torch.full((t + 2, 4, 32), float("nan"), dtype=dtype)
    fast.run(q, k, v, buf[1:t + 1])
    assert torch.equal(buf[1:t + 1], p.run(*heads)[0].transpose(0, 1))
    assert buf[0].isnan().all() and buf[-1].isnan().all()
    want = oracle.oracle_attention(*(x.double() for x in heads), sa.SlidingWindow(40, sinks=2), scale=0.2)
    oracle.assert_close_contract(buf[1:t + 1].transpose(0, 1)[None], want, dtype=dtype, device="cpu")
    with pytest.raises(ValueError, match=r"out must be \(Sq, Hq, Dv\)"):
        fast.run(q, k, v, buf[1:t + 1].transpose(0, 1)[None])  # 3-D inputs take 3-D rows
    with pytest.raises(ValueError, match="4-D .* or all 3-D"):
        fast.run(q, *heads[1:], buf[1:t + 1])  # one layout for all three
    with pytest.raises(ValueError, match="share memory"):
        fast.run(q, k, v, kv.view(s, 4, 32)[:t])  # rows over K and V's buffer


def test_topk_covering_every_causal_key_is_prepared_as_dense():
    q, k, v = _inputs(90, 90)
    pattern = sa.TopK(8, block_size=16)  # 6 blocks: every query sees all its causal blocks
    p = sa.plan(q, k, v, pattern, backend="cpu")
    fast = p.prepared()
    assert fast is not None
    out = torch.empty(1, 4, 90, 32)
    fast.run(q, k, v, out)
    oracle.assert_close_contract(out, oracle.oracle_attention(q.double(), k.double(), v.double(), pattern),
                                 dtype=torch.float32, device="cpu")


def test_no_prepared_call_where_a_call_needs_more():
    q, k, v = _inputs(200, 200)
    assert sa.plan(q, k, v, sa.TopK(2, block_size=16), backend="cpu").prepared() is None  # a selection per call
    infllmv2 = sa.InfLLMv2(topk=2, block_size=32, kernel_size=32, kernel_stride=16, local_blocks=1, dense_len=0)
    assert sa.plan(q, k, v, infllmv2, backend="cpu").prepared() is None
    sinks = torch.zeros(4)  # learned sinks apply after the kernel
    assert sa.plan(q, k, v, sa.Dense(), sink_logits=sinks, backend="cpu").prepared() is None
    qg = q.clone().requires_grad_()
    assert sa.plan(qg, k, v, sa.Dense(), backend="cpu").prepared() is None  # autograd
    assert sa.plan(q, k, v, sa.Dense(), backend="reference").prepared() is None  # a kernel without one


def test_the_binding_refuses_what_run_would():
    q, k, v = _inputs(40, 40)
    fast = sa.plan(q, k, v, sa.Dense(), backend="cpu").prepared()
    out = torch.empty(1, 4, 40, 32)
    q_short, k_long, v_long = _inputs(39, 41)
    with pytest.raises(ValueError, match="lengths disagree"):
        fast.run(q_short, k, v, torch.empty(1, 4, 39, 32))
    with pytest.raises(ValueError, match="lengths disagree"):
        fast.run(q, k_long, v_long, out)
    with pytest.raises(TypeError, match="share one dtype"):
        fast.run(q, k.double(), v, out)
    with pytest.raises(TypeError, match="out must have q's dtype"):
        fast.run(q, k, v, out.bfloat16())
    with pytest.raises(ValueError, match="out must be"):
        fast.run(q, k, v, torch.empty(1, 4, 41, 32))
    with pytest.raises(ValueError, match="stride-0"):
        fast.run(q, k, v, torch.empty(1, 4, 1, 32).expand(1, 4, 40, 32))
    with pytest.raises(ValueError, match="share memory with q, k or v"):
        fast.run(q, k, v, q)
    big = torch.randn(1, 4, 80, 32)  # out overlapping v inside one storage
    with pytest.raises(ValueError, match="share memory"):
        fast.run(q, k, big[:, 2:, 10:50], big[:, :, 30:70])


def test_plan_run_refuses_a_stride0_out():
    q, k, v = _inputs(20, 20)
    p = sa.plan(q, k, v, sa.Dense(), backend="cpu")
    with pytest.raises(ValueError, match="stride-0"):
        p.run(q, k, v, out=torch.empty(1, 4, 20, 1).expand(1, 4, 20, 32))
    with pytest.raises(ValueError, match="stride-0"):
        p.run(q, k, v, out=torch.empty(1, 1, 20, 32).expand(1, 4, 20, 32))
