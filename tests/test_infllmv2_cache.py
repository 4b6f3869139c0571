"""InfLLMv2 decode through a cache (contract, "InfLLMv2 semantics" step 6 and "Decode through the
scheduler"): the caches keep the compressed keys as running window sums, a step selects from them,
and decode of token `p` equals row `p` of prefill and the float64 evaluation, for contiguous and
paged caches, ragged batches, GQA, chunked prefill, a quantized cache, and across `dense_len`."""
import functools

import pytest
import torch

import infllmv2_oracle as O
import oracle
import sparse_attn as sa
from conftest import needs_jit
from sparse_attn.cache import RingKVCache
from test_infllmv2 import CONFIGS, draw


@functools.lru_cache(maxsize=None)
def drawn(pattern, shape, d):
    """`draw` once per (pattern, shape) for the whole file: the margin check is the slow part."""
    return draw(pattern, shape, d, min_margin=1e-5)


def make_cache(kind, b, hkv, d, max_len, **kw):
    if kind == "paged":
        return sa.PagedKVCache(b, hkv, d, num_pages=b * (-(-max_len // 16)), page_size=16, max_len=max_len, **kw)
    return sa.KVCache(b, hkv, d, max_len, **kw)


def oracle_row(q, k, v, pattern, n, t):
    """Float64 output of query row `t` (absolute position `n - 1`) over keys `[0, n)`: `(B, Hq, Dv)`."""
    return O.attention(q[:, :, t:t + 1], k[:, :, :n], v[:, :, :n], pattern)[:, :, 0]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit)])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("name", ["41-coarse", "4-exact", "4-coarse-ks12"])
def test_decode_steps_equal_prefill_rows_and_oracle(kind, name, backend):
    pattern = CONFIGS[name]
    b, hq, hkv, s, d = 2, 4, 2, 107, 32
    q, k, v = drawn(pattern, (b, hq, hkv, s, s), d)
    full = sa.attention(q, k, v, pattern, backend="reference")
    lag = [0, 13]  # sequence 1 is 13 tokens behind: ragged lengths, its rows aligned to its own end
    cache = make_cache(kind, b, hkv, d, 120)
    cache.append(k[:, :, :45], v[:, :, :45], num_new=[45, 45 - lag[1]])
    checked = 0
    for step in range(45, s):
        n = [step + 1 - x for x in lag]
        kk = torch.stack([k[i, :, n[i] - 1] for i in range(b)])[:, :, None]
        vv = torch.stack([v[i, :, n[i] - 1] for i in range(b)])[:, :, None]
        cache.append(kk, vv)
        assert cache.host_lengths == n
        qq = torch.stack([q[i, :, n[i] - 1] for i in range(b)])[:, :, None]
        if step % 6 and step != s - 1:
            continue
        out = sa.attention_with_cache(qq, cache, pattern, backend=backend)[:, :, 0]
        for i in range(b):
            torch.testing.assert_close(out[i], full[i, :, n[i] - 1], rtol=1e-5, atol=1e-5)
            if step in (48, s - 1) and backend == "cpu":
                ref = oracle_row(q[i:i + 1], k[i:i + 1], v[i:i + 1], pattern, n[i], n[i] - 1)
                oracle.assert_close_contract(out[i:i + 1], ref, dtype=q.dtype, device="cpu")
        checked += 1
    assert checked >= 10


def test_window_sums_are_kept_on_append_and_equal_the_compressed_keys():
    """Incremental (no recomputation per token): sums made once from the held keys, then updated
    by appends (ragged, one by one, a reserve that grows the capacity), equal the contract's."""
    pattern = CONFIGS["4-coarse-ks12"]  # kernel_size not a multiple of the stride
    ks, st = pattern.kernel_size, pattern.kernel_stride
    b, hkv, d = 2, 2, 16
    k = torch.randn(b, hkv, 150, d, dtype=torch.float64)
    cache = sa.KVCache(b, hkv, d, 40, dtype=torch.float64)
    cache.append(k[:, :, :37], k[:, :, :37], num_new=[37, 30])
    view = cache.kv_view()
    first = view.window_sums(ks, st)  # made now, from the 37 / 30 keys held
    assert view.window_sums(ks, st) is first  # kept, not remade
    cache.reserve(150)
    while cache.host_lengths[0] < 120:
        n = cache.host_lengths
        kk = torch.stack([k[i, :, min(n[i], 149)] for i in range(b)])[:, :, None]
        cache.append(kk, kk, num_new=[1, int(n[1] < 110)])
    lens = cache.host_lengths
    assert lens == [120, 110]
    for size, stride in ((ks, st), (4 * ks, 4 * st)):
        sums = cache.kv_view().window_sums(size, stride)
        for i in range(b):
            ref = O.compressed_keys(k[i:i + 1, :, :lens[i]], size, stride)[0]
            n = ref.shape[1]
            torch.testing.assert_close(sums[i, :, :n] / size, ref, rtol=1e-12, atol=1e-12)
    assert cache.nbytes() > sa.KVCache(b, hkv, d, 150, dtype=torch.float64).nbytes()  # the sums are counted


@needs_jit
def test_paged_free_restarts_the_window_sums():
    pattern = CONFIGS["41-coarse"]
    b, hq, hkv, d = 2, 4, 2, 32
    q, k, v = drawn(pattern, (b, hq, hkv, 107, 107), d)
    q, k, v = q[:, :, :90], k[:, :, :90], v[:, :, :90]  # the decode test's draw: rows are causal
    cache = make_cache("paged", b, hkv, d, 200)
    junk = torch.randn(b, hkv, 70, d)
    cache.append(junk, junk)
    sa.attention_with_cache(q[:, :, :1], cache, pattern)  # the window sums now exist
    cache.free(0)
    cache.free(1)
    cache.append(k, v)
    out = sa.attention_with_cache(q[:, :, -1:], cache, pattern, backend="cpu")
    oracle.assert_close_contract(out[:, :, 0], oracle_row(q, k, v, pattern, 90, 89), dtype=q.dtype, device="cpu")


@pytest.mark.parametrize("backend,rows", [("reference", 31), pytest.param("cpu", 9, marks=needs_jit)],
                         ids=["reference", "cpu"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_chunked_prefill_over_the_cache_equals_the_oracle(kind, backend, rows):
    """Sq > 1 rows over a cache (speculative decode / chunked prefill), GQA 16."""
    pattern = CONFIGS["41-coarse"]
    b, hq, hkv, s, d = 1, 16, 1, 101, 32
    q, k, v = drawn(pattern, (b, hq, hkv, 31, s), d)
    cache = make_cache(kind, b, hkv, d, s)
    cache.append(k[:, :, :70], v[:, :, :70])
    cache.append(k[:, :, 70:], v[:, :, 70:])
    ref = O.attention(q, k, v, pattern)
    out = sa.attention_with_cache(q[:, :, -rows:], cache, pattern, backend=backend)
    oracle.assert_close_contract(out, ref[:, :, -rows:], dtype=q.dtype, device="cpu")


@needs_jit
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_dense_len_follows_each_sequence_length(kind):
    """Below `dense_len` total keys a sequence's decode is dense causal; at or above it sparse; a
    ragged batch mixes both (each sequence by its own length); the plan says Dense when all are below."""
    pattern = sa.InfLLMv2(topk=3, block_size=16, kernel_size=8, kernel_stride=4, local_blocks=1, dense_len=90)
    b, hq, hkv, d = 2, 4, 2, 32
    q, k, v = drawn(pattern, (b, hq, hkv, 104, 104), d)
    cache = make_cache(kind, b, hkv, d, 112)
    cache.append(k[:, :, :85], v[:, :, :85], num_new=[85, 78])
    for step in range(85, 104):
        n = cache.host_lengths
        qq = torch.stack([q[i, :, n[i] - 1] for i in range(b)])[:, :, None]
        plan = sa.plan_with_cache(qq, cache, pattern)
        assert ("Dense(" in plan.explain()) == (max(n) < 90)
        if step in (85, 90, 103) or n[1] in (89, 90):
            out = sa.attention_with_cache(qq, cache, pattern, backend="cpu")[:, :, 0]
            for i in range(b):
                ref = oracle_row(q[i:i + 1], k[i:i + 1], v[i:i + 1], pattern, n[i], n[i] - 1)
                oracle.assert_close_contract(out[i:i + 1], ref, dtype=q.dtype, device="cpu")
                if n[i] >= 90:  # the rule really picks here: fewer blocks than the causal ones
                    sel = O.select_blocks(q[i:i + 1, :, n[i] - 1:n[i]], k[i:i + 1, :, :n[i]], pattern)
                    assert sel.sum() < hkv * ((n[i] - 1) // 16 + 1)
        kk = torch.stack([k[i, :, n[i]] for i in range(b)])[:, :, None]
        vv = torch.stack([v[i, :, n[i]] for i in range(b)])[:, :, None]
        cache.append(kk, vv)


@needs_jit
def test_int8_cache_selects_over_the_dequantized_keys():
    pattern = CONFIGS["41-exact"]
    b, hq, hkv, s, d = 1, 4, 2, 75, 32
    for _ in range(20):  # a draw whose selection over the int8 keys is not decided by rounding
        q, k, v = draw(pattern, (b, hq, hkv, s, s), d, min_margin=1e-5)
        cache = sa.KVCache(b, hkv, d, 80, kv_dtype="int8")
        cache.append(k, v)
        kd, vd = cache.gather(0, s)
        if O.margin(q, kd, pattern) > 1e-5:
            break
    out = sa.attention_with_cache(q[:, :, -1:], cache, pattern, backend="cpu")
    oracle.assert_close_contract(out, O.attention(q[:, :, -1:], kd, vd, pattern), dtype=q.dtype, device="cpu")


@needs_jit
def test_plan_explains_the_choice_and_ring_cache_refuses():
    pattern = CONFIGS["41-coarse"]
    cache = sa.PagedKVCache(1, 2, 32, num_pages=8, page_size=16, max_len=128)
    cache.append(torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 32))
    text = sa.plan_with_cache(torch.randn(1, 8, 1, 32), cache, pattern).explain()
    assert "InfLLMv2(" in text and "chosen: cpu.decode" in text and "reference.cache_chunked" in text
    ring = RingKVCache(1, 2, 32, window=64)
    ring.append(torch.randn(1, 2, 10, 32), torch.randn(1, 2, 10, 32))
    with pytest.raises(TypeError, match="compressed keys"):
        sa.attention_with_cache(torch.randn(1, 8, 1, 32), ring, pattern)


@pytest.mark.parametrize("page_size", [None, 16])
def test_model_cache_prefill_then_decode_equals_the_full_forward(page_size):
    """`ModelCache` (what the transformers registration decodes with): a prompt through `attention`,
    then steps through the cache (growing, or paged); the window sums are made from the prompt's keys."""
    pattern = CONFIGS["41-coarse"]
    q, k, v = drawn(pattern, (2, 4, 2, 107, 107), 32)
    full = sa.attention(q, k, v, pattern, backend="reference")
    mc = sa.ModelCache(1, max_len=None if page_size is None else 128, page_size=page_size)
    out = [mc.attend(0, q[:, :, :70], k[:, :, :70], v[:, :, :70], pattern)]
    for t in range(70, 107):
        out.append(mc.attend(0, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pattern))
    torch.testing.assert_close(torch.cat(out, dim=2), full, rtol=1e-5, atol=1e-5)
