"""KV caches (contiguous and paged) and attention over them, against the float64 oracle.

* a random sequence of ragged appends and queries across a batch of different lengths equals the
  oracle applied to each sequence on its own (end-aligned queries);
* paged equals contiguous, before and after `release_outside` frees pages of a sliding window;
* the pooled keys the cache keeps equal the block means of the stored keys (TopK selection);
* bad input raises ValueError/TypeError naming the argument.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import make_pattern, randn, topk_margin
from sparse_attn.cache import KVCache, PagedKVCache, attention_with_cache
from sparse_attn.layout.topk_selection import pooled_keys

BS = 16
KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "topk", "topk_wide"]


def _caches(b, hkv, d, max_len, dtype, pool=BS, page_size=8):
    pages = b * -(-max_len // page_size)
    return (KVCache(b, hkv, d, max_len, dtype=dtype, pool_block_size=pool),
            PagedKVCache(b, hkv, d, num_pages=pages, page_size=page_size, max_len=max_len, dtype=dtype,
                         pool_block_size=pool))


def _fill(caches, full_k, full_v, lengths, steps):
    """Append each sequence's tokens in ragged steps (`steps`: tokens per call)."""
    b = full_k.shape[0]
    done = [0] * b
    for t in steps:
        counts = [min(t, n - dn) for n, dn in zip(lengths, done)]
        k = torch.zeros(b, full_k.shape[1], t, full_k.shape[3], dtype=full_k.dtype, device=full_k.device)
        v = torch.zeros(b, full_v.shape[1], t, full_v.shape[3], dtype=full_v.dtype, device=full_v.device)
        for i in range(b):
            k[i, :, :counts[i]] = full_k[i, :, done[i]:done[i] + counts[i]]
            v[i, :, :counts[i]] = full_v[i, :, done[i]:done[i] + counts[i]]
            # padding rows carry garbage: they must never be read
            k[i, :, counts[i]:] = 1e4
            v[i, :, counts[i]:] = -1e4
        for c in caches:
            c.append(k, v, counts)
        done = [dn + cn for dn, cn in zip(done, counts)]
    assert done == lengths


def _pattern_for(kind, b, hkv, max_len):
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=BS)
    return pat


def _row_pattern(pat, i, n):
    """The pattern as `attention` on sequence i alone (BlockSparse: its corner of the layout)."""
    if isinstance(pat, sa.BlockSparse):
        nb = -(-n // pat.block_size)
        lay = pat.layout[i:i + 1] if pat.layout.shape[0] > 1 else pat.layout
        return sa.BlockSparse(lay[:, :, :nb, :nb], block_size=pat.block_size)
    return pat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_ragged_appends_match_oracle(kind, dtype):
    b, hq, hkv, d = 3, 4, 2, 32
    lengths = [37, 81, 64]
    max_len = 96
    pat = _pattern_for(kind, b, hkv, max_len)
    for _ in range(50):  # redraw until no TopK choice hangs on rounding
        full_k = randn(b, hkv, max(lengths), d, dtype=dtype)
        full_v = randn(b, hkv, max(lengths), d, dtype=dtype)
        q = randn(b, hq, 3, d, dtype=dtype)
        if not isinstance(pat, sa.TopK) or all(
                topk_margin(q[i:i + 1], full_k[i:i + 1, :, :n], pat) > 1e-3 for i, n in enumerate(lengths)):
            break
    caches = _caches(b, hkv, d, max_len, dtype, pool=getattr(pat, "block_size", BS))
    _fill(caches, full_k, full_v, lengths, steps=[20, 1, 7, 60])
    for sq in (1, 3):
        qs = q[:, :, -sq:]
        outs = [attention_with_cache(qs, c, pat) for c in caches]
        assert torch.equal(outs[0], outs[1]), "paged != contiguous"
        for i, n in enumerate(lengths):
            rp = _row_pattern(pat, i, n)
            args = (qs[i:i + 1], full_k[i:i + 1, :, :n], full_v[i:i + 1, :, :n])
            ref = oracle.oracle_attention(*args, rp)
            base = oracle.masked_attention_in_dtype(*args, rp)
            oracle.assert_close_contract(outs[0][i:i + 1], ref, dtype=dtype, device="cpu", lowp_baseline=base,
                                         what=f"{kind} seq {i} Sq={sq}")


def test_decode_loop_equals_prefill_rows():
    """Append one token at a time and decode it: each output equals that row of one prefill."""
    b, hq, hkv, d, s = 2, 4, 1, 16, 45
    pat = sa.TopK(2, block_size=8, sink_blocks=1, local_blocks=1)
    q, k, v = (randn(b, hq, s, d, dtype=torch.float64), randn(b, hkv, s, d, dtype=torch.float64),
               randn(b, hkv, s, d, dtype=torch.float64))
    full = sa.attention(q, k, v, pat, backend="reference")
    for cache in _caches(b, hkv, d, 64, torch.float64, pool=8):
        for t in range(s):
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            o = attention_with_cache(q[:, :, t:t + 1], cache, pat)
            torch.testing.assert_close(o, full[:, :, t:t + 1], rtol=1e-10, atol=1e-12)


def test_pooled_keys_are_block_means():
    b, hkv, d = 2, 3, 8
    lengths = [29, 50]
    full_k = randn(b, hkv, 50, d)
    full_v = randn(b, hkv, 50, d)
    caches = _caches(b, hkv, d, 64, torch.float32, pool=8)
    _fill(caches, full_k, full_v, lengths, steps=[5, 30, 20])
    for c in caches:
        got = c.pooled_keys(-(-max(lengths) // 8))
        for i, n in enumerate(lengths):
            want = pooled_keys(full_k[i:i + 1, :, :n], 8, torch.float32)
            torch.testing.assert_close(got[i:i + 1, :, :want.shape[2]], want, rtol=1e-5, atol=1e-6)
            assert (got[i, :, want.shape[2]:] == 0).all()


def test_sliding_window_releases_pages_and_keeps_results():
    b, hq, hkv, d = 2, 2, 1, 16
    pat = sa.SlidingWindow(20, sinks=3)
    contiguous, paged = _caches(b, hkv, d, 200, torch.float32, page_size=8)
    k = randn(b, hkv, 200, d)
    v = randn(b, hkv, 200, d)
    freed_total = 0
    for t0 in range(0, 160, 16):
        for c in (contiguous, paged):
            c.append(k[:, :, t0:t0 + 16], v[:, :, t0:t0 + 16])
        freed_total += paged.release_outside(pat)
        q = randn(b, hq, 1, d)
        torch.testing.assert_close(attention_with_cache(q, paged, pat), attention_with_cache(q, contiguous, pat),
                                   rtol=0, atol=0)
    # 160 tokens: pages of keys < 160 - 20 = 140, except the sink page, are gone
    assert freed_total == b * (140 // 8 - 1)
    in_use = paged.num_pages - paged.free_pages
    assert in_use == b * (1 + 20 // 8 + 1)  # sink page + the window's pages (<= 3 for 20 keys over 8-token pages)


def test_free_returns_pages_and_empties_sequence():
    _, paged = _caches(2, 1, 8, 32, torch.float32, page_size=8)
    paged.append(randn(2, 1, 20, 8), randn(2, 1, 20, 8))
    before = paged.free_pages
    paged.free(0)
    assert paged.free_pages == before + 3
    assert paged.host_lengths == [0, 20] and paged.lengths.tolist() == [0, 20]


@pytest.mark.parametrize("case", ["k_shape", "k_dtype", "num_new_tensor", "num_new_range", "overflow",
                                  "pages", "q_rows", "q_dtype", "topk_block", "pattern", "cache"])
def test_bad_input(case):
    c = KVCache(2, 2, 8, 16)
    p = PagedKVCache(2, 2, 8, num_pages=2, page_size=8, max_len=64)
    k = randn(2, 2, 4, 8)
    if case == "k_shape":
        with pytest.raises(ValueError, match="k must have shape"):
            c.append(randn(2, 3, 4, 8), k)
    elif case == "k_dtype":
        with pytest.raises(TypeError, match="k must have the cache's dtype"):
            c.append(k.double(), k)
    elif case == "num_new_tensor":
        with pytest.raises(TypeError, match="num_new"):
            c.append(k, k, torch.tensor([1, 2]))
    elif case == "num_new_range":
        with pytest.raises(ValueError, match="num_new"):
            c.append(k, k, [5, 1])
    elif case == "overflow":
        c.append(randn(2, 2, 16, 8), randn(2, 2, 16, 8))
        with pytest.raises(ValueError, match="at most 16"):
            c.append(k, k)
    elif case == "pages":
        with pytest.raises(ValueError, match="pages"):
            p.append(randn(2, 2, 9, 8), randn(2, 2, 9, 8))
    elif case == "q_rows":
        c.append(k, k)
        with pytest.raises(ValueError, match="fewer tokens than q has rows"):
            attention_with_cache(randn(2, 2, 5, 8), c)
    elif case == "q_dtype":
        c.append(k, k)
        with pytest.raises(TypeError, match="q must have the cache's dtype"):
            attention_with_cache(randn(2, 2, 1, 8, dtype=torch.float64), c)
    elif case == "topk_block":
        c.append(k, k)
        with pytest.raises(ValueError, match="pool_block_size"):
            attention_with_cache(randn(2, 2, 1, 8), c, sa.TopK(2, block_size=32))
    elif case == "pattern":
        c.append(k, k)
        with pytest.raises(TypeError, match="pattern"):
            attention_with_cache(randn(2, 2, 1, 8), c, sa.WindowLinear(4))
    elif case == "cache":
        with pytest.raises(TypeError, match="cache"):
            attention_with_cache(randn(2, 2, 1, 8), k)


def _thp_mode() -> str:
    """Linux's transparent huge page mode line ("always [madvise] never"), "" where there is none."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


def test_cache_storage_advised_as_huge_pages():
    """CPU caches allocate their storage through cache/huge_pages.py: zeros of the right shape,
    and on Linux with THP not "never", a large tensor really gets the madvise (the call's return
    value: wrong arguments would make it fail)."""
    import sys

    from sparse_attn.cache import huge_pages

    t = huge_pages.zeros(2, 3, 5, dtype=torch.bfloat16, device="cpu")
    assert t.shape == (2, 3, 5) and t.dtype == torch.bfloat16 and not t.any()
    assert huge_pages.advise_huge(torch.empty(1024)) is False  # under 4 MB: no advice
    big = torch.empty(3 << 20)  # 12 MB
    thp = _thp_mode()
    if not sys.platform.startswith("linux"):
        assert huge_pages.advise_huge(big) is False
    elif thp and "[never]" not in thp:  # (with THP "never" the call may succeed or not: unchecked)
        assert huge_pages.advise_huge(big) is True
    c = sa.KVCache(1, 2, 64, 40000, dtype=torch.bfloat16)  # 10 MB of K: advised, still zeros
    assert c.k.shape == (1, 2, 40001, 64) and not c.k.any() and not c.v.any()


def test_collapse_keeps_contents_and_reports_huge_pages():
    """`huge_pages.collapse` moves touched storage (a cache someone else allocated: vLLM's) into
    2 MB pages: the contents stay, and the bytes it reports are huge pages in /proc/self/smaps."""
    import sys

    from sparse_attn.cache import huge_pages

    x = torch.randn(3 << 20)  # 12 MB, touched: 4 KB pages unless THP is "always"
    before = x.clone()
    view = x[5:1000]  # a view: its whole storage is what gets collapsed
    done = huge_pages.collapse(view)
    assert torch.equal(x, before)
    assert done % (2 << 20) == 0 and done <= x.numel() * 4
    if sys.platform.startswith("linux"):
        huge = huge_pages.huge_bytes(x)
        assert huge is not None and huge >= done
    else:
        assert done == 0
    small = torch.arange(1000.0)
    assert huge_pages.collapse(small) == 0 and torch.equal(small, torch.arange(1000.0))


def test_background_collapse_keeps_contents_while_written():
    """`huge_pages.Background` collapses storage in use from its own thread: a writer changing the
    storage meanwhile loses no write, the untouched contents stay, and where Linux collapses at all
    the storage ends in huge pages. Two storages queued together both finish."""
    import sys

    from sparse_attn.cache import huge_pages

    x = torch.randn(10 << 20)  # 40 MB, touched: two 32 MB slices
    y = torch.randn(3 << 20)
    before_y = y.clone()
    jobs = [huge_pages.Background.start(x), huge_pages.Background.start(y)]
    if not sys.platform.startswith("linux"):
        assert jobs == [None, None]
        return
    assert None not in jobs
    rows = x.view(-1, 4096)
    for i in range(0, rows.shape[0], 7):  # writes racing the copies
        rows[i] = float(i)
    assert all(j.wait(120) for j in jobs) and all(j.seconds >= 0 for j in jobs)
    assert torch.equal(rows[::7, 0], torch.arange(0, rows.shape[0], 7, dtype=torch.float32))
    assert torch.equal(y, before_y)
    assert huge_pages.Background.start(torch.randn(1000)) is None  # no whole 2 MB page
    thp = _thp_mode()
    if thp and "[never]" not in thp and huge_pages.collapse(torch.randn(3 << 20)) > 0:  # Linux collapses here
        assert huge_pages.huge_bytes(x) >= 32 << 20
