"""Hybrid stacks (linear-attention layers mixed with softmax layers): layer mix, prefill-then-decode
through the shared cache equals one full forward, constant cache memory for window layers,
gradients, bad arguments."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import randn
from sparse_attn.api.hybrid import HybridAttentionLayer, HybridCache, HybridStack, hybrid_layers
from sparse_attn.backends.reference.window_linear import WindowLinearDecoder


def test_ratio_places_the_layers():
    stack = hybrid_layers(8, hidden=32, num_heads=2, ratio="3:1")
    assert stack.kinds() == ["linear"] * 3 + ["softmax"] + ["linear"] * 3 + ["softmax"]
    assert hybrid_layers(3, hidden=32, num_heads=2, ratio="0:1").kinds() == ["softmax"] * 3
    assert hybrid_layers(3, hidden=32, num_heads=2, ratio="1:0").kinds() == ["linear"] * 3
    assert hybrid_layers(5, hidden=32, num_heads=2, ratio="1:1").kinds() == ["linear", "softmax"] * 2 + ["linear"]


def kept_tokens(entry) -> int:
    """Tokens a softmax layer's cache entry holds."""
    return entry.cached_tokens() if isinstance(entry, WindowLinearDecoder) else max(entry.kv_view().host_lengths)


PATTERNS = [  # (pattern, decay, tokens the softmax layer keeps after 75)
    pytest.param(sa.TopK(1, block_size=16, sink_blocks=1, local_blocks=1), "per-head", 75, id="topk-perhead"),
    pytest.param(sa.SlidingWindow(12, sinks=2), "per-token", 2 + 12, id="window-pertoken"),
    pytest.param(sa.Dense(), None, 75, id="dense-nodecay"),
    pytest.param(sa.WindowLinear(9, sinks=1), "per-head", 1 + 9, id="windowlinear"),
]


@pytest.mark.parametrize("pattern,decay,kept", PATTERNS)
def test_prefill_then_decode_equals_full_forward(pattern, decay, kept):
    torch.manual_seed(1)
    stack = hybrid_layers(4, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, ratio="3:1",
                          softmax_pattern=pattern, decay=decay)
    x = randn(2, 75, 64)
    with torch.no_grad():
        full = stack(x)
        cache = stack.new_cache()
        pieces = [stack(x[:, :40], cache=cache)]
        pieces.append(stack(x[:, 40:43], cache=cache))  # a short chunk (speculative-decode shape)
        for t in range(43, 75):
            pieces.append(stack(x[:, t:t + 1], cache=cache))
    assert cache.length == 75
    got = torch.cat(pieces, dim=1)
    oracle.assert_close_contract(got, full, dtype=torch.float32, device="cpu", what="prefill + decode")
    # the cache: a (B, H, D, Dv) state for each linear layer; for the softmax one, K/V of all 75
    # tokens (TopK, Dense), of the sinks and the last window (SlidingWindow), or a decoder
    softmax_entry = {sa.WindowLinear: "WindowLinearDecoder", sa.SlidingWindow: "RingKVCache"}.get(
        type(pattern), "KVCache")
    assert [type(e).__name__ for e in cache.entries] == ["Tensor"] * 3 + [softmax_entry]
    assert cache.entries[0].shape == (2, 4, 16, 16) and kept_tokens(cache.entries[3]) == kept
    if not isinstance(pattern, sa.WindowLinear):
        view = cache.entries[3].kv_view()
        assert (view.batch, view.kv_heads, view.head_dim) == (2, 2, 16)
    # the decode path really runs: a linear layer's step is a step kernel, not the chunked one
    step = sa.api.linear.plan_linear(*(randn(2, 4, 1, 16) for _ in range(3))).kernel.name
    assert step in ("cpu.linear_step", "reference.linear_recurrent"), step


WINDOW_CACHE = [  # (window, sinks, prefill, continuation chunk sizes)
    pytest.param(5, 0, 7, [1, 3, 1, 6, 1, 1, 2, 9], id="w5-chunks-past-window"),
    pytest.param(6, 3, 9, [2, 1, 7, 1, 4, 1], id="w6-sinks3"),
    pytest.param(20, 2, 13, [1, 5, 1, 3, 12, 1], id="w20-window-longer-than-history-then-not"),
    pytest.param(1, 1, 3, [1, 2, 1, 4, 1], id="w1-sink1"),
    pytest.param(4, 6, 3, [1, 5, 1, 3, 1], id="sinks6-filled-by-a-chunk"),
    pytest.param(3, 2, 1, [1, 1, 1, 2, 1], id="prefill1"),
    pytest.param(8, 2, 11, [1, 150, 1, 3], id="chunk-over-128"),
]


@pytest.mark.parametrize("window,sinks,prefill,chunks", WINDOW_CACHE)
@pytest.mark.parametrize("kind", ["SlidingWindow", "WindowLinear"])
def test_window_cache_continuations_equal_full_forward(kind, window, sinks, prefill, chunks):
    """Float64: a window layer's trimmed cache (sinks + the last tokens, keys back to back) continued
    by single tokens and by chunks (shorter and longer than the window) equals one full forward,
    with GQA; the cache never holds more than sinks + window tokens."""
    pattern = getattr(sa, kind)(window, sinks=sinks)
    stack = hybrid_layers(2, hidden=24, num_heads=4, num_kv_heads=2, head_dim=6, ratio="1:1",
                          softmax_pattern=pattern, decay="per-token").double()
    if stack[1].gate is not None:
        with torch.no_grad():
            stack[1].gate.copy_(randn(4, dtype=torch.float64, scale=2.0))
    s = prefill + sum(chunks)
    x = randn(2, s, 24, dtype=torch.float64)
    with torch.no_grad():
        full = stack(x)
        cache = stack.new_cache()
        pieces, t = [stack(x[:, :prefill], cache=cache)], prefill
        for c in chunks:
            pieces.append(stack(x[:, t:t + c], cache=cache))
            t += c
            n = kept_tokens(cache.entries[1])
            if kind == "SlidingWindow":
                assert n == min(t, sinks + window)
            else:
                assert n <= sinks + window
    got = torch.cat(pieces, dim=1)
    oracle.assert_close_contract(got, full, dtype=torch.float64, device="cpu", what="chunks after a trimmed cache")


def _layer(kind, pattern=sa.Dense()):
    return HybridAttentionLayer(32, 4, kind=kind, num_kv_heads=2, head_dim=8, softmax_pattern=pattern)


def test_window_layers_decode_in_constant_memory():
    """300 decode steps (and a few 3-token chunks) with window 32: the cache's bytes stay at exactly
    sinks + window tokens of K/V (plus M, z for WindowLinear) and the linear state; a Dense layer's
    grow with the context. The outputs equal a full forward (float32 bound)."""
    sw, wl = sa.SlidingWindow(32, sinks=4), sa.WindowLinear(32, sinks=4)
    stack = HybridStack([_layer("linear"), _layer("softmax", sw), _layer("softmax", wl)])
    dense = HybridStack([_layer("softmax")])
    with torch.no_grad():
        stack[2].gate.copy_(randn(4))
    steps = [3 if i % 50 == 7 else 1 for i in range(300)]
    x = randn(1, 50 + sum(steps), 32)
    f4 = 4  # float32
    flat = (1 * 4 * 8 * 8 * f4                    # linear state (B, H, D, Dv)
            + 2 * 1 * 2 * (4 + 32) * 8 * f4       # SlidingWindow: K and V of sinks + window (a ring)
            + 2 * 4                               # ... and its int32 lengths (B,) and page table (B, 1)
            + 2 * 1 * 2 * (4 + 32) * 8 * f4       # WindowLinear: sinks + window (the last step's window)
            + (1 * 2 * 8 * 8 + 1 * 2 * 8) * f4)   # WindowLinear: M (B, Hkv, D, Dv) and z (B, Hkv, D)
    with torch.no_grad():
        full = stack(x)
        cache, dcache = stack.new_cache(), dense.new_cache()
        pieces, t = [stack(x[:, :50], cache=cache)], 50
        dense(x[:, :50], cache=dcache)
        sizes, dense_sizes = [], []
        for c in steps:
            pieces.append(stack(x[:, t:t + c], cache=cache))
            dense(x[:, t:t + c], cache=dcache)
            t += c
            sizes.append(cache.nbytes())
            dense_sizes.append(dcache.nbytes())
    assert sizes == [flat] * len(steps)
    assert dense_sizes[-1] >= 2 * 1 * 2 * t * 8 * f4 and dense_sizes[-1] > dense_sizes[0]
    oracle.assert_close_contract(torch.cat(pieces, dim=1), full, dtype=torch.float32, device="cpu",
                                 what="decode with constant memory")


def test_nbytes_counts_the_storage_a_view_pins():
    big = torch.zeros(1, 2, 100, 8)
    c = HybridCache(2)
    c.entries[0] = (big[:, :, :3], big[:, :, 3:5])  # two views of one storage: counted once, whole
    c.entries[1] = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    assert c.nbytes() == 1 * 2 * 100 * 8 * 4 + 1 * 2 * 8 * 8 * 8


def test_training_gradients_flow_to_every_parameter():
    stack = hybrid_layers(4, hidden=32, num_heads=2, ratio="1:1", softmax_pattern=sa.SlidingWindow(8),
                          decay="per-token")
    x = randn(2, 30, 32, requires_grad=True)
    stack(x).square().mean().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_linear_layer_matches_its_definition():
    """A single linear layer is x + W_o linear_attention(W_q x, W_k x, W_v x, decay) (float64 oracle)."""
    stack = hybrid_layers(1, hidden=24, num_heads=3, ratio="1:0", decay="per-head").double()
    layer = stack[0]
    x = randn(1, 50, 24, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (p(x).view(1, 50, 3, 8).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        decay = -torch.nn.functional.softplus(layer.decay_logit)
        o, _ = oracle.oracle_linear_attention(q, k, v, decay=decay)
        ref = x + layer.o_proj(o.transpose(1, 2).reshape(1, 50, 24))
        oracle.assert_close_contract(stack(x), ref, dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(ratio="3-1"), ValueError, "ratio"),
    (dict(ratio="0:0"), ValueError, "ratio"),
    (dict(num_heads=3, num_kv_heads=2), ValueError, "num_kv_heads"),
    (dict(decay="exp"), ValueError, "decay"),
    (dict(softmax_pattern="topk"), TypeError, "softmax_pattern"),
    (dict(num_heads=0), ValueError, "num_heads"),
])
def test_bad_arguments(kwargs, err, match):
    args = dict(hidden=32, num_heads=2, ratio="1:1")
    args.update(kwargs)
    with pytest.raises(err, match=match):
        hybrid_layers(2, **args)


def test_cache_object():
    c = HybridCache(3)
    assert len(c) == 3 and c.length == 0 and c.nbytes() == 0
