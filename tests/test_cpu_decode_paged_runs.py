"""A paged cache whose pages hold a kv head's K rows and then its V rows together (vLLM's CPU
layout; `kv_share_pages` in csrc/cpu/decode_rows.h) is read as runs of up to 2048 keys through one
padded row table with the stream prefetch on (csrc/cpu/decode.cpp, `Split::paged_runs`), and as
128-key segments with the pacer when the stream is off; K and V in two pools are always read as
segments. Only the order of memory reads changes: stream on (any distance) or off, prefetches
forced on or off, one block or two pools, the outputs are the same bits, and they meet the contract
against the float64 evaluation -- bf16 K/V on AMX tiles and on vector products and an int8 cache,
Dense, a window with sinks and TopK over the pages, two sequences of different lengths that are not
multiples of 16 keys, of a page or of a run, pages in random order, GQA with Sq 2.
"""
from __future__ import annotations

import os

import pytest
import torch

import oracle
import sparse_attn as sa
from sparse_attn.cache.quant import dequantize, quantize_rows
from sparse_attn.integrations.vllm.pages import PagesCache, split_pages, write_pages
from conftest import needs_jit
from test_cpu_decode_stream import restore, select_products  # noqa: F401 (restore: a fixture)

pytestmark = needs_jit


def _pages(k, v, lens, page, gen):
    """vLLM's pool `(pages, Hkv, page, 2 D)` holding each sequence's rows through a random block
    table, its page sums, the table."""
    b, hkv, _, d = k.shape
    width = max(-(-n // page) for n in lens)
    pages = b * width + 1
    table = (torch.randperm(pages - 1, generator=gen)[: b * width].view(b, width) + 1).to(torch.int32)
    pool = torch.zeros(pages, hkv, page, 2 * d, dtype=k.dtype)
    sums = torch.zeros(pages, hkv, d)
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        slots = table[i, pos // page].long() * page + pos % page
        write_pages(pool, k[i, :, :n].transpose(0, 1), v[i, :, :n].transpose(0, 1), slots, sums)
    return pool, sums, table


def _decode(q, kp, vp, table, page, lens, pattern, d, prefetch, k_scale=None, v_scale=None, view=None):
    from sparse_attn.backends.cpu.decode import _decode_fwd, selection_over_cache
    token_index = None
    if view is not None:
        pattern, token_index = selection_over_cache(q, view, pattern)
    return _decode_fwd(q, kp, vp, pattern, scale=d ** -0.5, token_index=token_index, lengths=lens,
                       page_table=table, page_size=page, k_scale=k_scale, v_scale=v_scale, prefetch=prefetch)[0]


@pytest.mark.parametrize("products", ["bf16-amx", "bf16-vector", "int8"])
@pytest.mark.parametrize("kind", ["dense", "window", "topk"])
def test_vllm_layout_same_bits_and_contract(restore, products, kind):
    ext = restore
    select_products(ext, products)
    gen = torch.Generator().manual_seed(23)
    b, hq, hkv, sq, d, page = 2, 8, 2, 2, 64, 64
    lens = [4133, 2919]  # runs of 2048 keys and ragged tails, pages part-filled
    pattern = {"dense": sa.Dense(), "window": sa.SlidingWindow(2300, sinks=4),
               "topk": sa.TopK(6, block_size=page)}[kind]
    q = torch.randn(b, hq, sq, d, generator=gen).bfloat16()
    k = torch.randn(b, hkv, max(lens), d, generator=gen).bfloat16()
    v = torch.randn(b, hkv, max(lens), d, generator=gen).bfloat16()
    pool, sums, table = _pages(k, v, lens, page, gen)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    view = PagesCache(pool, table, lens_t, lens, page_sums=sums).kv_view() if kind == "topk" else None
    kp, vp = split_pages(pool)
    ks = vs = None
    if products == "int8":  # the codes in the same layout, the scales beside them as rows without D
        codes, scales = quantize_rows(pool.view(pool.shape[0], hkv, 2 * page, d), "int8")
        kp, vp = codes[:, :, :page], codes[:, :, page:]
        ks, vs = scales[:, :, :page], scales[:, :, page:]
    outs = []
    for ahead in (0, 8192, 256, 65536):  # off (segments), the Intel default, 2 keys ahead, far
        ext.set_stream_ahead(ahead)
        outs += [_decode(q, kp, vp, table, page, lens_t, pattern, d, pf, ks, vs, view) for pf in (1, 0)]
    # the same rows in two pools: always segments
    two = _decode(q, kp.contiguous(), vp.contiguous(), table, page, lens_t, pattern, d, 1,
                  None if ks is None else ks.contiguous(), None if vs is None else vs.contiguous(), view)
    for o in outs[1:] + [two]:
        assert torch.equal(o, outs[0])
    for i, n in enumerate(lens):  # the contract, per sequence (over the dequantized rows for int8)
        if products == "int8":
            rows = table[i, torch.arange(n) // page].long()
            kk = dequantize(kp[rows, :, torch.arange(n) % page], ks[rows, :, torch.arange(n) % page], torch.float64)
            vv = dequantize(vp[rows, :, torch.arange(n) % page], vs[rows, :, torch.arange(n) % page], torch.float64)
            kk, vv = kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]
        else:
            kk, vv = k[i:i + 1, :, :n].double(), v[i:i + 1, :, :n].double()
        ref = sa.attention(q[i:i + 1].double(), kk, vv, pattern, scale=d ** -0.5, backend="reference")
        oracle.assert_close_contract(outs[0][i:i + 1], ref, dtype=torch.bfloat16, device="cpu")


def test_contiguous_equals_vllm_layout(restore):
    """Dense over the same rows: the contiguous cache (runs) and vLLM's pages (runs through the row
    table) give the same bits (the segments' arithmetic either way)."""
    ext = restore
    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, sq, d, page, n = 1, 8, 2, 1, 128, 32, 5000
    q = torch.randn(b, hq, sq, d, generator=gen).bfloat16()
    k = torch.randn(b, hkv, n, d, generator=gen).bfloat16()
    v = torch.randn(b, hkv, n, d, generator=gen).bfloat16()
    pool, _, table = _pages(k, v, [n], page, gen)
    kp, vp = split_pages(pool)
    lens = torch.tensor([n], dtype=torch.int32)
    ext.set_stream_ahead(8192)
    paged = _decode(q, kp, vp, table, page, lens, sa.Dense(), d, 1)
    from sparse_attn.backends.cpu.decode import _decode_fwd
    contiguous = _decode_fwd(q, k, v, sa.Dense(), scale=d ** -0.5, token_index=None, lengths=lens, prefetch=1)[0]
    assert torch.equal(paged, contiguous)


def test_bench_script_vllm_pages(capsys):
    """bench/cpu_decode_ab.py --vllm-pages at a small size: one row, the same bits both ways; and its
    bad arguments."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import cpu_decode_ab

    assert cpu_decode_ab.main(["--vllm-pages", "--kinds", "bf16", "--context", "3000", "--page-size", "32",
                               "--rounds", "2", "--reps", "2", "--warm"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| bf16")]
    assert len(rows) == 1 and rows[0].rstrip(" |").endswith("True"), rows
    for bad in (["--vllm-pages"], ["--vllm-pages", "--paged", "--kinds", "bf16"], ["--page-size", "40"],
                ["--warm", "--evict-mb", "8"], ["--evict-mb", "0"]):
        with pytest.raises(SystemExit):
            cpu_decode_ab.main(bad)
