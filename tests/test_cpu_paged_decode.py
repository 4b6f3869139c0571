"""The CPU split-KV decode kernel over KV caches (`attention_with_cache` on CPU caches, backend "cpu").

* ragged appends across a batch of different lengths, then every pattern (Dense causal / non-causal,
  SlidingWindow with and without sinks, BlockSparse, TopK), Sq 1/3/16, GQA 1/4, head dims
  64/80/128, float32 / bfloat16, against the float64 oracle applied to each sequence on its own
  (end-aligned rows) with the contract's bounds;
* a contiguous cache and paged caches whose pages are handed out in random order, with page sizes
  that do and do not divide the kernel's 64-key segments: paged == contiguous bit for bit;
* keys at or past a sequence's length, the trash page and released pages are never read (they are
  filled with NaN); `release_outside` of a SlidingWindow leaves the result unchanged;
* long sequences (several splits per (batch, kv head)), and which kernel the scheduler runs and why
  (`plan_with_cache(...).explain()`).
"""
from __future__ import annotations

import random

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, make_pattern, randn, topk_margin
from sparse_attn.cache import KVCache, PagedKVCache, attention_with_cache
from test_cache import _fill, _row_pattern

pytestmark = needs_jit

BS = 16
KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "topk", "topk_wide"]
DIMS = (64, 80, 128)
DTYPES = [torch.float32, torch.bfloat16]


def _paged(b, hkv, d, max_len, dtype, pool, page_size, seed):
    pages = b * -(-max_len // page_size) + 3
    c = PagedKVCache(b, hkv, d, num_pages=pages, page_size=page_size, max_len=max_len, dtype=dtype,
                     pool_block_size=pool)
    random.Random(seed).shuffle(c._free)  # pages handed out in random order (a pool in use)
    return c


def _poison(caches):
    """NaN everywhere a kernel must not read: rows at or past each sequence's length of a contiguous
    cache (spare row included), the trash page of a paged cache (ragged appends' padding rows and
    every unallocated or released table entry point there), and pages still in the free list."""
    for c in caches:
        if isinstance(c, PagedKVCache):
            dead = [c.num_pages] + list(c._free)
            c.k_pages[dead] = float("nan")
            c.v_pages[dead] = float("nan")
        else:
            for i, n in enumerate(c.host_lengths):
                c.k[i, :, n:] = float("nan")
                c.v[i, :, n:] = float("nan")


def _check_rows(out, q, full_k, full_v, lengths, pat, dtype, what):
    for i, n in enumerate(lengths):
        rp = _row_pattern(pat, i, n)
        args = (q[i:i + 1], full_k[i:i + 1, :, :n], full_v[i:i + 1, :, :n])
        ref = oracle.oracle_attention(*args, rp)
        base = oracle.masked_attention_in_dtype(*args, rp)
        oracle.assert_close_contract(out[i:i + 1], ref, dtype=dtype, device="cpu", lowp_baseline=base,
                                     what=f"{what} seq {i} (length {n})")


def _draw(pat, b, hq, hkv, d, lengths, dtype, sqs):
    for _ in range(50):  # redraw until no TopK choice hangs on rounding
        full_k = randn(b, hkv, max(lengths), d, dtype=dtype)
        full_v = randn(b, hkv, max(lengths), d, dtype=dtype)
        q = randn(b, hq, max(sqs), d, dtype=dtype)
        if not isinstance(pat, sa.TopK) or all(
                topk_margin(q[i:i + 1, :, -sq:], full_k[i:i + 1, :, :n], pat) > 1e-3
                for sq in sqs for i, n in enumerate(lengths)):
            return full_k, full_v, q
    raise AssertionError("no TopK draw with a clear selection margin")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_ragged_caches_match_oracle(kind, gqa, dtype):
    b, hkv = 3, 2
    hq = hkv * gqa
    d = DIMS[(KINDS.index(kind) + gqa + (dtype == torch.bfloat16)) % 3]
    lengths = [37, 90, 53]  # no multiple of a block, a page or a segment
    max_len = 100
    sqs = (1, 3, 16)
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=BS)
    pool = getattr(pat, "block_size", BS)
    full_k, full_v, q = _draw(pat, b, hq, hkv, d, lengths, dtype, sqs)
    caches = [KVCache(b, hkv, d, max_len, dtype=dtype, pool_block_size=pool),
              _paged(b, hkv, d, max_len, dtype, pool, page_size=8, seed=1),    # 8 pages per segment
              _paged(b, hkv, d, max_len, dtype, pool, page_size=24, seed=2)]   # pages cross segments
    _fill(caches, full_k, full_v, lengths, steps=[20, 1, 7, 60, 5])
    _poison(caches)
    for sq in sqs:
        qs = q[:, :, -sq:]
        for c in caches:
            assert sa.plan_with_cache(qs, c, pat).kernel.name == "cpu.decode"
        outs = [attention_with_cache(qs, c, pat) for c in caches]
        for o in outs[1:]:
            assert torch.equal(outs[0], o), f"paged != contiguous ({kind}, Sq={sq})"
        assert torch.equal(outs[0], attention_with_cache(qs, caches[0], pat, backend="cpu"))
        _check_rows(outs[0], qs, full_k, full_v, lengths, pat, dtype, f"{kind} G={gqa} D={d} Sq={sq}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_release_outside_leaves_window_unchanged(dtype):
    b, hq, hkv, d = 3, 8, 2, 64
    lengths = [70, 130, 99]
    max_len = 160
    pat = sa.SlidingWindow(20, sinks=3)
    full_k, full_v, q = _draw(pat, b, hq, hkv, d, [n + 1 for n in lengths], dtype, (1,))
    contig = KVCache(b, hkv, d, max_len, dtype=dtype)
    paged = _paged(b, hkv, d, max_len, dtype, 64, page_size=8, seed=3)
    _fill([contig, paged], full_k[:, :, :max(lengths)], full_v[:, :, :max(lengths)], lengths, steps=[50, 3, 80])
    before = attention_with_cache(q, paged, pat)
    assert paged.release_outside(pat) > 0
    _poison([contig, paged])  # released pages are back in the free list: NaN now
    after = attention_with_cache(q, paged, pat)
    assert torch.equal(before, after)
    assert torch.equal(after, attention_with_cache(q, contig, pat))
    _check_rows(after, q, full_k, full_v, lengths, pat, dtype, "window after release")
    # one more decode step: the new token's page may be a released one
    step_k, step_v = full_k[:, :, -1:].clone(), full_v[:, :, -1:].clone()
    for i, n in enumerate(lengths):
        step_k[i], step_v[i] = full_k[i, :, n:n + 1], full_v[i, :, n:n + 1]
    for c in (contig, paged):
        c.append(step_k, step_v)
    out = attention_with_cache(q, paged, pat)
    assert torch.equal(out, attention_with_cache(q, contig, pat))
    for i, n in enumerate(lengths):
        ks = torch.cat([full_k[i:i + 1, :, :n], step_k[i:i + 1]], 2)
        vs = torch.cat([full_v[i:i + 1, :, :n], step_v[i:i + 1]], 2)
        ref = oracle.oracle_attention(q[i:i + 1], ks, vs, pat)
        base = oracle.masked_attention_in_dtype(q[i:i + 1], ks, vs, pat)
        oracle.assert_close_contract(out[i:i + 1], ref, dtype=dtype, device="cpu", lowp_baseline=base,
                                     what=f"window step after release, seq {i}")


@pytest.mark.parametrize("kind", ["dense_causal", "window_sinks", "topk"])
def test_long_sequences_several_splits(kind):
    """Thousands of keys: several splits per (batch, kv head), 64-token pages in random order."""
    b, hq, hkv, d, dtype = 3, 8, 2, 128, torch.bfloat16
    lengths = [2500, 4100, 700]
    max_len = 4160
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=64)
    full_k, full_v, q = _draw(pat, b, hq, hkv, d, lengths, dtype, (1, 3))
    caches = [KVCache(b, hkv, d, max_len, dtype=dtype),
              _paged(b, hkv, d, max_len, dtype, 64, page_size=64, seed=4)]
    _fill(caches, full_k, full_v, lengths, steps=[1000, 3100, 1])
    _poison(caches)
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for sq in (1, 3):
                qs = q[:, :, -sq:]
                outs = [attention_with_cache(qs, c, pat) for c in caches]
                assert torch.equal(outs[0], outs[1]), f"paged != contiguous ({kind}, Sq={sq})"
                _check_rows(outs[0], qs, full_k, full_v, lengths, pat, dtype, f"{kind} Sq={sq} threads={threads}")
        finally:
            torch.set_num_threads(prev)


def _chosen(q, cache, **kw):
    return sa.plan_with_cache(q, cache, **kw).kernel.backend


def test_which_backend_and_why():
    b, hkv, d = 2, 2, 64
    c32 = PagedKVCache(b, hkv, d, num_pages=8, page_size=16, max_len=64, dtype=torch.float32)
    c64 = KVCache(b, hkv, d, 64, dtype=torch.float64)
    for c in (c32, c64):
        c.append(randn(b, hkv, 20, d, dtype=c.dtype), randn(b, hkv, 20, d, dtype=c.dtype))
    q = randn(b, 4, 1, d)
    assert _chosen(q, c32) == "cpu"
    # float64: the PyTorch path by default (explain says why not cpu), a forced "cpu" says why
    q64 = randn(b, 4, 1, d, dtype=torch.float64)
    plan = sa.plan_with_cache(q64, c64)
    why = {c.kernel.name: "; ".join(c.reasons) for c in plan.candidates}
    assert plan.kernel.backend == "reference" and "float64" in why["cpu.decode"]
    assert "float64" in plan.explain()
    with pytest.raises(ValueError, match="float64"):
        attention_with_cache(q64, c64, backend="cpu")
    # more rows than a decode kernel serves
    q17 = randn(b, 4, 17, d)
    assert _chosen(q17, c32) == "reference"
    with pytest.raises(ValueError, match="Sq = 17"):
        attention_with_cache(q17, c32, backend="cpu")
    # autograd through q: the inference kernel is not chosen
    qg = randn(b, 4, 1, d, requires_grad=True)
    assert _chosen(qg, c32) == "reference"
    with torch.no_grad():
        assert _chosen(qg, c32) == "cpu"
    with pytest.raises(ValueError, match="npu"):  # no npu kernel reads caches
        sa.plan_with_cache(q, c32, backend="npu")
    with pytest.raises(ValueError, match="backend must be"):
        sa.plan_with_cache(q, c32, backend="gpu")
    # the Triton interpreter is never chosen on its own for a CPU cache
    assert _chosen(q, c32, backend=None) != "triton"
