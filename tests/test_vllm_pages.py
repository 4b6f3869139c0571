"""The vLLM integration's page layout and pattern choice, without vLLM (sparse_attn.integrations.vllm).

* `write_pages` stores each token at its slot of vLLM's `(pages, Hkv, page_size, 2 * D)` tensor
  (K rows then V rows per (page, kv head)), skips padding slots (-1), and keeps the per-page key
  sums right when a page is reused (written again from its first row);
* decode over those pages (`PagesCache` -> `attention_with_cache`, the CPU split-KV kernel reading
  vLLM's block table in place) equals the float64 oracle on each sequence's keys for Dense and
  SlidingWindow (sinks too), and TopK equals the oracle where its selection is not a near tie;
* TopK's C++ selection reads the page sums through vLLM's block table where they lie
  (`topk_select_sums(..., page_table)`, no per-step gather): its indices equal, exactly, the
  PyTorch definition (`topk_index_over_cache`) and the selection from the sums gathered per
  sequence, with shared pages, stale table entries past a length, Sq 1-16, GQA, NaN keys;
* `gather_keys` (what a prefill chunk attends to) equals the sequence's rows;
* InfLLMv2's window sums kept beside the pages (`PageWindows`: each window in the page of its last
  row, completed from the chunk sums as its last row is written) equal the sums of each sequence's
  keys, with stale pages, prefix-shared pages and a reused page; the C++ selection reading them
  through the block table (`infllmv2_select_pages`) gives exactly the picks of the PyTorch
  selection over each sequence's gathered sums; decode over the pages equals the float64 evaluation;
* `SPARSE_ATTN_VLLM_PATTERN`'s grammar (`infllmv2:field=value,...` too), the per-layer rule (a
  sliding layer keeps its window), and `ValueError`s naming the variable for bad values.
The end-to-end tests with vLLM itself are in tests/vllm_serving/ (their own venv).
"""
from __future__ import annotations

import random

import pytest
import torch

import infllmv2_oracle as O
import oracle
import sparse_attn as sa
from conftest import NO_JIT, needs_jit, topk_margin
from test_infllmv2 import CONFIGS
from sparse_attn.integrations.vllm import parse_pattern, register
from sparse_attn.cache.view import KVView
from sparse_attn.integrations.vllm.pages import (PagesCache, PageWindows, gather_keys, split_pages, write_pages,
                                                write_pages_indexed)
from sparse_attn.layout.topk_selection import topk_index_over_cache
from sparse_attn.integrations.vllm.patterns import ENV, layer_pattern



def _fill(lengths, *, hkv, d, page_size, num_pages, seed, dtype=torch.float32, chunks=3, windows=None):
    """vLLM-style pages holding `lengths` tokens per sequence, written in `chunks` steps with
    random page ids and padding slots (`windows`, a `PageWindows`, completed after each step as the
    backend's `forward` does); returns (kv_cache, block_table, page_sums, K, V) where K/V are the
    per-sequence keys/values `(1, Hkv, n, D)`."""
    g = torch.Generator().manual_seed(seed)
    write = write_pages_indexed if NO_JIT else write_pages  # the CPU writer is the extension's
    kv = torch.full((num_pages, hkv, page_size, 2 * d), float("nan"), dtype=dtype)  # never-written rows: NaN
    sums = torch.full((num_pages, hkv, d), 7.0)  # stale sums of a page used before
    free = list(range(num_pages))
    random.Random(seed).shuffle(free)
    width = max(-(-n // page_size) for n in lengths)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    for b, n in enumerate(lengths):
        for s in range(-(-n // page_size)):
            table[b, s] = free.pop()
    ks = [torch.randn(1, hkv, n, d, generator=g).to(dtype) for n in lengths]
    vs = [torch.randn(1, hkv, n, d, generator=g).to(dtype) for n in lengths]
    cuts = [sorted({0, n, *[int(x) for x in torch.randint(0, n + 1, (chunks - 1,), generator=g)]}) for n in lengths]
    for step in range(chunks):
        keys, vals, slots, spans = [], [], [], []
        for b, n in enumerate(lengths):
            if step + 1 >= len(cuts[b]):
                continue
            lo, hi = cuts[b][step], cuts[b][step + 1]
            spans.append((b, lo, hi))
            pos = torch.arange(lo, hi)
            slots.append(table[b, pos // page_size].long() * page_size + pos % page_size)
            keys.append(ks[b][0, :, lo:hi].transpose(0, 1))
            vals.append(vs[b][0, :, lo:hi].transpose(0, 1))
        pad = 2  # padding tokens of a step: slot -1, never stored
        keys.append(torch.randn(pad, hkv, d, generator=g).to(dtype))
        vals.append(torch.randn(pad, hkv, d, generator=g).to(dtype))
        slots.append(torch.full((pad,), -1))
        write(kv, torch.cat(keys), torch.cat(vals), torch.cat(slots), sums, windows)
        if windows is not None:
            windows.complete(table, spans)
    return kv, table, sums, ks, vs


def test_write_and_gather():
    lengths = [37, 5, 64]
    kv, table, sums, ks, vs = _fill(lengths, hkv=2, d=8, page_size=16, num_pages=20, seed=1)
    kp, vp = split_pages(kv)
    # float32 pages keep K as columns (split_pages' default): stride 1 along the rows
    assert kp.shape == (20, 2, 16, 8) and kp.stride()[2:] == (1, 16) and kp.data_ptr() == kv.data_ptr()
    assert vp.stride(-1) == 1 and split_pages(kv, columns=False)[0].stride()[2:] == (8, 1)
    for b, n in enumerate(lengths):
        assert torch.equal(gather_keys(kp, table[b], 0, n), ks[b])
        assert torch.equal(gather_keys(vp, table[b], 0, n), vs[b])
        lo = 9  # a window's tail only
        assert torch.equal(gather_keys(kp, table[b], min(lo, n), n), ks[b][:, :, min(lo, n):])
        for s in range(-(-n // 16)):  # the page sums are the sums of each page's keys, stale sums gone
            want = ks[b][0, :, s * 16:(s + 1) * 16].sum(1)
            torch.testing.assert_close(sums[table[b, s]], want, rtol=1e-6, atol=1e-5)


@needs_jit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("n,d", [(45, 8), (1500, 40)], ids=["few", "many"])
def test_the_cpu_writer_is_the_indexed_definition(dtype, n, d):
    """The extension's `write_page_rows` (`write_pages` on the CPU) leaves the pages and the page
    sums as the PyTorch definition (`write_pages_indexed`) does: one call over all the rows, or
    decode-like calls of a few rows with a padding slot each; rows read through their strides (a
    view of a wider projection), int32 or int64 slots, stale sums restarted at a page's row 0, rows
    out of order within a page. 1500 rows on 2 threads: the copies split among the threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(3)
        hkv, ps = 2, 16
        used, pool = -(-n // ps), -(-n // ps) + 9
        table = torch.randperm(pool, generator=g)[:used]  # the rows in shuffled pages
        pos = torch.arange(n)
        slots = table[pos // ps] * ps + pos % ps
        proj = torch.randn(n, hkv, 3 * d, generator=g).to(dtype)  # (T, Hkv, q|k|v)-like rows: strided views
        k, v = proj[:, :, d:2 * d], proj[:, :, 2 * d:]
        assert not k.is_contiguous()
        want_kv, want_sums = torch.zeros(pool, hkv, ps, 2 * d, dtype=dtype), torch.full((pool, hkv, d), 7.0)
        write_pages_indexed(want_kv, k, v, slots, want_sums)
        one_kv, one_sums = torch.zeros_like(want_kv), torch.full((pool, hkv, d), 7.0)
        order = torch.randperm(n, generator=g)  # rows in any order: the sums restart before any row adds
        write_pages(one_kv, k[order], v[order], slots[order].int(), one_sums, pages=split_pages(one_kv))
        assert torch.equal(one_kv, want_kv)
        torch.testing.assert_close(one_sums[table], want_sums[table], rtol=1e-6, atol=1e-5)
        assert bool((one_sums[[i for i in range(pool) if i not in table.tolist()]] == 7).all())  # pages not written
        steps_kv, steps_sums = torch.zeros_like(want_kv), torch.full((pool, hkv, d), 7.0)
        for a in range(0, n, 3):  # 3 rows and a padding slot per call, slot_mapping longer than the rows
            b = min(n, a + 3)
            write_pages(steps_kv, torch.cat([k[a:b], k[:1]]), torch.cat([v[a:b], v[:1]]),
                        torch.cat([slots[a:b], torch.tensor([-1, 5])]), steps_sums)
        assert torch.equal(steps_kv, want_kv)
        torch.testing.assert_close(steps_sums[table], want_sums[table], rtol=1e-6, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@needs_jit
def test_the_cpu_writer_refuses_bad_input():
    from sparse_attn._build import load_extension
    ext = load_extension("cpu_decode")
    kv = torch.zeros(4, 2, 16, 16)
    kp, vp = split_pages(kv)
    k = torch.randn(3, 2, 8)
    slots = torch.tensor([0, 17, 63])
    with pytest.raises(ValueError, match=r"slots\[2\] = 64 is outside the pages \[0, 64\)"):
        ext.write_page_rows(kp, vp, k, k, slots + 1)
    with pytest.raises(TypeError, match="key must have k_pages's dtype"):
        ext.write_page_rows(kp, vp, k.double(), k, slots)
    with pytest.raises(ValueError, match="value must be"):
        ext.write_page_rows(kp, vp, k, k[:2], slots)
    with pytest.raises(ValueError, match="slots must be"):
        ext.write_page_rows(kp, vp, k, k, slots.float())
    with pytest.raises(ValueError, match="sums must be"):
        ext.write_page_rows(kp, vp, k, k, slots, torch.zeros(4, 2, 9))
    assert bool((kv == 0).all())  # nothing written by a refused call


def test_gather_into_scratch():
    """`gather_keys` with a `Scratch`: the same rows, a view of the scratch's buffer (reused, grown
    when a longer sequence comes), K and V in their own slots; pages that do not flatten into
    (page, head) blocks take the indexing path and give the same rows."""
    from sparse_attn.integrations.vllm.pages import Scratch

    lengths = [37, 5, 64]
    kv, table, sums, ks, vs = _fill(lengths, hkv=2, d=8, page_size=16, num_pages=20, seed=2)
    kp, vp = split_pages(kv)
    sc = Scratch()
    for b in [0, 1, 2, 0]:  # short after long: the buffer is reused, not shrunk
        n = lengths[b]
        for lo in (0, min(9, n)):
            k = gather_keys(kp, table[b], lo, n, sc, 0)
            v = gather_keys(vp, table[b], lo, n, sc, 1)
            assert torch.equal(k, ks[b][:, :, lo:]) and torch.equal(v, vs[b][:, :, lo:])
            assert k.untyped_storage().data_ptr() == sc.get(0, 1, kp.dtype).untyped_storage().data_ptr()
            assert v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    assert sc.get(0, 1, kp.dtype).numel() >= 2 * 64 * 8  # grown to the longest (4 pages of 16 rows, 2 heads)
    odd = kp.transpose(0, 1).contiguous().transpose(0, 1)  # (pages, Hkv, ps, D) whose heads are outermost
    for b, n in enumerate(lengths):
        assert torch.equal(gather_keys(odd, table[b], 3 % n, n, sc, 0), ks[b][:, :, 3 % n:])


def test_bad_kv_cache_shape():
    with pytest.raises(ValueError, match="kv_cache"):
        split_pages(torch.zeros(4, 2, 16, 7))


@needs_jit
@pytest.mark.parametrize("kind", ["dense", "window", "window_sinks", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_vllm_pages(kind, dtype):
    hq, hkv, d, ps = 4, 2, 64, 16
    lengths = [150, 33, 97]
    pattern = {"dense": sa.Dense(), "window": sa.SlidingWindow(40), "window_sinks": sa.SlidingWindow(24, sinks=5),
               "topk": sa.TopK(topk=2, block_size=ps)}[kind]
    for seed in range(20):  # TopK: redraw inputs whose selection is a near tie
        kv, table, sums, ks, vs = _fill(lengths, hkv=hkv, d=d, page_size=ps, num_pages=40, seed=seed, dtype=dtype)
        q = torch.randn(len(lengths), hq, 1, d).to(dtype)
        if kind != "topk" or all(topk_margin(q[b:b + 1].double(), ks[b].double(), pattern) > 1e-3
                                 for b in range(len(lengths))):
            break
    cache = PagesCache(kv, table, torch.tensor(lengths, dtype=torch.int32), lengths,
                       page_sums=sums if kind == "topk" else None)
    plan = sa.plan_with_cache(q, cache, pattern)
    assert plan.kernel.name == "cpu.decode", plan.explain()
    out = sa.attention_with_cache(q, cache, pattern)
    for b in range(len(lengths)):
        ref = oracle.oracle_attention(q[b:b + 1].double(), ks[b].double(), vs[b].double(), pattern)
        oracle.assert_close_contract(out[b:b + 1], ref, dtype=dtype, device="cpu", what=f"{kind} sequence {b}")


def _gathered_view(view: KVView) -> KVView:
    """The same view with its page sums copied per sequence `(B, Hkv, W + 1, D)` (what the plugin
    did every step before the selection read the pages through the table)."""
    sums = view.block_sums[view.page_table.long()].permute(0, 2, 1, 3)
    sums = torch.cat([sums, torch.zeros_like(sums[:, :, :1])], 2).contiguous()
    return KVView(kind="paged", k=view.k, v=view.v, page_table=view.page_table, page_size=view.page_size,
                  lengths=view.lengths, host_lengths=view.host_lengths, block_sums=sums,
                  pool_block_size=view.pool_block_size, max_len=view.max_len)


@needs_jit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("sq,hq,hkv,ps,topk,sinks,locals_", [(1, 8, 2, 16, 4, 1, 1), (5, 4, 4, 8, 3, 0, 2),
                                                             (16, 6, 3, 16, 40, 2, 1), (1, 4, 2, 16, 2, 1, 3)])
def test_topk_selection_reads_page_sums_in_place(dtype, sq, hq, hkv, ps, topk, sinks, locals_):
    from sparse_attn.backends.cpu.decode import _ext
    d = 24
    lengths = [301, 3, 129, 64]  # the second: shorter than Sq for Sq > 3 (rows before the first key)
    kv, table, sums, ks, _ = _fill(lengths, hkv=hkv, d=d, page_size=ps, num_pages=80, seed=sq + ps, dtype=dtype)
    # a prefix shared by two sequences (prefix caching: the same pages in both tables), and stale page
    # ids past each length (vLLM leaves old entries in a table row): neither may change the selection
    nshared = -(-lengths[3] // ps) - 1
    table[3, :nshared] = table[0, :nshared]
    table = torch.cat([table, torch.randint(0, 80, (len(lengths), 3), dtype=torch.int32)], 1)
    for b, n in enumerate(lengths):
        table[b, -(-n // ps):] = torch.randint(0, 80, (table.shape[1] - -(-n // ps),), dtype=torch.int32)
    q = torch.randn(len(lengths), hq, sq, d).to(dtype)
    view = PagesCache(kv, table, torch.tensor(lengths, dtype=torch.int32), lengths, page_sums=sums).kv_view()
    assert view.sums_by_page and view.block_sums.data_ptr() == sums.data_ptr()  # the pages' own sums, no copy
    pat = sa.TopK(topk, block_size=ps, sink_blocks=sinks, local_blocks=locals_)
    got = _ext().topk_select_sums(q, sums, lengths, ps, topk, sinks, locals_, table)
    want = topk_index_over_cache(q, view, pat)  # the PyTorch definition, through the table
    assert got.dtype == torch.int32 and got.shape == want.shape == (len(lengths), hkv, sq, topk)
    assert torch.equal(got, want)
    gathered = _gathered_view(view)
    assert torch.equal(want, topk_index_over_cache(q, gathered, pat))
    assert torch.equal(got, _ext().topk_select_sums(q, gathered.block_sums, lengths, ps, topk, sinks, locals_))
    assert (got[0] >= 0).any()  # something was selected


@needs_jit
def test_topk_page_sums_nan_and_bad_table():
    from sparse_attn.backends.cpu.decode import _ext
    ps = 16
    lengths = [200]
    kv, table, sums, ks, _ = _fill(lengths, hkv=1, d=8, page_size=ps, num_pages=20, seed=3)
    sums[table[0, 2]] = float("nan")  # block 2: a NaN key ranks first, as torch.topk ranks it
    q = torch.randn(1, 2, 1, 8)
    view = PagesCache(kv, table, torch.tensor(lengths, dtype=torch.int32), lengths, page_sums=sums).kv_view()
    got = _ext().topk_select_sums(q, sums, lengths, ps, 2, 1, 1, table)
    assert 2 in got[0, 0, 0].tolist()
    assert torch.equal(got, topk_index_over_cache(q, view, sa.TopK(2, block_size=ps)))
    bad = table.clone()
    bad[0, 5] = 20  # not a page of the sums
    with pytest.raises(RuntimeError, match="is not a page"):
        _ext().topk_select_sums(q, sums, lengths, ps, 2, 1, 1, bad)
    with pytest.raises(RuntimeError, match="needs more blocks than the page table"):
        _ext().topk_select_sums(q, sums, [10 ** 4], ps, 2, 1, 1, table)
    with pytest.raises(RuntimeError, match="page_table must be int32"):
        _ext().topk_select_sums(q, sums, lengths, ps, 2, 1, 1, table.long())
    with pytest.raises(RuntimeError, match="page sums must be float32"):
        _ext().topk_select_sums(q, sums.double(), lengths, ps, 2, 1, 1, table)


def test_sums_by_page_view_checks():
    kv = torch.zeros(4, 1, 16, 16)
    k, v = split_pages(kv)
    common = dict(kind="paged", k=k, v=v, page_table=torch.zeros(1, 2, dtype=torch.int32), lengths=torch.tensor([3]),
                  host_lengths=(3,), max_len=32, sums_by_page=True)
    with pytest.raises(ValueError, match="sums_by_page"):  # blocks must be pages
        KVView(page_size=16, block_sums=torch.zeros(4, 1, 8), pool_block_size=8, **common)
    with pytest.raises(ValueError, match="sums_by_page"):
        KVView(page_size=16, block_sums=None, pool_block_size=None, **common)


@pytest.mark.parametrize("spec,want", [
    ("dense", sa.Dense()), ("topk:16", sa.TopK(topk=16, block_size=64)), ("TopK:8:32", sa.TopK(topk=8, block_size=32)),
    ("window:4096", sa.SlidingWindow(4096)), ("window:512:4", sa.SlidingWindow(512, sinks=4)),
    ("infllmv2", sa.InfLLMv2()), ("infllmv2:", sa.InfLLMv2()),
    ("infllmv2:topk=4,block_size=16,kernel_size=8,kernel_stride=4,dense_len=-1,variant=minicpm4",
     sa.InfLLMv2(topk=4, block_size=16, kernel_size=8, kernel_stride=4, dense_len=-1, variant="minicpm4"))])
def test_parse_pattern(spec, want):
    assert parse_pattern(spec) == want


@pytest.mark.parametrize("spec", ["", "sparse", "topk", "topk:x", "topk:4:0", "window:0", "window:8:-1", "dense:3",
                                  "infllmv2:foo=1", "infllmv2:topk", "infllmv2:topk=x", "infllmv2:block_size=0",
                                  "infllmv2:normalizer=max", "infllmv2:topk=4:1"])
def test_parse_pattern_bad(spec):
    with pytest.raises(ValueError, match=ENV):
        parse_pattern(spec)


def _windows(pattern, num_pages, ps, hkv, d, stale=None):
    sizes = [(pattern.kernel_size, pattern.kernel_stride)]
    if pattern.normalizer == "coarse":
        sizes.append((4 * pattern.kernel_size, 4 * pattern.kernel_stride))
    w = PageWindows(num_pages, ps, hkv, d, sizes)
    if stale is not None:  # what pages used before left behind
        w.chunks.fill_(stale)
        for t in w.sums.values():
            t.fill_(stale)
    return w


def _check_window_sums(view, pattern, ks, lengths):
    for size, stride in ((pattern.kernel_size, pattern.kernel_stride),
                         (4 * pattern.kernel_size, 4 * pattern.kernel_stride))[:1 + (pattern.normalizer == "coarse")]:
        got = view.window_sums(size, stride)
        assert got.shape == (len(lengths), ks[0].shape[1], -(-view.max_len // stride) + 1, ks[0].shape[3])
        for b, n in enumerate(lengths):
            want = O.compressed_keys(ks[b].double(), size, stride)[0] * size  # (Hkv, complete windows, D)
            assert want.shape[1] > 0 or (size > pattern.kernel_size and n < size)  # not an empty check
            torch.testing.assert_close(got[b, :, :want.shape[1]].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["41-coarse", "4-exact", "4-coarse-ks12"])
@pytest.mark.parametrize("ps", [16, 32])
def test_infllmv2_window_sums_kept_by_page(name, ps):
    """The window sums kept beside the pages (each window in the page of its last row, completed from
    the chunk sums as its last row is written, in 3 steps of random lengths) equal the sums of each
    sequence's own keys, window by window (every complete window; fine and coarse), over stale pages."""
    pattern = CONFIGS[name]
    lengths = [150, 33, 97]
    w = _windows(pattern, 40, ps, 2, 8, stale=7.0)
    kv, table, _, ks, _ = _fill(lengths, hkv=2, d=8, page_size=ps, num_pages=40, seed=5, windows=w)
    view = PagesCache(kv, table, torch.tensor(lengths, dtype=torch.int32), lengths, windows=w).kv_view()
    _check_window_sums(view, pattern, ks, lengths)


@pytest.mark.parametrize("name", ["41-coarse", "4-coarse-ks12"])
def test_infllmv2_window_sums_shared_and_reused_pages(name):
    """Prefix caching: sequence 1 starts with sequence 0's first two (full) pages and writes only
    from there; sequence 2 reuses, from its first row, a page sequence 0 held. Every sequence's
    window sums stay its own keys' (a window ending in a shared page is the same for both)."""
    pattern = CONFIGS[name]
    ps, hkv, d = 16, 2, 8
    g = torch.Generator().manual_seed(3)
    kv = torch.zeros(12, hkv, ps, 2 * d)
    w = _windows(pattern, 12, ps, hkv, d, stale=-3.0)
    table = torch.tensor([[5, 2, 7, 9], [5, 2, 1, 4], [7, 0, 0, 0]], dtype=torch.int32)
    k0 = torch.randn(1, hkv, 61, d, generator=g)
    k1 = torch.cat([k0[:, :, :32], torch.randn(1, hkv, 30, d, generator=g)], 2)
    k2 = torch.randn(1, hkv, 13, d, generator=g)

    def write(b, k, lo, hi):
        pos = torch.arange(lo, hi)
        slots = table[b, pos // ps].long() * ps + pos % ps
        rows = k[0, :, lo:hi].transpose(0, 1)
        (write_pages_indexed if NO_JIT else write_pages)(kv, rows, rows, slots, None, w)
        w.complete(table, [(b, lo, hi)])

    write(0, k0, 0, 61)
    write(1, k1, 32, 50)  # the first 32 keys are a prefix-cache hit: pages 5 and 2, not written again
    write(1, k1, 50, 62)
    view = PagesCache(kv, table[:2], torch.tensor([61, 62], dtype=torch.int32), [61, 62], windows=w).kv_view()
    _check_window_sums(view, pattern, [k0, k1], [61, 62])
    write(2, k2, 0, 13)  # page 7 (sequence 0's third page) reused from its first row
    view = PagesCache(kv, table[2:], torch.tensor([13], dtype=torch.int32), [13], windows=w).kv_view()
    _check_window_sums(view, pattern, [k2], [13])


@needs_jit
@pytest.mark.parametrize("name", ["41-coarse", "41-exact", "4-exact", "4-coarse-ks12"])
@pytest.mark.parametrize("sq,hq", [(1, 4), (3, 8)])
def test_infllmv2_select_pages_equals_gathered(name, sq, hq):
    """The C++ selection reading the per-page sums through the block table gives exactly the picks
    of the PyTorch selection over the same sums gathered per sequence (B 3, odd lengths, stale table
    entries past each length)."""
    from sparse_attn.backends.cpu.infllmv2 import infllmv2_picks_over_cache_cpu
    from sparse_attn.layout.infllmv2_selection import infllmv2_picks_over_cache
    pattern = CONFIGS[name]
    ps, hkv, d, lengths = 16, 2, 32, [187, 150, 64]
    w = _windows(pattern, 40, ps, hkv, d, stale=5.0)
    kv, table, _, _, _ = _fill(lengths, hkv=hkv, d=d, page_size=ps, num_pages=40, seed=11, windows=w)
    table[2, 4:] = 39  # a stale entry past the third sequence's length
    q = torch.randn(len(lengths), hq, sq, d)
    view = PagesCache(kv, table, torch.tensor(lengths, dtype=torch.int32), lengths, windows=w).kv_view()
    got = infllmv2_picks_over_cache_cpu(q, view, pattern)
    want = infllmv2_picks_over_cache(q, view, pattern)
    assert torch.equal(got, want)


@needs_jit
def test_infllmv2_select_pages_bad_table():
    from sparse_attn.backends.cpu.infllmv2 import infllmv2_picks_over_cache_cpu
    pattern = CONFIGS["41-coarse"]
    w = _windows(pattern, 8, 16, 2, 32)
    kv = torch.zeros(8, 2, 16, 64)
    table = torch.tensor([[1, 2, 8]], dtype=torch.int32)  # page 8 is outside the pool of 8
    view = PagesCache(kv, table, torch.tensor([40], dtype=torch.int32), [40], windows=w).kv_view()
    with pytest.raises(RuntimeError, match="page_table"):
        infllmv2_picks_over_cache_cpu(torch.randn(1, 4, 1, 32), view, pattern)


@needs_jit
@pytest.mark.parametrize("name", ["41-coarse", "4-exact", "4-coarse-ks12"])
def test_infllmv2_decode_over_vllm_pages(name):
    """Decode over vLLM's pages with InfLLMv2 (selected from the window sums kept by page) equals the
    float64 evaluation on each sequence's own keys (inputs drawn away from near ties)."""
    pattern = CONFIGS[name]
    ps, hq, hkv, d, lengths = 16, 4, 2, 32, [187, 150]
    for seed in range(30):
        w = _windows(pattern, 40, ps, hkv, d)
        kv, table, _, ks, vs = _fill(lengths, hkv=hkv, d=d, page_size=ps, num_pages=40, seed=seed, windows=w)
        q = torch.randn(len(lengths), hq, 1, d)
        if all(O.margin(q[b:b + 1], ks[b], pattern) > 1e-5 for b in range(len(lengths))):
            break
    cache = PagesCache(kv, table, torch.tensor(lengths, dtype=torch.int32), lengths, windows=w)
    plan = sa.plan_with_cache(q, cache, pattern)
    assert plan.kernel.name == "cpu.decode", plan.explain()
    out = sa.attention_with_cache(q, cache, pattern)
    for b in range(len(lengths)):
        ref = O.attention(q[b:b + 1].double(), ks[b].double(), vs[b].double(), pattern)
        oracle.assert_close_contract(out[b:b + 1], ref, dtype=q.dtype, device="cpu", what=f"{name} sequence {b}")


def test_layer_rule():
    topk = sa.TopK(topk=4)
    assert layer_pattern(topk, None) == topk  # a full-attention layer runs the chosen pattern
    assert layer_pattern(topk, 128) == sa.SlidingWindow(128)  # a sliding layer keeps its window
    with pytest.raises(ValueError, match="sliding_window"):
        layer_pattern(topk, 0)


def test_register_is_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert register() is False  # vLLM keeps its own backend; vLLM is not even imported
    monkeypatch.setenv(ENV, "nonsense")
    with pytest.raises(ValueError, match=ENV):
        register()


@needs_jit
@pytest.mark.parametrize("kind", ["dense", "window", "window_sinks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_decode_equals_the_plan(kind, dtype):
    """`CachePlan.prepared` (the vLLM backend's decode step): the binding's call with the step's
    tensors only, q and out as (B, Hq, D) token rows, written in place -- the same bits as the
    plan's `run`, also after the cache grew (new lengths, a new table) and for 4-D q / out."""
    hq, hkv, d, ps = 4, 2, 64, 16
    pattern = {"dense": sa.Dense(), "window": sa.SlidingWindow(40), "window_sinks": sa.SlidingWindow(24, sinks=5)}[kind]
    kv, table, _, _, _ = _fill([150, 33, 97], hkv=hkv, d=d, page_size=ps, num_pages=40, seed=3, dtype=dtype)
    q = torch.randn(3, hq, 1, d).to(dtype)
    plan = sa.plan_with_cache(q, PagesCache(kv, table, torch.tensor([150, 33, 97], dtype=torch.int32),
                                            [150, 33, 97]), pattern)
    for lengths, tab in [([150, 33, 97], table), ([90, 140, 20], table[[2, 0, 1]])]:  # rows written only
        cache = PagesCache(kv, tab, torch.tensor(lengths, dtype=torch.int32), lengths)
        fast = plan.prepared(cache)
        assert fast is not None
        want = plan.run(q, cache)
        rows = torch.full((5, hq, d), 9.0, dtype=dtype)  # vLLM's output: the batch's tokens, decodes first
        fast.run(q[:, :, 0], cache.seq_lens, cache.block_table, rows[:3])
        assert torch.equal(rows[:3], want[:, :, 0]) and bool((rows[3:] == 9).all())
        out4 = torch.empty_like(want)
        fast.run(q, cache.seq_lens, cache.block_table, out4)
        assert torch.equal(out4, want)
        # the binding reads 3-D rows through their strides, and converts lengths that are not
        # contiguous int32 (no copy or view on the usual path: csrc/cpu/decode_binding.cpp)
        wide = torch.randn(3, hq, 2 * d).to(dtype)
        wide[:, :, d:] = q[:, :, 0]
        out4.fill_(7)
        fast.run(wide[:, :, d:], cache.seq_lens.long(), cache.block_table, out4)  # 3-D q, 4-D out
        assert torch.equal(out4, want)
        spaced = torch.stack([cache.seq_lens, cache.seq_lens], 1)[:, 0]  # int32, stride 2
        rows.fill_(9)
        fast.run(q[:, :, 0], spaced, cache.block_table, rows[:3])
        assert torch.equal(rows[:3], want[:, :, 0])
        with pytest.raises(RuntimeError, match="4-D"):
            fast.run(q[:, :, 0, 0], cache.seq_lens, cache.block_table, rows[:3])


@needs_jit
def test_prepared_decode_where_it_does_not_apply_and_bad_outputs():
    """No prepared call where a step needs more than the binding (learned sinks); the binding
    refuses an output of the wrong dtype, shape or layout, or one over q."""
    hq, hkv, d, ps = 4, 2, 32, 16
    kv, table, sums, _, _ = _fill([40, 21], hkv=hkv, d=d, page_size=ps, num_pages=10, seed=4)
    lens = torch.tensor([40, 21], dtype=torch.int32)
    q = torch.randn(2, hq, 1, d)
    cache = PagesCache(kv, table, lens, [40, 21])
    sinks = torch.zeros(hq)
    assert sa.plan_with_cache(q, cache, sa.Dense(), sink_logits=sinks).prepared(cache) is None
    fast = sa.plan_with_cache(q, cache, sa.Dense()).prepared(cache)
    for out, what in [(torch.empty(2, hq, d, dtype=torch.float64), "out must be"),
                      (torch.empty(2, hq + 1, d), "out must be"),
                      (torch.empty(2, d, hq).transpose(1, 2), "out must be")]:
        with pytest.raises(RuntimeError, match=what):
            fast.run(q[:, :, 0], lens, table, out)
    buf = torch.randn(3 * hq * d)  # q and out one sequence apart in one buffer
    with pytest.raises(RuntimeError, match="overlap"):
        fast.run(buf[:2 * hq * d].view(2, hq, d), lens, table, buf[hq * d:].view(2, hq, d))


@needs_jit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_decode_of_a_topk_is_dense_within_its_reach(dtype):
    """TopK(1) of 16-token pages (one sink, one local block) sees every causal key up to 48 keys:
    its plan's prepared call is Dense's binding call with `longest` 48 -- the plan's bits and the
    float64 evaluation of the TopK while the sequences are that short -- and the binding refuses
    a longer sequence by name (the plan runs it, selecting). InfLLMv2's: tests/test_cache_plan.py
    (PagesCache keeps no compressed keys)."""
    hq, hkv, d, ps = 4, 2, 32, 16
    pat = sa.TopK(topk=1, block_size=ps)
    kv, table, sums, k, v = _fill([48, 21], hkv=hkv, d=d, page_size=ps, num_pages=12, seed=5, dtype=dtype)
    q = torch.randn(2, hq, 1, d).to(dtype)
    lens = torch.tensor([48, 21], dtype=torch.int32)
    cache = PagesCache(kv, table, lens, [48, 21], page_sums=sums)
    plan = sa.plan_with_cache(q, cache, pat)
    fast = plan.prepared(cache)
    assert fast is not None and fast.longest == 48
    rows = torch.empty(2, hq, d, dtype=dtype)
    fast.run(q[:, :, 0], lens, table, rows)
    want = plan.run(q, cache)
    assert torch.equal(rows, want[:, :, 0])
    for b, n in enumerate([48, 21]):
        ref = oracle.oracle_attention(q[b:b + 1].double(), k[b].double(), v[b].double(), pat)
        oracle.assert_close_contract(rows[b:b + 1, :, None], ref, dtype=dtype, device="cpu")
    with pytest.raises(ValueError, match=r"lengths\[0\] = 49 is beyond max_length = 48"):
        fast.run(q[:, :, 0], torch.tensor([49, 21], dtype=torch.int32), torch.cat([table, table[:, :1]], 1), rows)
