"""Regression tests for the failures listed in issue 20 ("no silent wrong result at the edges"),
one plain test each: non-finite inputs, released cache pages, huge pattern integers, plans run on
another problem, zero heads, bad devices and `num_new`. The property-based sweep around them is
tests/test_edges_property.py; both check against the contract's "Bad input" section with
`expected_nonfinite` (below): a row that involves a non-finite value must not be finite, every
other row must be finite and equal to the float64 evaluation, or NaN (spread within a tile).
"""
from __future__ import annotations

import math

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import TRITON_DEVICE, needs_jit
from sparse_attn import BlockSparse, Dense, KVCache, PagedKVCache, SlidingWindow, TopK, WindowLinear

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------------
# the contract's rule for non-finite inputs, as a checker
# ----------------------------------------------------------------------------------------------
def _zeroed(x):
    return torch.nan_to_num(x.detach().to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)


def expected_nonfinite(q, k, v, pattern, *, scale=None, gate=None):
    """`(involved, ref)`: bool `(B, Hq, Sq)` rows whose float64 evaluation involves a non-finite value
    (own query when the row sees a key, or a key or value the row sees, TopK selection taken on the
    raw inputs: a NaN block score ranks first, as torch.topk), and the float64 output of every other
    row (the non-finite values replaced by 0, which those rows do not see)."""
    q64, k64, v64 = (x.detach().to(torch.float64) for x in (q, k, v))
    mask = oracle.visibility_mask(q64, k64, pattern)
    bad_kv = ~(torch.isfinite(k64).all(-1) & torch.isfinite(v64).all(-1))  # (B, Hkv, Sk)
    bad_kv = bad_kv.repeat_interleave(q.shape[1] // max(k.shape[1], 1), dim=1)
    # a row that sees no key (an empty BlockSparse row) forms no score: its float64 evaluation is the
    # contract's zeros, which do not involve its own query
    involved = (~torch.isfinite(q64).all(-1) & mask.any(-1)) | (mask & bad_kv[:, :, None, :]).any(-1)
    if type(pattern).__name__ == "WindowLinear":
        # the linear memory reads every key j <= p: a non-finite one outside the window involves the row
        sk, sq = k.shape[2], q.shape[2]
        pos = torch.arange(sk - sq, sk)[:, None]
        causal = torch.arange(sk)[None, :] <= pos
        involved = involved | (causal & bad_kv[:, :, None, :]).any(-1)
    g64 = None if gate is None else gate.detach().to(torch.float64)
    ref = oracle._attention(_zeroed(q), _zeroed(k), _zeroed(v), pattern, scale, g64, mask)
    return involved, ref


def assert_nonfinite_rule(out, involved, ref, *, tol=1e-4, what="output"):
    """The contract's rule: involved rows are not finite; the others are finite and right (or NaN:
    a NaN spread inside a tile is loud and allowed), never finite and wrong."""
    out = out.detach().to(torch.float64).cpu()
    finite = torch.isfinite(out).all(-1)
    leaked = finite & involved
    assert not leaked.any(), f"{what}: {int(leaked.sum())} rows see a non-finite input but came out finite " \
                             f"(first at {leaked.nonzero()[0].tolist()})"
    err = (out - ref).abs().amax(-1) / (1.0 + ref.abs().amax(-1))
    wrong = finite & ~involved & (err > tol)
    assert not wrong.any(), f"{what}: {int(wrong.sum())} rows are finite and wrong (max err " \
                            f"{float(err[wrong].max()):.2e})"


def _qkv(b=1, hq=2, hkv=1, sq=37, sk=37, d=16, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, h, s, d).to(dtype).to(device) for h, s in ((hq, sq), (hkv, sk), (hkv, sk))]


PATTERNS = [Dense(), SlidingWindow(9, sinks=2), TopK(1, block_size=8),
            BlockSparse(torch.ones(1, 1, 5, 5, dtype=torch.bool).tril(), block_size=8)]
PATTERN_IDS = ["dense", "window", "topk", "block_sparse"]


# ----------------------------------------------------------------------------------------------
# non-finite inputs: a NaN query must not come out as zeros (cpu.block_sparse, reference, triton)
# ----------------------------------------------------------------------------------------------
# an infinite key makes TopK's block scores +-inf, whose ties with the masked blocks the contract does
# not order: TopK gets NaN keys (ranked first, as torch.topk) and infinite queries / values
NONFINITE_CASES = [pytest.param(p, w, x, id=f"{pid}-{w}={x}") for p, pid in zip(PATTERNS, PATTERN_IDS)
                   for w, x in [("q", NAN), ("q", -INF), ("k", NAN), ("k", INF), ("v", INF)]
                   if not (isinstance(p, TopK) and w == "k" and math.isinf(x))]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit), None])
@pytest.mark.parametrize("pattern,where,value", NONFINITE_CASES)
def test_nonfinite_prefill(backend, pattern, where, value):
    q, k, v = _qkv()
    x = {"q": q, "k": k, "v": v}[where]
    x[0, 0, 21 if where == "q" else 13, 5] = value
    involved, ref = expected_nonfinite(q, k, v, pattern)
    assert involved.any()
    out = sa.attention(q, k, v, pattern, backend=backend)
    assert_nonfinite_rule(out, involved, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [SlidingWindow(9), TopK(1, block_size=16)], ids=["window", "topk"])
def test_nonfinite_triton(pattern):
    q, k, v = _qkv(d=64, device=TRITON_DEVICE)  # the Triton kernel's smallest head dim
    q[0, 1, 30, 2] = NAN
    k[0, 0, 7, 3] = NAN
    involved, ref = expected_nonfinite(q.cpu(), k.cpu(), v.cpu(), pattern)
    out = sa.attention(q, k, v, pattern, backend="triton")
    assert_nonfinite_rule(out, involved, ref)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit)])
def test_nonfinite_backward_is_loud(backend):
    """A NaN query's row gives NaN gradients, not zeros (cpu.block_sparse and reference)."""
    q, k, v = (x.requires_grad_() for x in _qkv())
    q.data[0, 0, 20, 1] = NAN
    sa.attention(q, k, v, Dense(), backend=backend).sum().backward()
    assert torch.isnan(q.grad[0, 0, 20]).all(), backend
    if backend == "reference":  # rows are independent there (a native tile may spread the NaN)
        assert torch.isfinite(q.grad[0, 0, :20]).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit), None])
@pytest.mark.parametrize("value", [NAN, -INF])
def test_nonfinite_query_of_a_row_that_sees_no_key(backend, value):
    """A row with no visible key outputs zeros (the contract), its query's NaN or infinity included:
    it forms no score, so its float64 evaluation does not involve the query. The rows that see keys
    and hold such a query stay loud; the rest of the empty tile stays zeros, the others right."""
    layout = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    layout[0, 0, 2] = False                                   # queries 16..23 see no key
    pattern = BlockSparse(layout, block_size=8)
    q, k, v = (x.requires_grad_() for x in _qkv())
    q.data[0, 0, 20, 3] = value                               # in the empty tile
    q.data[0, 1, 30, 3] = value                               # in a tile that sees keys
    involved, ref = expected_nonfinite(q, k, v, pattern)
    assert not involved[0, 0, 20] and involved[0, 1, 30]
    out = sa.attention(q, k, v, pattern, backend=backend)
    assert (out[0, :, 16:24] == 0).all()
    assert_nonfinite_rule(out, involved, ref)
    out.sum().backward()
    assert (q.grad[0, :, 16:24] == 0).all()                   # an empty row's query gets no gradient
    assert torch.isnan(q.grad[0, 1, 30]).all()


@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_cache_reference_path(value):
    cache = KVCache(1, 1, 16, 64)
    k, v = torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    k[0, 0, 11, 4] = value
    cache.append(k, v)
    q = torch.randn(1, 2, 3, 16)
    out = sa.attention_with_cache(q, cache, SlidingWindow(32), backend="reference")
    involved, ref = expected_nonfinite(q, k, v, SlidingWindow(32))
    assert_nonfinite_rule(out, involved, ref)
    assert not torch.isfinite(out).all()  # the last rows see key 11 (window 32 from 37..39)


def test_window_linear_nonfinite_key():
    """Rows before a non-finite key stay right; a NaN key that left the window makes the rows whose
    linear memory holds it NaN (never a silently dropped memory)."""
    pattern, gate = WindowLinear(6), torch.randn(2)
    for value in (NAN, INF):
        q, k, v = _qkv(sq=40, sk=40)
        k[0, 0, 17, 2] = value
        involved, ref = expected_nonfinite(q, k, v, pattern, gate=gate)
        out = sa.attention(q, k, v, pattern, gate=gate, backend="reference")
        assert_nonfinite_rule(out, involved, ref)
        assert torch.isfinite(out[:, :, :17]).all()
        assert not torch.isfinite(out[:, :, 17:]).all(-1).any()


def test_linear_attention_log_decay_minus_inf_is_a_reset():
    q, k, v = _qkv(hq=2, hkv=2, sq=150, sk=150)
    g = -torch.rand(1, 2, 150) * 0.05
    g[0, 0, [3, 70, 71, 140]] = -INF
    ref, state = oracle.oracle_linear_attention(q, k, v, decay=g)
    for backend in ("reference", None):
        out, st = sa.linear_attention(q, k, v, decay=g, backend=backend, return_state=True)
        oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu", what=f"o ({backend})")
        oracle.assert_close_contract(st, state, dtype=torch.float32, device="cpu", what=f"state ({backend})")
    per_head = torch.tensor([-INF, -0.1])
    ref, _ = oracle.oracle_linear_attention(q, k, v, decay=per_head)
    oracle.assert_close_contract(sa.linear_attention(q, k, v, decay=per_head), ref, dtype=torch.float32,
                                 device="cpu")


# ----------------------------------------------------------------------------------------------
# caches refuse patterns that reach released storage
# ----------------------------------------------------------------------------------------------
def _paged(n=20):
    cache = PagedKVCache(1, 1, 8, num_pages=8, page_size=4, max_len=32)
    k, v = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    cache.append(k, v)
    return cache, k, v


def test_release_outside_then_dense_raises():
    cache, k, v = _paged()
    assert cache.release_outside(SlidingWindow(8)) == 3  # pages of keys [0, 12)
    q = torch.randn(1, 2, 1, 8)
    for backend in ("reference", None):
        with pytest.raises(ValueError, match=r"Dense.*released range \[0, 12\)"):
            sa.attention_with_cache(q, cache, Dense(), backend=backend)
        with pytest.raises(ValueError, match=r"SlidingWindow\(window=9.*\[11, 12\)"):
            sa.attention_with_cache(q, cache, SlidingWindow(9), backend=backend)
    out = sa.attention_with_cache(q, cache, SlidingWindow(8), backend="reference")
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, SlidingWindow(8)), dtype=torch.float32,
                                 device="cpu")


def test_release_keeps_sinks_and_free_forgets():
    cache, k, v = _paged()
    cache.release_outside(SlidingWindow(4, sinks=4))  # keeps the sink page [0, 4)
    q = torch.randn(1, 2, 1, 8)
    sa.attention_with_cache(q, cache, SlidingWindow(4, sinks=4), backend="reference")
    with pytest.raises(ValueError, match=r"released range \[4, 16\)"):
        sa.attention_with_cache(q, cache, SlidingWindow(4, sinks=5), backend="reference")
    cache.free(0)
    cache.append(k[:, :, :6], v[:, :, :6])  # a new sequence: nothing of it was released
    out = sa.attention_with_cache(q, cache, Dense(), backend="reference")
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k[:, :, :6], v[:, :, :6], Dense()),
                                 dtype=torch.float32, device="cpu")


# ----------------------------------------------------------------------------------------------
# huge pattern integers mean what the sequence's length means
# ----------------------------------------------------------------------------------------------
HUGE = [(SlidingWindow(2 ** 63), Dense()), (SlidingWindow(4, sinks=2 ** 63), Dense()),
        (TopK(2 ** 31, block_size=4), Dense()), (TopK(1, block_size=2 ** 40), Dense()),
        (TopK(0, block_size=4, sink_blocks=2 ** 40, local_blocks=2 ** 40), Dense()),
        (BlockSparse(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=2 ** 40), Dense()),
        (WindowLinear(2 ** 62), WindowLinear(21))]


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("pattern,same_as", HUGE, ids=[repr(p)[:40] for p, _ in HUGE])
def test_huge_pattern_integers(backend, pattern, same_as):
    q, k, v = _qkv(sq=21, sk=21)
    gate = torch.randn(2) if isinstance(pattern, WindowLinear) else None
    ref = oracle.oracle_attention(q, k, v, same_as, gate=gate)
    out = sa.attention(q, k, v, pattern, gate=gate, backend=backend)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu")


def test_huge_topk_select_and_cache():
    q, k, v = _qkv(sq=21, sk=21)
    sel = sa.select_blocks(q, k, TopK(2 ** 31, block_size=4))
    assert sel.shape == (1, 1, 21, 6)
    assert torch.equal(sel, oracle.oracle_select_blocks(q, k, TopK(100, block_size=4)))
    cache = KVCache(1, 1, 16, 64, pool_block_size=4)
    cache.append(k, v)
    for pattern in (TopK(2 ** 31, block_size=4), SlidingWindow(2 ** 63)):
        out = sa.attention_with_cache(q[:, :, -2:], cache, pattern, backend="reference")
        oracle.assert_close_contract(out, oracle.oracle_attention(q[:, :, -2:], k, v, Dense()), dtype=torch.float32,
                                     device="cpu")


# ----------------------------------------------------------------------------------------------
# plans, devices, zero heads, num_new
# ----------------------------------------------------------------------------------------------
def test_plan_runs_only_its_problem():
    q, k, v = _qkv()
    p = sa.plan(q, k, v)
    for bad in (_qkv(d=32), _qkv(sq=5, sk=37), _qkv(hq=4), [x.double() for x in (q, k, v)]):
        with pytest.raises(ValueError, match="plan"):
            p.run(*bad)
    torch.testing.assert_close(p.run(q, k, v), sa.attention(q, k, v))
    lp = sa.plan_linear(q, k, v)
    with pytest.raises(ValueError, match="plan"):
        lp.run(*_qkv(d=32))
    with pytest.raises(ValueError, match="decay"):
        lp.run(q, k, v, decay=torch.zeros(2))


@pytest.mark.parametrize("device", ["bogus", "cuda:99" if torch.cuda.is_available() else "cuda", "cpu:x"])
def test_device_strings(device):
    for make in (lambda: KVCache(1, 1, 8, 16, device=device),
                 lambda: PagedKVCache(1, 1, 8, num_pages=2, max_len=16, device=device)):
        with pytest.raises(ValueError, match="device"):
            make()


def test_zero_heads_and_no_keys():
    e = torch.randn(1, 0, 5, 8)
    assert sa.attention(e, e, e, TopK(1, block_size=2)).shape == (1, 0, 5, 8)
    kv = torch.randn(1, 2, 5, 8)
    assert sa.attention(e, kv, kv, TopK(1, block_size=2)).shape == (1, 0, 5, 8)
    assert sa.select_blocks(e, e, TopK(1, block_size=2)).shape == (1, 0, 5, 3)
    o, st = sa.linear_attention(e, e, e, return_state=True)
    assert o.shape == (1, 0, 5, 8) and st.shape == (1, 0, 8, 8)
    q = torch.randn(1, 2, 3, 8)
    none = torch.randn(1, 2, 0, 8)
    for backend in ("reference", None):
        out = sa.attention(q, none, none, Dense(causal=False), backend=backend)
        assert out.shape == (1, 2, 3, 8) and (out == 0).all()


def test_append_num_new_type():
    cache = KVCache(1, 1, 8, 16)
    with pytest.raises(TypeError, match="num_new"):
        cache.append(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), num_new=2)
