"""The vLLM integration's page layout and pattern choice, without vLLM (sparse_attn.integrations.vllm).

* `write_pages` stores each token at its slot of vLLM's `(pages, Hkv, page_size, 2 * D)` tensor
  (K rows then V rows per (page, kv head)), skips padding slots (-1), and keeps the per-page key
  sums right when a page is reused (written again from its first row);
* decode over those pages (`PagesCache` -> `attention_with_cache`, the CPU split-KV kernel reading
  vLLM's block table in place) equals the float64 oracle on each sequence's keys for Dense and
  SlidingWindow (sinks too), and TopK equals the oracle where its selection is not a near tie;
* `gather_keys` (what a prefill chunk attends to) equals the sequence's rows;
* `SPARSE_ATTN_VLLM_PATTERN`'s grammar, the per-layer rule (a sliding layer keeps its window), and
  `ValueError`s naming the variable for bad values and for `infllmv2`.
The end-to-end tests with vLLM itself are in tests/vllm_serving/ (their own venv).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import topk_margin
from sparse_attn.integrations.vllm import parse_pattern, register
from sparse_attn.integrations.vllm.pages import PagesCache, gather_keys, split_pages, write_pages
from sparse_attn.integrations.vllm.patterns import ENV, layer_pattern

needs_jit = pytest.mark.skipif(os.environ.get("SPARSE_ATTN_DISABLE_JIT") == "1",
                               reason="SPARSE_ATTN_DISABLE_JIT=1: the C++ decode kernel is not built")


def _fill(lengths, *, hkv, d, page_size, num_pages, seed, dtype=torch.float32, chunks=3):
    """vLLM-style pages holding `lengths` tokens per sequence, written in `chunks` steps with
    random page ids and padding slots; returns (kv_cache, block_table, page_sums, K, V) where K/V
    are the per-sequence keys/values `(1, Hkv, n, D)`."""
    g = torch.Generator().manual_seed(seed)
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
        keys, vals, slots = [], [], []
        for b, n in enumerate(lengths):
            if step + 1 >= len(cuts[b]):
                continue
            lo, hi = cuts[b][step], cuts[b][step + 1]
            pos = torch.arange(lo, hi)
            slots.append(table[b, pos // page_size].long() * page_size + pos % page_size)
            keys.append(ks[b][0, :, lo:hi].transpose(0, 1))
            vals.append(vs[b][0, :, lo:hi].transpose(0, 1))
        pad = 2  # padding tokens of a step: slot -1, never stored
        keys.append(torch.randn(pad, hkv, d, generator=g).to(dtype))
        vals.append(torch.randn(pad, hkv, d, generator=g).to(dtype))
        slots.append(torch.full((pad,), -1))
        write_pages(kv, torch.cat(keys), torch.cat(vals), torch.cat(slots), sums)
    return kv, table, sums, ks, vs


def test_write_and_gather():
    lengths = [37, 5, 64]
    kv, table, sums, ks, vs = _fill(lengths, hkv=2, d=8, page_size=16, num_pages=20, seed=1)
    kp, vp = split_pages(kv)
    assert kp.shape == (20, 2, 16, 8) and kp.stride(-1) == 1 and kp.data_ptr() == kv.data_ptr()
    for b, n in enumerate(lengths):
        assert torch.equal(gather_keys(kp, table[b], 0, n), ks[b])
        assert torch.equal(gather_keys(vp, table[b], 0, n), vs[b])
        lo = 9  # a window's tail only
        assert torch.equal(gather_keys(kp, table[b], min(lo, n), n), ks[b][:, :, min(lo, n):])
        for s in range(-(-n // 16)):  # the page sums are the sums of each page's keys, stale sums gone
            want = ks[b][0, :, s * 16:(s + 1) * 16].sum(1)
            torch.testing.assert_close(sums[table[b, s]], want, rtol=1e-6, atol=1e-5)


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


@pytest.mark.parametrize("spec,want", [
    ("dense", sa.Dense()), ("topk:16", sa.TopK(topk=16, block_size=64)), ("TopK:8:32", sa.TopK(topk=8, block_size=32)),
    ("window:4096", sa.SlidingWindow(4096)), ("window:512:4", sa.SlidingWindow(512, sinks=4))])
def test_parse_pattern(spec, want):
    assert parse_pattern(spec) == want


@pytest.mark.parametrize("spec", ["", "sparse", "topk", "topk:x", "topk:4:0", "window:0", "window:8:-1", "dense:3"])
def test_parse_pattern_bad(spec):
    with pytest.raises(ValueError, match=ENV):
        parse_pattern(spec)


def test_infllmv2_refused():
    with pytest.raises(ValueError, match="infllmv2"):
        parse_pattern("infllmv2")


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
