"""Quantized KV caches (`kv_dtype="int8" | "fp8_e4m3"`, contract "Quantized KV caches").

* the storage: codes and one float32 scale per (token, kv head) as the contract defines them; the
  C++ append path gives the bits of the PyTorch definition; all-zero rows get scale 1;
* attention over the cache equals the float64 evaluation over the DEQUANTIZED rows within the
  float32 bound, for every pattern, Sq 1 / 3 / 16 (and 20: chunked prefill on the PyTorch path),
  GQA 1 / 4, head dims 64 / 80 / 128 and an odd one, ragged appends, the C++ kernel and the
  reference; paged == contiguous bit for bit; keys a kernel must not read carry NaN scales;
* TopK selects over the dequantized keys' block means; release_outside / free unchanged;
* a bad kv_dtype is a ValueError naming it; the plan says which kernels read quantized storage.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, make_pattern, randn, topk_margin
from sparse_attn.cache import KVCache, PagedKVCache, attention_with_cache
from sparse_attn.cache.quant import KV_DTYPES, dequantize, quantize_rows, quantize_rows_torch
from sparse_attn.scheduler.kernel import Kernel
from test_cache import _fill, _row_pattern
from test_cpu_paged_decode import _paged


BS = 16
QUANT = list(KV_DTYPES)
KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "topk", "topk_wide"]
DIMS = (64, 80, 128)


def _codes_equal(a, b):
    if a.dtype != torch.int8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def _dequantized(c: KVCache, n: int):
    """The contiguous cache's rows [0, n) dequantized exactly (float64): what attention means."""
    return (dequantize(c.k[:, :, :n], c.k_scale[:, :, :n], torch.float64).cpu(),
            dequantize(c.v[:, :, :n], c.v_scale[:, :, :n], torch.float64).cpu())


def _poison_scales(caches):
    """NaN scales wherever a kernel must not read: rows at or past each length (contiguous), the trash
    page and the free pages (paged). A kernel that reads one puts NaN in its output."""
    for c in caches:
        if isinstance(c, PagedKVCache):
            dead = [c.num_pages] + list(c._free)
            c.k_scale[dead] = float("nan")
            c.v_scale[dead] = float("nan")
        else:
            for i, n in enumerate(c.host_lengths):
                c.k_scale[i, :, n:] = float("nan")
                c.v_scale[i, :, n:] = float("nan")


def _build(pat, kv_dtype, b, hq, hkv, d, lengths, max_len, dtype, sqs, steps, device="cpu"):
    """Caches (contiguous, paged 8, paged 24) filled by ragged appends, the dequantized keys and
    values (float64) and queries, redrawn until TopK's choice is clear over the dequantized keys."""
    pool = getattr(pat, "block_size", BS)
    for _ in range(30):
        full_k = randn(b, hkv, max(lengths), d, dtype=dtype)
        full_v = randn(b, hkv, max(lengths), d, dtype=dtype)
        q = randn(b, hq, max(sqs), d, dtype=dtype)
        caches = [KVCache(b, hkv, d, max_len, dtype=dtype, pool_block_size=pool, kv_dtype=kv_dtype, device=device),
                  _paged_q(b, hkv, d, max_len, dtype, pool, 8, 1, kv_dtype, device),
                  _paged_q(b, hkv, d, max_len, dtype, pool, 24, 2, kv_dtype, device)]
        _fill(caches, full_k.to(device), full_v.to(device), lengths, steps=steps)
        dk, dv = _dequantized(caches[0], max(lengths))
        if not isinstance(pat, sa.TopK) or all(
                topk_margin(q[i:i + 1, :, -sq:].double(), dk[i:i + 1, :, :n], pat) > 1e-3
                for sq in sqs for i, n in enumerate(lengths)):
            return caches, dk, dv, q
    raise AssertionError("no TopK draw with a clear selection margin")


def _paged_q(b, hkv, d, max_len, dtype, pool, page_size, seed, kv_dtype, device="cpu"):
    c = _paged(b, hkv, d, max_len, dtype, pool, page_size, seed)  # its free list: pages in random order
    q = PagedKVCache(b, hkv, d, num_pages=c.num_pages, page_size=page_size, max_len=max_len, dtype=dtype,
                     pool_block_size=pool, kv_dtype=kv_dtype, device=device)
    q._free = c._free
    return q


def _check_rows(out, q, dk, dv, lengths, pat, what, device="cpu"):
    """Each sequence against the float64 evaluation over its dequantized rows (the float32 bound
    of the device that computed `out`)."""
    for i, n in enumerate(lengths):
        ref = oracle.oracle_attention(q[i:i + 1].double(), dk[i:i + 1, :, :n], dv[i:i + 1, :, :n],
                                      _row_pattern(pat, i, n))
        oracle.assert_close_contract(out[i:i + 1].float(), ref, dtype=torch.float32, device=device,
                                     what=f"{what} seq {i} (length {n})")


# ----------------------------------------------------------------------------------------- storage
@needs_jit
@pytest.mark.parametrize("kv_dtype", QUANT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_quantize_rows_definition(kv_dtype, dtype):
    x = randn(3, 2, 11, 37, dtype=dtype) * 3
    x[0, 1, 4] = 0  # an all-zero row
    x[1, 0, 2, 5] = 1e-30  # far below the rest of its row
    codes, scale = quantize_rows(x, kv_dtype)  # the C++ append path on the CPU
    ref_codes, ref_scale = quantize_rows_torch(x, kv_dtype)
    assert codes.dtype == KV_DTYPES[kv_dtype][0] and scale.dtype == torch.float32
    assert _codes_equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    qmax = KV_DTYPES[kv_dtype][1]
    assert scale[0, 1, 4] == 1 and (codes[0, 1, 4].float() == 0).all()
    amax = x.float().abs().amax(-1)
    nz = amax > 0
    assert torch.allclose(scale[nz], amax[nz] / qmax, rtol=0, atol=0)
    assert (codes.float().abs().amax(-1)[nz] == qmax).all()  # the largest element maps to the end
    err = (dequantize(codes, scale) - x.float()).abs()
    half_step = scale[..., None] * (0.5 if kv_dtype == "int8" else 16.0)  # fp8: 3 mantissa bits
    assert (err <= half_step * (1 + 1e-4)).all()  # ties (x / s = n + 1/2) sit on the bound


def test_bad_kv_dtype():
    for bad in ("int4", "float8", torch.int8, 8):
        with pytest.raises(ValueError, match="kv_dtype"):
            KVCache(1, 1, 8, 16, kv_dtype=bad)
        with pytest.raises(ValueError, match="kv_dtype"):
            PagedKVCache(1, 1, 8, num_pages=2, page_size=8, max_len=16, kv_dtype=bad)


def test_all_zero_rows_and_block_sums():
    b, hkv, d = 2, 2, 16
    k = randn(b, hkv, 40, d)
    v = randn(b, hkv, 40, d)
    k[:, :, 5:9] = 0
    v[:, :, 7:12] = 0
    for kv_dtype in QUANT:
        c = KVCache(b, hkv, d, 64, kv_dtype=kv_dtype, pool_block_size=BS)
        c.append(k, v, num_new=[40, 33])
        assert (c.k_scale[:, :, 5:9] == 1).all() and (c.v_scale[:, :, 7:12] == 1).all()
        assert (c.k[:, :, 5:9].float() == 0).all()
        dk, _ = _dequantized(c, 40)
        means = c.pooled_keys(3).double()
        for i, n in enumerate([40, 33]):
            for blk in range(3):
                lo, hi = blk * BS, min(n, (blk + 1) * BS)
                want = dk[i, :, lo:hi].mean(1)
                assert torch.allclose(means[i, :, blk], want, atol=1e-6), "block means over dequantized keys"


# --------------------------------------------------------------------------------------- attention
@needs_jit
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_dtype", QUANT)
def test_quantized_caches_match_oracle(kv_dtype, kind):
    b, hkv = 3, 2
    gqa = (1, 4)[(KINDS.index(kind) + QUANT.index(kv_dtype)) % 2]  # each pattern with GQA 1 and 4 across the kinds
    hq = hkv * gqa
    d = DIMS[(KINDS.index(kind) + gqa + QUANT.index(kv_dtype)) % 3]
    lengths, max_len, sqs = [37, 90, 53], 100, (1, 3, 16)
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=BS)
    caches, dk, dv, q = _build(pat, kv_dtype, b, hq, hkv, d, lengths, max_len, torch.float32, sqs,
                               steps=[20, 1, 7, 60, 5])
    ck, cv = caches[0].kv_view().gather(0, max(lengths))
    assert torch.allclose(ck.double(), dk, rtol=1e-6, atol=0) and torch.allclose(cv.double(), dv, rtol=1e-6, atol=0)
    for c in caches[1:]:  # the same rows, codes and scales, through the page table
        gk, gv = c.kv_view().gather(0, max(lengths))
        for i, n in enumerate(lengths):
            assert torch.equal(gk[i, :, :n], ck[i, :, :n]) and torch.equal(gv[i, :, :n], cv[i, :, :n])
    # the PyTorch path reads whole chunks (stale rows past a length masked, but 0 x NaN = NaN): before the poison
    for sq in sqs[:2]:
        ref = attention_with_cache(q[:, :, -sq:], caches[1], pat, backend="reference")
        _check_rows(ref, q[:, :, -sq:], dk, dv, lengths, pat, f"reference {kv_dtype} {kind} G={gqa} D={d} Sq={sq}")
    _poison_scales(caches)
    for sq in sqs:
        qs = q[:, :, -sq:]
        plan = sa.plan_with_cache(qs, caches[0], pat)
        assert plan.kernel.name == "cpu.decode", plan.explain()
        assert plan.problem.kv_dtype == kv_dtype
        outs = [attention_with_cache(qs, c, pat) for c in caches]
        for o in outs[1:]:  # paged == contiguous (within float32 rounding: docs/caches.md)
            assert oracle.rel_err(o, outs[0]) <= 1e-6, f"paged != contiguous ({kind}, Sq={sq})"
        what = f"{kv_dtype} {kind} G={gqa} D={d} Sq={sq}"
        _check_rows(outs[0], qs, dk, dv, lengths, pat, "cpu " + what)


@needs_jit
@pytest.mark.parametrize("kv_dtype", QUANT)
def test_chunked_prefill_low_precision_and_odd_dim(kv_dtype):
    """Sq = 20 > 16 runs the PyTorch path (dequantized per chunk); bf16 queries over a quantized
    cache; an odd head dim (the products' tails)."""
    b, hkv, hq, d = 2, 1, 4, 20
    lengths, max_len = [45, 70], 80
    for pat in (sa.Dense(), sa.TopK(2, block_size=BS), sa.SlidingWindow(24, sinks=2)):
        caches, dk, dv, q = _build(pat, kv_dtype, b, hq, hkv, d, lengths, max_len, torch.float32, (2, 20),
                                   steps=[30, 9, 31])
        plan = sa.plan_with_cache(q, caches[0], pat)
        assert plan.kernel.name == "reference.cache_chunked", plan.explain()
        _check_rows(plan.run(q, caches[0]), q, dk, dv, lengths, pat, f"{kv_dtype} chunked {pat}")
        _poison_scales(caches)
        out = attention_with_cache(q[:, :, -2:], caches[2], pat)
        _check_rows(out, q[:, :, -2:], dk, dv, lengths, pat, f"{kv_dtype} D={d} {pat}")
    # bf16 rows in, bf16 queries: the products in float32 over the dequantized rows
    pat = sa.Dense()
    caches, dk, dv, q = _build(pat, kv_dtype, b, 8, 2, 64, lengths, max_len, torch.bfloat16, (3,), steps=[40, 30])
    for backend in ("cpu", "reference"):
        out = attention_with_cache(q, caches[1], pat, backend=backend)
        assert out.dtype == torch.bfloat16
        for i, n in enumerate(lengths):
            ref = oracle.oracle_attention(q[i:i + 1].double(), dk[i:i + 1, :, :n], dv[i:i + 1, :, :n], pat)
            oracle.assert_close_contract(out[i:i + 1], ref, dtype=torch.bfloat16, device="cpu", what=backend)


@needs_jit
@pytest.mark.parametrize("kv_dtype", QUANT)
def test_release_and_free_unchanged(kv_dtype):
    b, hq, hkv, d = 2, 4, 2, 32
    lengths, max_len = [70, 130], 160
    pat = sa.SlidingWindow(20, sinks=3)
    caches, dk, dv, q = _build(pat, kv_dtype, b, hq, hkv, d, lengths, max_len, torch.float32, (1,), steps=[50, 3, 80])
    contig, paged = caches[0], caches[1]
    before = attention_with_cache(q, paged, pat)
    assert paged.release_outside(pat) > 0
    _poison_scales([paged])  # released pages are free now: NaN scales
    assert torch.equal(before, attention_with_cache(q, paged, pat))
    assert oracle.rel_err(attention_with_cache(q, contig, pat), before) <= 1e-6
    _check_rows(before, q, dk, dv, lengths, pat, "after release")
    with pytest.raises(ValueError, match="released"):
        attention_with_cache(q, paged, sa.Dense())
    free_before = paged.free_pages
    paged.free(0)
    assert paged.free_pages > free_before and paged.host_lengths[0] == 0


def test_plan_names_quantized_storage():
    """The plan prints the storage; a kernel that declares no quantized storage says so."""
    c = KVCache(1, 2, 16, 32, kv_dtype="int8")
    c.append(randn(1, 2, 5, 16), randn(1, 2, 5, 16))
    q = randn(1, 4, 1, 16)
    plan = sa.plan_with_cache(q, c, sa.Dense(), backend="reference")
    text = plan.explain()
    assert "int8 contiguous cache" in text and plan.kernel.name == "reference.cache_chunked"

    class PlainOnly(Kernel):
        name, backend, cache_kinds = "test.plain", "test", ("contiguous",)
        patterns = (sa.Dense,)

    assert any("does not read int8 storage" in r for r in PlainOnly().not_supported_reasons(plan.problem))
    assert not any("storage" in r for r in type(plan.kernel)().not_supported_reasons(plan.problem))


@needs_jit
def test_every_fp8_code_decodes():
    """Keys and values that hold every finite e4m3fn code (subnormals included) decode to torch's
    float8_e4m3fn values in the kernels, with and without flush-to-zero of float32 denormals."""
    codes = torch.tensor([i for i in range(256) if i & 0x7F != 0x7F], dtype=torch.uint8)  # 254 finite codes
    d, n = 64, 8
    rows = torch.cat([codes, codes.flip(0), codes])[:n * d].view(n, d)
    c = KVCache(1, 1, d, n, kv_dtype="fp8_e4m3")
    c.append(randn(1, 1, n, d), randn(1, 1, n, d))
    c.k[0, 0, :n] = rows.view(torch.float8_e4m3fn)
    c.v[0, 0, :n] = rows.roll(1, 0).view(torch.float8_e4m3fn)
    c.k_scale[:] = 1e-2
    c.v_scale[:] = 0.5
    dk, dv = _dequantized(c, n)
    q = randn(1, 2, 1, d)
    ref = oracle.oracle_attention(q.double(), dk, dv, sa.Dense())
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        try:
            for backend in ("cpu", "reference"):
                out = attention_with_cache(q, c, sa.Dense(), backend=backend)
                oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu", what=f"{backend} {flush}")
        finally:
            torch.set_flush_denormal(False)
