"""The Triton split-KV decode kernel (`triton.splitkv_decode`, sparse_attn/backends/triton/decode.py)
against the float64 oracle: through `attention(..., backend="triton")` (contiguous K/V) and
`attention_with_cache(..., backend="triton")` (contiguous and paged caches with ragged lengths).
Runs in Triton's interpreter on CPU-only machines (small sizes) and compiled on a GPU."""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import TRITON_DEVICE, make_pattern, make_qkv_for, pairwise, pattern_on, randn, topk_margin
from sparse_attn.cache import KVCache, PagedKVCache, attention_with_cache
from test_cache import _fill, _row_pattern

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)

DEV = TRITON_DEVICE
KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "topk", "topk_wide"]
CASES = pairwise({
    "kind": KINDS,
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "gqa": [1, 2, 4, 8],
    "sq": [1, 3, 16],
    "d": [64, 80, 128],
})


def _id(c):
    return f"{c['kind']}-{str(c['dtype'])[6:]}-g{c['gqa']}-sq{c['sq']}-d{c['d']}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_decode_matches_oracle(case):
    hkv, sk = 2, 77  # not a multiple of any block
    hq = hkv * case["gqa"]
    dtype = case["dtype"]
    pat = make_pattern(case["kind"], b=2, hkv=hkv, sk=sk, bs=16)
    q, k, v = make_qkv_for(pat, 2, hq, hkv, case["sq"], sk, case["d"], dtype=dtype)
    out = sa.attention(q.to(DEV), k.to(DEV), v.to(DEV), pattern_on(pat, DEV), backend="triton")
    ref = oracle.oracle_attention(q, k, v, pat)
    base = oracle.masked_attention_in_dtype(q, k, v, pat)
    oracle.assert_close_contract(out.cpu(), ref, dtype=dtype, device=DEV, lowp_baseline=base)


def test_row_without_keys_is_zero():
    lay = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    lay[0, 0, 4, 0] = True  # only the last query block sees block 0
    pat = sa.BlockSparse(lay, block_size=16)
    q, k, v = randn(1, 2, 2, 64), randn(1, 1, 70, 64), randn(1, 1, 70, 64)
    out = sa.attention(q.to(DEV), k.to(DEV), v.to(DEV), pattern_on(pat, DEV), backend="triton").cpu()
    torch.testing.assert_close(out, oracle.oracle_attention(q, k, v, pat).float(), rtol=1e-5, atol=1e-6)
    lay2 = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    out2 = sa.attention(q.to(DEV), k.to(DEV), v.to(DEV), pattern_on(sa.BlockSparse(lay2, block_size=16), DEV),
                        backend="triton").cpu()
    assert torch.equal(out2, torch.zeros_like(out2))


@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
@pytest.mark.parametrize("kind", ["dense_causal", "window_sinks", "blocksparse", "topk"])
def test_cache_decode_matches_oracle(kind, cache_kind):
    b, hq, hkv, d = 3, 4, 2, 64
    lengths, max_len = [37, 81, 64], 96
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=16)
    for _ in range(50):
        full_k, full_v = randn(b, hkv, 81, d), randn(b, hkv, 81, d)
        q = randn(b, hq, 2, d)
        if not isinstance(pat, sa.TopK) or all(
                topk_margin(q[i:i + 1], full_k[i:i + 1, :, :n], pat) > 1e-3 for i, n in enumerate(lengths)):
            break
    cache = (KVCache(b, hkv, d, max_len, device=DEV, pool_block_size=16) if cache_kind == "contiguous" else
             PagedKVCache(b, hkv, d, num_pages=40, page_size=8, max_len=max_len, device=DEV, pool_block_size=16))
    _fill([cache], full_k.to(DEV), full_v.to(DEV), lengths, steps=[30, 1, 50])
    assert sa.plan_with_cache(q.to(DEV), cache, pattern_on(pat, DEV), backend="triton").kernel.name == "triton.splitkv_decode"
    out = attention_with_cache(q.to(DEV), cache, pattern_on(pat, DEV), backend="triton").cpu()
    for i, n in enumerate(lengths):
        ref = oracle.oracle_attention(q[i:i + 1], full_k[i:i + 1, :, :n], full_v[i:i + 1, :, :n],
                                      _row_pattern(pat, i, n))
        oracle.assert_close_contract(out[i:i + 1], ref, dtype=torch.float32, device=DEV, what=f"seq {i}")


def test_not_chosen_automatically_in_the_interpreter():
    if DEV != "cpu":
        pytest.skip("GPU machine: the compiled kernel may be chosen")
    q, k, v = randn(1, 4, 1, 64), randn(1, 2, 50, 64), randn(1, 2, 50, 64)
    assert sa.plan(q, k, v, sa.Dense()).kernel.name != "triton.splitkv_decode"
    assert "triton.splitkv_decode" in sa.plan(q, k, v, sa.Dense(), backend="triton").explain()
