"""TopK's selection over a KV cache in C++ (`cpu_decode.topk_select_sums`, used by `cpu.decode`)
equals the PyTorch definition (`layout.topk_selection.topk_index_over_cache`) on contiguous and paged
caches with ragged lengths, GQA, Sq from 1 to 16, lengths not multiples of the block, rows before a
sequence's first key, and NaN keys (ranked first, as torch.topk ranks them)."""
from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from conftest import needs_jit, randn
from sparse_attn.backends.cpu.decode import _ext
from sparse_attn.layout.topk_selection import topk_index_over_cache

pytestmark = needs_jit


def _native(q, view, pat):
    return _ext().topk_select_sums(q, view.block_sums, list(view.host_lengths), pat.block_size, pat.topk,
                                   pat.sink_blocks, pat.local_blocks)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("sq,hq,hkv,bs,topk,sinks,locals_", [(1, 8, 2, 16, 4, 1, 1), (5, 4, 4, 8, 3, 0, 2),
                                                             (16, 6, 3, 16, 40, 2, 1)])
def test_native_selection_equals_definition(paged, dtype, sq, hq, hkv, bs, topk, sinks, locals_):
    b, d, max_len = 3, 24, 700
    lengths = [699, 3, 257]  # the second: shorter than Sq for Sq > 3 (rows before the first key)
    kw = dict(max_len=max_len, dtype=dtype, pool_block_size=bs)
    if paged:
        cache = sa.PagedKVCache(b, hkv, d, num_pages=b * (-(-max_len // 32)), page_size=32, **kw)
    else:
        cache = sa.KVCache(b, hkv, d, **kw)
    cache.append(randn(b, hkv, max_len, d, dtype=dtype), randn(b, hkv, max_len, d, dtype=dtype),
                 num_new=lengths)
    pat = sa.TopK(topk, block_size=bs, sink_blocks=sinks, local_blocks=locals_)
    q = randn(b, hq, sq, d, dtype=dtype)
    view = cache.kv_view()
    got, want = _native(q, view, pat), topk_index_over_cache(q, view, pat)
    assert got.dtype == torch.int32 and got.shape == want.shape == (b, hkv, sq, topk)
    assert torch.equal(got, want)


def test_nan_key_ranks_first_and_bad_args():
    cache = sa.KVCache(1, 1, 8, 200, pool_block_size=16)
    k = randn(1, 1, 200, 8)
    k[0, 0, 40] = float("nan")  # block 2
    cache.append(k, randn(1, 1, 200, 8))
    pat = sa.TopK(2, block_size=16)
    q = randn(1, 2, 1, 8)
    got = _native(q, cache.kv_view(), pat)
    assert 2 in got[0, 0, 0].tolist()
    assert torch.equal(got, topk_index_over_cache(q, cache.kv_view(), pat))
    with pytest.raises(RuntimeError, match="needs more blocks"):
        _ext().topk_select_sums(q, cache.kv_view().block_sums, [10 ** 6], 16, 2, 1, 1)
    with pytest.raises(RuntimeError, match="one length per sequence"):
        _ext().topk_select_sums(q, cache.kv_view().block_sums, [], 16, 2, 1, 1)


def test_decode_uses_it():
    """`attention_with_cache` with TopK on the CPU goes through the C++ selection (no PyTorch scoring)."""
    import sparse_attn.layout.topk_selection as ts
    cache = sa.KVCache(1, 2, 16, 300, pool_block_size=16)
    cache.append(randn(1, 2, 300, 16), randn(1, 2, 300, 16))
    q = randn(1, 4, 1, 16)
    calls = []
    orig = ts.topk_token_index_pooled
    ts.topk_token_index_pooled = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        out = sa.attention_with_cache(q, cache, sa.TopK(3, block_size=16), backend="cpu")
    finally:
        ts.topk_token_index_pooled = orig
    assert not calls and torch.isfinite(out).all()
