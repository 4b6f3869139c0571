"""`ModelCache`: one cache object for a model. Entries are updated in place (no reallocation per
token), linear and window layers keep constant memory over many steps, softmax layers may use a
paged cache, and prefill + decode through it equals one full forward (float32 bound)."""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import randn
from sparse_attn.api.hybrid import HybridAttentionLayer, HybridStack


def _stack(*patterns, decay="per-token"):
    layers = [HybridAttentionLayer(32, 4, kind="linear", num_kv_heads=2, head_dim=8, decay=decay)]
    layers += [HybridAttentionLayer(32, 4, kind="softmax", num_kv_heads=2, head_dim=8, softmax_pattern=p)
               for p in patterns]
    stack = HybridStack(layers)
    for layer in stack:
        if layer.gate is not None:
            with torch.no_grad():
                layer.gate.copy_(randn(4))
    return stack


def _storage(entry):
    held = [entry] if isinstance(entry, torch.Tensor) else entry.tensors()
    return [t.untyped_storage().data_ptr() for t in held]


def test_exports():
    assert sa.ModelCache is sa.HybridCache
    with pytest.raises(ValueError, match="page_size needs max_len"):
        sa.ModelCache(2, page_size=16)
    with pytest.raises(ValueError, match="n_layers"):
        sa.ModelCache(-1)


def test_steps_are_in_place_and_memory_is_bounded():
    """60 decode steps: the linear state, the ring of a SlidingWindow layer and a TopK layer's
    KVCache (max_len given) keep their storage (same pointers, same bytes); outputs equal the
    full forward."""
    stack = _stack(sa.SlidingWindow(16, sinks=2), sa.TopK(2, block_size=16))
    x = randn(2, 30 + 60, 32)
    with torch.no_grad():
        full = stack(x)
        cache = stack.new_cache(max_len=128)
        pieces = [stack(x[:, :30], cache=cache)]
        names = [type(e).__name__ for e in cache.entries]
        assert names == ["Tensor", "RingKVCache", "KVCache"]
        ptrs = [_storage(e) for e in cache.entries]
        sizes = [e.nbytes if isinstance(e, torch.Tensor) else e.nbytes() for e in cache.entries]
        total = cache.nbytes()
        for t in range(30, 90):
            pieces.append(stack(x[:, t:t + 1], cache=cache))
            assert [_storage(e) for e in cache.entries] == ptrs, f"reallocated at token {t}"
            assert cache.nbytes() == total
    assert sizes[1] == 2 * 2 * 2 * (2 + 16) * 8 * 4 + 2 * 2 * 4  # K, V of sinks + window; lengths, table
    assert cache.entries[0].shape == (2, 4, 8, 8) and cache.entries[0].dtype == torch.float32
    oracle.assert_close_contract(torch.cat(pieces, 1), full, dtype=torch.float32, device="cpu",
                                 what="prefill + 60 steps")


def test_growing_cache_doubles():
    """Without max_len a contiguous KVCache grows by doubling: a handful of reallocations over
    hundreds of tokens, never one per token."""
    stack = _stack(sa.Dense())
    x = randn(1, 10 + 600, 32)
    caps = []
    with torch.no_grad():
        full = stack(x)
        cache = stack.new_cache()
        pieces = [stack(x[:, :10], cache=cache)]
        t = 10
        for c in [1] * 200 + [7, 1, 150] + [1] * 242:
            pieces.append(stack(x[:, t:t + c], cache=cache))
            t += c
            caps.append(cache.entries[1].max_len)
    assert t == 610 and caps[-1] >= 610
    assert len(set(caps)) <= 3 and all(b == a or b >= 2 * a for a, b in zip(caps, caps[1:]))
    oracle.assert_close_contract(torch.cat(pieces, 1), full, dtype=torch.float32, device="cpu", what="growth")


@pytest.mark.parametrize("pattern", [sa.Dense(), sa.TopK(1, block_size=16), sa.SlidingWindow(12, sinks=1),
                                     sa.WindowLinear(9, sinks=1)], ids=["dense", "topk", "window", "windowlinear"])
def test_paged_model_cache_equals_full_forward(pattern):
    stack = _stack(pattern, decay="per-head")
    x = randn(2, 70, 32)
    with torch.no_grad():
        full = stack(x)
        cache = stack.new_cache(max_len=80, page_size=16)
        pieces = [stack(x[:, :33], cache=cache), stack(x[:, 33:36], cache=cache)]
        pieces += [stack(x[:, t:t + 1], cache=cache) for t in range(36, 70)]
    kinds = {sa.Dense: "PagedKVCache", sa.TopK: "PagedKVCache", sa.SlidingWindow: "RingKVCache",
             sa.WindowLinear: "WindowLinearDecoder"}
    assert type(cache.entries[1]).__name__ == kinds[type(pattern)]
    oracle.assert_close_contract(torch.cat(pieces, 1), full, dtype=torch.float32, device="cpu", what="paged")


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("pattern,page_size", [(sa.Dense(), None), (sa.TopK(1, block_size=16), 16),
                                               (sa.SlidingWindow(12, sinks=1), None)],
                         ids=["dense", "topk-paged", "window-ring"])
def test_quantized_model_cache(pattern, page_size, kv_dtype):
    """`ModelCache(kv_dtype=)`: every softmax layer's K/V stored as codes + row scales (a ring too);
    after the prefill, each chunk and step equals the float64 evaluation over the dequantized rows
    (quantize_rows_torch: the contract's definition), GQA 2, odd lengths."""
    from sparse_attn.cache.quant import dequantize, quantize_rows_torch
    b, hq, hkv, d, n = 2, 4, 2, 24, 53
    q, k, v = randn(b, hq, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)
    cache = sa.ModelCache(1, max_len=64 if page_size else None, page_size=page_size, kv_dtype=kv_dtype)
    cache.attend(0, q[:, :, :20], k[:, :, :20], v[:, :, :20], pattern)
    entry = cache.entries[0]
    assert entry.kv_dtype == kv_dtype and entry.kv_view().quant == kv_dtype and f"kv_dtype={kv_dtype}" in repr(entry)
    dk, dv = (dequantize(*quantize_rows_torch(x, kv_dtype), torch.float64) for x in (k, v))
    t = 20
    for c in [3, 1, 1, 7] + [1] * 21:
        out = cache.attend(0, q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c], pattern)
        ref = oracle.oracle_attention(q[:, :, t:t + c].double(), dk[:, :, :t + c], dv[:, :, :t + c], pattern)
        oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu", what=f"{kv_dtype} step at {t}")
        t += c
    assert t == n
    with pytest.raises(ValueError, match="kv_dtype"):
        sa.ModelCache(1, kv_dtype="int4")
