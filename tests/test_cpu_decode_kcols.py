"""The CPU decode kernel over float32 pages that keep K as columns (csrc/cpu/decode_kcols.h).

The vLLM plugin stores float32 K so (`integrations.vllm.pages.split_pages`: each (page, kv head)
block's K half is D rows of page_size values). Checked here, through the binding as the plugin
calls it:
* Dense, SlidingWindow (with sinks: a window's first key anywhere in a page) and TopK over pages in
  random order equal the float64 oracle on each sequence's keys, for page sizes below, at and above
  the kernel's 16-key chunks, head dims that are and are not multiples of 16, Sq 1 and 3, GQA 1-4
  (row groups of 1-4), lengths that are multiples of nothing;
* the same bits with the prefetches forced on, off or as the reuse clock says, 1 and 2 threads;
* the scores are not the K rows' (another summation order) but within the contract of them;
* a layout the kernel cannot read as columns is refused with a ValueError naming `k`.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, topk_margin
from sparse_attn.backends.cpu.decode import _decode_fwd
from sparse_attn.integrations.vllm.pages import PagesCache, split_pages

pytestmark = needs_jit


def _pages(lengths, *, hkv, d, ps, seed):
    """Two pools `(pages, Hkv, ps, 2 D)` float32 holding the same tokens through one random page table,
    every row never written NaN: {True: K as columns (the plugin's float32 pages), False: K rows};
    then the table, lengths, per-sequence K/V `(1, Hkv, n, D)` and the page sums."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // ps) for n in lengths)
    pool = len(lengths) * width + 3
    kv = {c: torch.full((pool, hkv, ps, 2 * d), float("nan")) for c in (True, False)}
    sums = torch.zeros(pool, hkv, d)
    order = torch.randperm(pool, generator=g)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    ks, vs = [], []
    for b, n in enumerate(lengths):
        table[b, :-(-n // ps)] = order[b * width:b * width + -(-n // ps)].to(torch.int32)
        k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
        pos = torch.arange(n)
        page, row = table[b, pos // ps].long(), pos % ps
        for columns, pages in kv.items():
            kp, vp = split_pages(pages, columns=columns)
            kp[page, :, row], vp[page, :, row] = k, v
        sums.index_add_(0, page, k)
        ks.append(k.permute(1, 0, 2)[None])
        vs.append(v.permute(1, 0, 2)[None])
    return kv, table, torch.tensor(lengths, dtype=torch.int32), ks, vs, sums


def _run(q, kv, table, lens, pattern, *, columns, prefetch=-1):
    kp, vp = split_pages(kv[columns], columns=columns)
    assert (kp.stride(2) == 1) == columns
    return _decode_fwd(q, kp, vp, pattern, scale=q.shape[-1] ** -0.5, token_index=None, lengths=lens,
                       page_table=table, page_size=kp.shape[2], prefetch=prefetch)[0]


@pytest.mark.parametrize("ps", [8, 16, 48])
@pytest.mark.parametrize("d", [40, 64])
@pytest.mark.parametrize("hq,hkv,sq", [(4, 2, 1), (8, 2, 1), (3, 3, 3), (4, 2, 3)])
@pytest.mark.parametrize("kind", ["dense", "window_sinks", "topk"])
def test_columns_equal_the_oracle(ps, d, hq, hkv, sq, kind):
    lengths = [301, 37, 170]
    pattern = {"dense": sa.Dense(), "window_sinks": sa.SlidingWindow(45, sinks=3),
               "topk": sa.TopK(topk=3, block_size=ps)}[kind]
    for seed in range(20):  # TopK: redraw inputs whose selection is a near tie
        kv, table, lens, ks, vs, sums = _pages(lengths, hkv=hkv, d=d, ps=ps, seed=seed)
        q = torch.randn(len(lengths), hq, sq, d)
        if kind != "topk" or all(topk_margin(q[b:b + 1].double(), ks[b].double(), pattern) > 1e-3
                                 for b in range(len(lengths))):
            break
    outs = []
    for columns in (True, False):  # as the plugin reads its pages: PagesCache -> attention_with_cache
        cache = PagesCache(kv[columns], table, lens, lengths, page_sums=sums if kind == "topk" else None,
                           pages=split_pages(kv[columns], columns=columns))
        assert (cache.k_pages.stride(2) == 1) == columns
        assert sa.plan_with_cache(q, cache, pattern).kernel.name == "cpu.decode"
        outs.append(sa.attention_with_cache(q, cache, pattern))
    out, rows = outs
    for b in range(len(lengths)):
        ref = oracle.oracle_attention(q[b:b + 1].double(), ks[b].double(), vs[b].double(), pattern)
        oracle.assert_close_contract(out[b:b + 1], ref, dtype=torch.float32, device="cpu", what=f"{kind} seq {b}")
        oracle.assert_close_contract(rows[b:b + 1], ref, dtype=torch.float32, device="cpu", what=f"rows seq {b}")


def test_columns_same_bits_for_threads_and_prefetch():
    """One long sequence (several splits with 2 threads), Dense and a window: the prefetches (forced
    on: the next segment's column blocks, the pages two segments ahead) change where memory is
    touched, never the bits; and the columns' bits are not the K rows' (a test that compared the
    same path twice would pass either way)."""
    kv, table, lens, ks, vs, _ = _pages([5000, 700], hkv=2, d=64, ps=16, seed=7)
    q = torch.randn(2, 4, 1, 64)
    threads = torch.get_num_threads()
    try:
        for pattern in (sa.Dense(), sa.SlidingWindow(1500, sinks=4)):
            for threads in (1, 2):  # (the splits, hence the merge's bits, follow the thread count)
                torch.set_num_threads(threads)
                want = _run(q, kv, table, lens, pattern, columns=True, prefetch=0)
                assert torch.equal(_run(q, kv, table, lens, pattern, columns=True, prefetch=1), want)
                assert torch.equal(_run(q, kv, table, lens, pattern, columns=True, prefetch=-1), want)
                rows = _run(q, kv, table, lens, pattern, columns=False)
                assert not torch.equal(rows, want)
                torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_columns_refused_where_the_kernel_cannot_read_them():
    """Columns of bfloat16 (their products read pairs of rows), and columns whose pages are not whole
    blocks apart (the kernel finds a key's row in its page from its column's offset in the pool)."""
    kv, table, lens, _, _, _ = _pages([40], hkv=2, d=32, ps=16, seed=1)
    q = torch.randn(1, 2, 1, 32)
    kpb, vpb = split_pages(kv[True].bfloat16(), columns=True)
    kp, vp = split_pages(kv[True], columns=True)
    pool, hkv, ps, d = kp.shape
    odd = torch.zeros(pool * (hkv * d * ps + 4)).as_strided((pool, hkv, ps, d), (hkv * d * ps + 4, d * ps, 1, ps))
    odd.copy_(kp)
    for k, v, qq in [(kpb, vpb, q.bfloat16()), (odd, vp, q)]:
        assert k.stride(2) == 1
        with pytest.raises(ValueError, match="k as columns"):
            _decode_fwd(qq, k, v, sa.Dense(), scale=1.0, token_index=None, lengths=lens, page_table=table,
                        page_size=16)
    _decode_fwd(q, kp, vp, sa.Dense(), scale=1.0, token_index=None, lengths=lens, page_table=table, page_size=16)
