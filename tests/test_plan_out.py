"""`Plan.run(out=)`: the result written into the caller's tensor (a server's output rows).

The CPU kernel writes its rows in place through any strides with a contiguous last dim (e.g. the
transposed view of vLLM's `(T, Hq, Dv)` rows); other kernels, learned sinks and a strided last dim
copy `run`'s result. Either way: the bits of `run()`, the float64 evaluation within the contract's
tolerance, nothing written outside `out`, and bad `out` arguments refused by name.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit

pytestmark = needs_jit  # the CPU kernel (backend="cpu") or its binding in every test

PATTERNS = [sa.Dense(), sa.TopK(3, block_size=16), sa.SlidingWindow(40, sinks=2)]


def _inputs(t, s, *, hq=4, hkv=2, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, t, d, generator=g).to(dtype)
    k = torch.randn(1, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(1, hkv, s, d, generator=g).to(dtype)
    return q, k, v


def _rows_view(t, hq, d, dtype):
    """A `(T + 2, Hq, D)` buffer of NaN sentinels and its `(1, Hq, T, D)` view of rows 1..T."""
    buf = torch.full((t + 2, hq, d), float("nan"), dtype=dtype)
    return buf, buf[1:t + 1].transpose(0, 1)[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=["dense", "topk", "window"])
@pytest.mark.parametrize("t,s", [(77, 77), (33, 150)], ids=["prefill", "sq_lt_sk"])
def test_cpu_kernel_writes_strided_rows_in_place(pattern, t, s, dtype):
    q, k, v = _inputs(t, s, dtype=dtype)
    p = sa.plan(q, k, v, pattern, scale=0.2, backend="cpu")
    assert p.kernel.name == "cpu.block_sparse" and p.kernel.writes_out
    buf, out = _rows_view(t, 4, 32, dtype)
    got = p.run(q, k, v, out=out)
    assert got is out
    assert torch.equal(out, p.run(q, k, v))  # the same bits as a new result tensor
    assert buf[0].isnan().all() and buf[-1].isnan().all()  # nothing outside out
    ref = oracle.oracle_attention(q.double(), k.double(), v.double(), pattern, scale=0.2)
    if not isinstance(pattern, sa.TopK):  # a near-tie selection may flip with rounding: TopK's bits above
        oracle.assert_close_contract(out, ref, dtype=dtype, device="cpu",  # suffice (its kernel tests check it)
                                     lowp_baseline=oracle.masked_attention_in_dtype(q, k, v, pattern, scale=0.2))


def test_copy_paths_give_run_bits():
    """Kernels without `writes_out`, learned sinks, and a non-contiguous last dim: a copy of `run`."""
    q, k, v = _inputs(40, 61)
    sinks = torch.randn(4)
    ref_plan = sa.plan(q, k, v, sa.Dense(), scale=0.3, backend="reference")
    assert not ref_plan.kernel.writes_out
    out = torch.empty(1, 4, 40, 32)
    assert torch.equal(ref_plan.run(q, k, v, out=out), ref_plan.run(q, k, v))
    assert "run(out=" not in ref_plan.explain()
    p = sa.plan(q, k, v, sa.Dense(), scale=0.3, sink_logits=sinks, backend="cpu")
    assert "copied into out" in p.explain()
    out = torch.empty(1, 4, 40, 32)
    assert torch.equal(p.run(q, k, v, sink_logits=sinks, out=out), p.run(q, k, v, sink_logits=sinks))
    p = sa.plan(q, k, v, sa.Dense(), scale=0.3, backend="cpu")
    assert "writes the rows in place" in p.explain()
    strided = torch.empty(1, 4, 40, 64)[..., ::2]
    assert torch.equal(p.run(q, k, v, out=strided), p.run(q, k, v))


def test_bad_out_refused_by_name():
    q, k, v = _inputs(20, 20)
    p = sa.plan(q, k, v, sa.Dense(), backend="cpu")
    with pytest.raises(TypeError, match="out"):
        p.run(q, k, v, out=[0.0])
    with pytest.raises(ValueError, match="out must have shape"):
        p.run(q, k, v, out=torch.empty(1, 4, 19, 32))
    with pytest.raises(TypeError, match="out must have q's dtype"):
        p.run(q, k, v, out=torch.empty(1, 4, 20, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="share memory with q"):
        p.run(q, k, v, out=q)
    big = torch.randn(1, 4, 40, 32)
    with pytest.raises(ValueError, match="share memory with k"):  # a partial overlap of one storage
        p.run(q, big[:, :2, 10:30], big[:, 2:, :20], out=big[:, :, 5:25])
    qg = q.clone().requires_grad_()
    pg = sa.plan(qg, k, v, sa.Dense(), backend="cpu")
    with pytest.raises(ValueError, match="out= is for inference"):
        pg.run(qg, k, v, out=torch.empty(1, 4, 20, 32))


def test_binding_checks_out():
    """The C++ binding refuses an `out` of the wrong shape or dtype itself (ValueError / TypeError)."""
    from sparse_attn.backends.cpu import kernels as K
    q, k, v = _inputs(20, 20)
    lay = K.cpu_layout(q, k, sa.Dense())
    with pytest.raises(ValueError, match="out must be"):
        K.block_sparse_forward_layout(q, k, v, lay, scale=0.1, out=torch.empty(1, 4, 21, 32))
    with pytest.raises(TypeError, match="out must have"):
        K.block_sparse_forward_layout(q, k, v, lay, scale=0.1, out=torch.empty(1, 4, 20, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        K.block_sparse_forward_layout(q, k, v, lay, scale=0.1, out=torch.empty(1, 4, 20, 64)[..., ::2])
