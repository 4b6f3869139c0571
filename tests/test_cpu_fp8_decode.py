"""`cpu.decode` over an fp8_e4m3 KV cache with bfloat16 queries: the codes turned into bf16 words
in registers and multiplied by the bf16 cache's products (csrc/cpu/decode_fp8.h; where the build has
no AVX-512 BF16 the float path runs and the same checks hold). Checked against the float64
evaluation over the dequantized rows, tighter than the contract's bf16 bound: lse within 2e-4
(q and the codes are exact in bf16, the sums float32), outputs within their own bf16 rounding plus
2^-9 of the largest |value| (P is rounded to bf16, as on the bf16 cache's path); every one of
the 254 finite codes as keys and values; head dims 32-256, GQA 1-16, Sq 1-16, lengths around the
segments, paged == contiguous bit for bit; a NaN scale makes its kv head's rows NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

import sparse_attn as sa
from conftest import needs_jit, randn
from sparse_attn.cache import KVCache, PagedKVCache
from sparse_attn.cache.quant import dequantize
from test_cpu_int8_decode import LENGTHS, _decode, _ext, _fill, _lse_base2, _reference

pytestmark = needs_jit


def _caches(b, hkv, d, lengths, pool=16):
    max_len = max(lengths) + 8
    full_k = (randn(b, hkv, max(lengths), d) * 1.5).bfloat16()
    full_v = randn(b, hkv, max(lengths), d).bfloat16()
    caches = [KVCache(b, hkv, d, max_len, dtype=torch.bfloat16, pool_block_size=pool, kv_dtype="fp8_e4m3"),
              PagedKVCache(b, hkv, d, num_pages=b * (max_len // 16 + 2), page_size=16, max_len=max_len,
                           dtype=torch.bfloat16, pool_block_size=pool, kv_dtype="fp8_e4m3")]
    g = torch.Generator().manual_seed(4)
    caches[1]._free = [int(i) for i in torch.randperm(caches[1].num_pages, generator=g)]
    _fill(caches, full_k, full_v, lengths, steps=[100, 1, 60, 7, 200])
    return caches


def _check(out, lse, q, c, lengths, what):
    for i, n in enumerate(lengths):
        dk = dequantize(c.k[i:i + 1, :, :n], c.k_scale[i:i + 1, :, :n], torch.float64)
        dv = dequantize(c.v[i:i + 1, :, :n], c.v_scale[i:i + 1, :, :n], torch.float64)
        ref, ref_lse = _reference(q[i:i + 1].double(), dk, dv, sa.Dense())
        got_lse = lse[i:i + 1].double() / math.log2(math.e) if _lse_base2() else lse[i:i + 1].double()
        err_lse = (got_lse - ref_lse).abs().max().item()
        assert err_lse <= 2e-4, f"{what} seq {i} (length {n}): lse error {err_lse:.2e}"
        o = out[i:i + 1].double()
        # the output's bf16 rounding, and P's: each p within 2^-9 of itself moves a column by at most
        # 2^-9 of the largest |v| it averages
        tol = 2.0 ** -8 * ref.abs() + 2.0 ** -9 * dv.abs().amax() + 1e-6
        assert not ((o - ref).abs() > tol).any(), f"{what} seq {i} (length {n}): out error {(o - ref).abs().max():.2e}"


def test_fp8_dot_is_built_with_bf16_dot():
    ext = _ext()
    assert bool(ext.fp8_dot) == (bool(ext.bf16_dot) and __import__("os").uname().machine == "x86_64")


@pytest.mark.parametrize("d,gqa", [(32, 16), (64, 4), (128, 4), (256, 1)])
def test_fp8_decode_lengths_dims(d, gqa):
    hkv = 2
    for sq in (1, 16):
        lengths = [max(n, sq) for n in LENGTHS]
        caches = _caches(len(lengths), hkv, d, lengths)
        q = randn(len(lengths), hkv * gqa, sq, d).bfloat16()
        outs = [_decode(q, c, sa.Dense()) for c in caches]
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), "paged != contiguous"
        _check(*outs[0], q, caches[0], lengths, f"fp8 D={d} G={gqa} Sq={sq}")


def test_every_fp8_code_as_keys_and_values():
    """The 254 finite codes (both signs, subnormals, the largest) stored as they are (scale 1 rows of
    a cache written directly), read by the bf16-word conversion."""
    d = 128
    codes = torch.tensor([i for i in range(256) if i & 0x7F != 0x7F], dtype=torch.uint8)
    n = 64
    c = KVCache(1, 1, d, n, dtype=torch.bfloat16, kv_dtype="fp8_e4m3")
    g = torch.Generator().manual_seed(7)
    for t in (c.k, c.v):
        idx = torch.randint(0, codes.numel(), (1, 1, n, d), generator=g)
        idx.view(-1)[:codes.numel()] = torch.arange(codes.numel())  # every code at least once
        t[:, :, :n] = codes[idx].view(torch.float8_e4m3fn)
    c.k_scale[:, :, :n] = 2.0 ** -6  # scores of a moderate size
    c.v_scale[:, :, :n] = 1.0
    c.lengths.fill_(n)
    c.host_lengths[:] = [n]
    q = randn(1, 4, 1, d).bfloat16()
    out, lse = _decode(q, c, sa.Dense())
    _check(out, lse, q, c, [n], "every code")


def test_fp8_decode_nan_scale():
    b, hkv, gqa, d, n = 1, 2, 4, 64, 200
    caches = _caches(b, hkv, d, [n])
    caches[0].v_scale[0, 0, 150] = float("nan")
    q = randn(b, hkv * gqa, 1, d).bfloat16()
    out, _ = _decode(q, caches[0], sa.Dense())
    assert torch.isnan(out[0, :gqa]).all() and torch.isfinite(out[0, gqa:]).all()
