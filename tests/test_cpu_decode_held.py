"""The float path of the CPU decode kernel for few rows of a small head (csrc/cpu/decode_f32.h:
`qk_rows_held`, q held in registers over a segment, and `pv_stripe`, P . V over 32- or 64-column
stripes), as the tiny models served through vLLM run it: G = 1-2 rows per kv head (or Sq = 2 with
G = 1) at D 32 / 64 / 128, float32 and float16 K/V, contiguous and paged, lengths that are not
multiples of the 4- and 8-key tiles, several splits, Dv != D (stripes plus the 16-column tail).
Against the float64 reference with the contract's bounds; paged equals contiguous bit for bit.
"""
from __future__ import annotations

import platform

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, make_qkv_for, shuffled_pages
from sparse_attn.cache.quant import dequantize

pytestmark = needs_jit


def _decode():
    from sparse_attn.backends.cpu import decode
    return decode


def _paged(k, v, page):
    """The same keys as pages in shuffled order: (pages (P, Hkv, page, D), table (B, W))."""
    return shuffled_pages(k, v, page)


@pytest.mark.parametrize("d, dv, g, sq", [(64, 64, 2, 1), (64, 64, 1, 1), (32, 32, 2, 1), (128, 128, 1, 1),
                                          (64, 96, 2, 1), (32, 40, 1, 2), (128, 64, 1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("pattern", [sa.Dense(), sa.SlidingWindow(700, sinks=3)], ids=["dense", "window"])
def test_small_heads_against_float64(d, dv, g, sq, dtype, pattern):
    # 1531: not a multiple of 4, 8, 16, a page or a segment; 6 segments of 256 keys where q is held
    # (12 of 128 elsewhere), several splits
    b, hkv, sk = 2, 2, 1531
    q, k, v = make_qkv_for(pattern, b, g * hkv, hkv, sq, sk, d, dv, dtype=dtype)
    out, _ = _decode().decode_forward(q, k, v, pattern, scale=d ** -0.5)
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, scale=d ** -0.5, backend="reference")
    base = oracle.masked_attention_in_dtype(q, k, v, pattern, scale=d ** -0.5) if dtype in oracle.LOW_PRECISION \
        else None
    oracle.assert_close_contract(out, ref, dtype=dtype, device="cpu", lowp_baseline=base)
    # the same keys as shuffled pages of 64 (the paged rows: TableRows) give the same bits
    kp, vp, table = _paged(k, v, 64)
    lens = torch.full((b,), sk, dtype=torch.int32)
    paged, _ = _decode()._decode_fwd(q, kp, vp, pattern, scale=d ** -0.5, token_index=None, lengths=lens,
                                     page_table=table, page_size=64)
    assert torch.equal(paged, out)


def test_segment_keys_rule():
    """Segments of 256 keys only for the float32 products with q held in registers (G x Sq <= 2
    rows of a small head); 128 for every other path, whatever the cache's kind or state."""
    ext = _decode()._ext()
    long_f32 = ext.segment_keys("float32", "float32", 2, 64)
    if ext.bf16_dot and platform.machine() in ("x86_64", "AMD64"):  # AVX-512: q is held (kHeldQVectors)
        assert long_f32 == 256
    elif platform.machine() in ("aarch64", "arm64"):  # NEON: 16 registers of 4 floats, q reloaded
        assert long_f32 == 128
    assert long_f32 in (128, 256)
    assert ext.segment_keys("float16", "float16", 1, 128) == long_f32
    assert ext.segment_keys("float32", "float32", 4, 128) == 128  # G = 4: q reloaded, not held
    assert ext.segment_keys("float32", "float32", 2, 128) == 128  # 2 x 16 vectors do not fit
    assert ext.segment_keys("bfloat16", "int8", 2, 64) == 128
    assert ext.segment_keys("float16", "fp8_e4m3", 1, 64) == 128
    assert ext.segment_keys("bfloat16", "bfloat16", 2, 64) == (128 if ext.bf16_dot else long_f32)
    with pytest.raises(ValueError, match="kv_dtype"):
        ext.segment_keys("float32", "int4", 2, 64)
    with pytest.raises(ValueError, match="dtype"):
        ext.segment_keys("int8", "int8", 2, 64)


@pytest.mark.parametrize("sk", [255, 256, 257, 1023, 1025])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_long_segment_edges(sk, paged):
    """Lengths at the 256-key segments' edges, G = 2 at D 64 in float32 (the held path), a window
    that starts inside a segment plus sinks, two query rows with their own windows."""
    for pattern, sq in ((sa.Dense(), 1), (sa.SlidingWindow(300, sinks=5), 2)):
        q, k, v = make_qkv_for(pattern, 1, 4, 2, sq, sk, 64, dtype=torch.float32)
        ref = sa.attention(q.double(), k.double(), v.double(), pattern, scale=0.125, backend="reference")
        if paged:
            kp, vp, table = _paged(k, v, 64)
            out, _ = _decode()._decode_fwd(q, kp, vp, pattern, scale=0.125, token_index=None,
                                           lengths=torch.full((1,), sk, dtype=torch.int32), page_table=table,
                                           page_size=64)
        else:
            out, _ = _decode().decode_forward(q, k, v, pattern, scale=0.125)
        oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("sk", [1, 3, 5, 8, 13])
def test_short_tails(sk):
    """Fewer keys than one 4- or 8-key tile: only the single-key tail tiles run."""
    for g in (1, 2):
        q, k, v = make_qkv_for(sa.Dense(), 1, 2 * g, 2, 1, sk, 64, dtype=torch.float32)
        out, _ = _decode().decode_forward(q, k, v, sa.Dense(), scale=0.125)
        ref = sa.attention(q.double(), k.double(), v.double(), sa.Dense(), scale=0.125, backend="reference")
        oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_prefetch_modes_same_bits(dtype):
    """The decode products' prefetches (csrc/cpu/reuse_clock.h: on for a cache not read recently,
    off for one read again soon after) change where memory is touched, never the arithmetic:
    prefetch = 0, 1 and -1 (auto, first call and repeated calls) give the same bits, paged and
    contiguous. Anything else is a ValueError naming the argument."""
    ext = _decode()._ext()
    b, g, hkv, sk, d = 2, 2, 2, 1000, 64
    q, k, v = make_qkv_for(sa.Dense(), b, g * hkv, hkv, 1, sk, d, d, dtype=dtype)
    kp, vp, table = _paged(k, v, 64)

    def run(prefetch, paged):
        a = ext.DecodeArgs()
        a.q, a.scale, a.prefetch = q, d ** -0.5, prefetch
        if paged:
            a.k, a.v, a.page_table, a.page_size = kp, vp, table, 64
            a.lengths = torch.full((b,), sk, dtype=torch.int32)
        else:
            a.k, a.v = k, v
        return ext.decode_fwd(a)[0]

    for paged in (False, True):
        outs = [run(p, paged) for p in (0, 1, -1, -1, -1)]
        for o in outs[1:]:
            assert torch.equal(o, outs[0])
    ref = sa.attention(q.double(), k.double(), v.double(), sa.Dense(), scale=d ** -0.5, backend="reference")
    oracle.assert_close_contract(outs[0], ref, dtype=dtype, device="cpu")
    with pytest.raises(ValueError, match="prefetch"):
        run(2, False)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_prefetch_modes_same_bits_quantized(kv_dtype):
    """A quantized cache's products (int8 / fp8 codes, bf16 queries) prefetch in auto mode always;
    `prefetch = 0` drops the pacer and the page touch: the same bits, paged and contiguous, and
    within the contract of the float64 evaluation over the dequantized rows."""
    ext = _decode()._ext()
    b, g, hkv, sk, d = 1, 2, 2, 1000, 64
    q, k, v = make_qkv_for(sa.Dense(), b, g * hkv, hkv, 1, sk, d, d, dtype=torch.bfloat16)
    caches = [sa.KVCache(b, hkv, d, sk, dtype=torch.bfloat16, kv_dtype=kv_dtype),
              sa.PagedKVCache(b, hkv, d, num_pages=-(-sk // 64) + 1, page_size=64, max_len=sk,
                              dtype=torch.bfloat16, kv_dtype=kv_dtype)]
    outs = []
    for cache in caches:
        cache.append(k, v)
        view = cache.kv_view()

        def run(prefetch):
            a = ext.DecodeArgs()
            a.q, a.k, a.v, a.scale, a.prefetch = q, view.k, view.v, d ** -0.5, prefetch
            a.lengths, a.k_scale, a.v_scale = view.lengths, view.k_scale, view.v_scale
            if view.kind != "contiguous":
                a.page_table, a.page_size = view.page_table, view.page_size
            return ext.decode_fwd(a)[0]

        got = [run(p) for p in (0, 1, -1, -1)]
        for o in got[1:]:
            assert torch.equal(o, got[0])
        outs.append(got[0])
    assert torch.equal(outs[0], outs[1])
    c = caches[0]
    kd = dequantize(c.k[:, :, :sk], c.k_scale[:, :, :sk], torch.float64)
    vd = dequantize(c.v[:, :, :sk], c.v_scale[:, :, :sk], torch.float64)
    ref = sa.attention(q.double(), kd, vd, sa.Dense(), scale=d ** -0.5, backend="reference")
    oracle.assert_close_contract(outs[0], ref, dtype=torch.bfloat16, device="cpu")
