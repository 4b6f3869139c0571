"""The CUDA split-KV decode kernel (csrc/cuda/paged_decode.cu, backend `cuda`).

On every machine: the arguments the Python side hands the kernel (per-(sequence, kv head) block
lists, per-row block masks, page tables, lengths, window/sinks) are checked by feeding them to a
float64 PyTorch emulation of the kernel's documented semantics (paged_decode.cuh) and comparing
with the oracle; so a wrong block list fails here, GPU or not.
On a machine with a CUDA GPU: the kernel itself against the oracle, through `attention(...,
backend="cuda")` and `attention_with_cache` over contiguous and paged caches.
tests/test_cuda_build.py compiles the .cu file with nvcc for sm_80 and sm_90.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import make_pattern, make_qkv_for, pattern_on, randn, topk_margin
from sparse_attn.backends.cuda.paged_decode import CudaSplitKVDecode
from sparse_attn.layout.decode_blocks import cache_decode_args, tensor_decode_args
from sparse_attn.cache import KVCache, PagedKVCache, attention_with_cache
from sparse_attn.scheduler.problem import make_problem
from test_cache import _fill, _row_pattern

KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "topk", "topk_wide"]
HAS_CUDA = torch.cuda.is_available() and torch.version.cuda is not None


def emulate(q, k, v, table, lengths, count, index, row_mask, key_block, causal, window, sinks, scale, splits,
            softcap=0.0, quant=None, k_scale=None, v_scale=None):
    """float64 evaluation of what paged_decode.cuh specifies for these arguments (a quantized
    cache's rows: code * its row's scale)."""
    assert splits >= 1
    if quant is not None:
        assert k.dtype == {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[quant] and v.dtype == k.dtype
        k = k.double() * k_scale.double()[..., None]
        v = v.double() * v_scale.double()[..., None]
    b, hq, sq, d = q.shape
    hkv, page = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, sq, v.shape[3], dtype=torch.float64)
    for bi in range(b):
        n = int(lengths[bi])
        j = torch.arange(n)
        pages = table[bi].long()[j // page]
        kk = k[pages, :, j % page].double().permute(1, 0, 2)  # (Hkv, n, D)
        vv = v[pages, :, j % page].double().permute(1, 0, 2)
        nb = -(-n // key_block)
        for h in range(hkv):
            if count is None:
                allowed = torch.ones(nb, dtype=torch.bool)
            else:
                allowed = torch.zeros(max(nb, int(index.shape[-1])), dtype=torch.bool)
                ids = index[bi, h, :int(count[bi, h])].long()
                assert (ids >= 0).all() and (ids[1:] > ids[:-1]).all(), "block list not ascending"
                allowed[ids] = True
            for t in range(sq):
                p = n - sq + t
                ok = allowed[j // key_block]
                if row_mask is not None:
                    ok = ok & row_mask[bi, h, t].bool()[j // key_block]
                if causal:
                    ok = ok & (j <= p)
                if window > 0:
                    ok = ok & ((p - j < window) | (j < sinks))
                for gi in range(g):
                    s = (kk[h] @ q[bi, h * g + gi, t].double()) * scale
                    if softcap > 0:
                        s = softcap * torch.tanh(s / softcap)
                    s = s.masked_fill(~ok, float("-inf"))
                    if ok.any():
                        out[bi, h * g + gi, t] = torch.softmax(s, 0) @ vv[h]
    return out


@pytest.mark.parametrize("cache_kind", ["contiguous", "paged"])
@pytest.mark.parametrize("kind", KINDS)
def test_cache_arguments_match_oracle(kind, cache_kind):
    b, hq, hkv, d = 3, 4, 2, 16
    lengths, max_len = [37, 81, 64], 96
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=16)
    bs = getattr(pat, "block_size", 16)
    for _ in range(50):
        full_k, full_v = randn(b, hkv, 81, d), randn(b, hkv, 81, d)
        q = randn(b, hq, 3, d)
        if not isinstance(pat, sa.TopK) or all(
                topk_margin(q[i:i + 1], full_k[i:i + 1, :, :n], pat) > 1e-3 for i, n in enumerate(lengths)):
            break
    cache = (KVCache(b, hkv, d, max_len, pool_block_size=bs) if cache_kind == "contiguous" else
             PagedKVCache(b, hkv, d, num_pages=40, page_size=8, max_len=max_len, pool_block_size=bs))
    _fill([cache], full_k, full_v, lengths, steps=[30, 1, 50])
    for sq in (1, 3):
        args = cache_decode_args(q[:, :, -sq:], cache.kv_view(), pat, scale=d ** -0.5, units=132)
        out = emulate(*args)
        for i, n in enumerate(lengths):
            ref = oracle.oracle_attention(q[i:i + 1, :, -sq:], full_k[i:i + 1, :, :n], full_v[i:i + 1, :, :n],
                                          _row_pattern(pat, i, n))
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("kind", ["dense_causal", "window_sinks", "topk"])
def test_quantized_cache_arguments_match_oracle(kind, kv_dtype):
    """The kernel's arguments over a quantized paged cache (codes, row scales) give the float64
    evaluation over the dequantized rows (tests/test_quant_cache.py builds the caches)."""
    from test_quant_cache import _build
    b, hkv, d, lengths = 3, 2, 16, [37, 81, 64]
    pat = make_pattern(kind, b=b, hkv=hkv, sk=96, bs=16)
    caches, dk, dv, q = _build(pat, kv_dtype, b, 4, hkv, d, lengths, 96, torch.float32, (1, 3), steps=[30, 1, 50])
    for sq in (1, 3):
        args = cache_decode_args(q[:, :, -sq:], caches[1].kv_view(), pat, scale=d ** -0.5, units=132)
        assert args.quant == kv_dtype and args.k_scale is not None
        out = emulate(*args)
        for i, n in enumerate(lengths):
            ref = oracle.oracle_attention(q[i:i + 1, :, -sq:].double(), dk[i:i + 1, :, :n], dv[i:i + 1, :, :n],
                                          _row_pattern(pat, i, n))
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_tensor_arguments_match_oracle(kind, sq):
    b, hq, hkv, sk, d = 2, 8, 2, 75, 16
    pat = make_pattern(kind, b=b, hkv=hkv, sk=sk, bs=16)
    q, k, v = make_qkv_for(pat, b, hq, hkv, sq, sk, d)
    args = tensor_decode_args(q, k, v, pat, scale=d ** -0.5, units=132)
    torch.testing.assert_close(emulate(*args), oracle.oracle_attention(q, k, v, pat), rtol=1e-9, atol=1e-12)


def test_softcap_argument_matches_oracle():
    """The kernel's arguments carry the softcap (paged_decode.cuh: s -> softcap * tanh(s / softcap))."""
    b, hq, hkv, sk, d = 1, 4, 2, 45, 16
    pat = make_pattern("window_sinks", b=b, hkv=hkv, sk=sk, bs=16)
    q, k, v = make_qkv_for(pat, b, hq, hkv, 3, sk, d)
    args = tensor_decode_args(q, k, v, pat, scale=d ** -0.5, units=132, softcap=1.5)
    assert args.softcap == 1.5
    torch.testing.assert_close(emulate(*args), oracle.oracle_attention(q, k, v, pat, softcap=1.5), rtol=1e-9,
                               atol=1e-12)


def test_scheduler_reports_why_not_here():
    q, k, v = randn(1, 4, 1, 16), randn(1, 2, 40, 16), randn(1, 2, 40, 16)
    text = sa.plan(q, k, v, sa.Dense()).explain()
    assert "cuda.splitkv_decode" in text
    assert "device cpu not in ('cuda',)" in text  # CPU inputs: refused for the device, no build asked
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="cuda"):
            sa.attention(q, k, v, sa.Dense(), backend="cuda")


def test_prefill_shapes_refused():
    q, k, v = randn(1, 4, 40, 16), randn(1, 2, 40, 16), randn(1, 2, 40, 16)
    reasons = CudaSplitKVDecode().extra_reasons(make_problem(q, k, v, sa.Dense()))
    assert any("Sq=40" in r for r in reasons)


# ------------------------------------------------------------------------------------- on a GPU
_needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of torch")


def gpu(test):
    """Skipped without a GPU; marked `gpu`, which `bash bench/gpu_check.sh` selects (`-m gpu`): the
    file's other tests check the kernel's arguments on the CPU and run in CI."""
    return pytest.mark.gpu(_needs_gpu(test))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2, 8, 2, 333, 64), (1, 32, 8, 1000, 128), (1, 4, 4, 200, 80)])
def test_kernel_matches_oracle_on_gpu(shape, kind, sq, dtype):
    b, hq, hkv, sk, d = shape
    pat = make_pattern(kind, b=b, hkv=hkv, sk=sk, bs=16)
    q, k, v = make_qkv_for(pat, b, hq, hkv, sq, sk, d, dtype=dtype)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    pat = pattern_on(pat, "cuda")
    out = sa.attention(q, k, v, pat, backend="cuda")
    ref = oracle.oracle_attention(q.cpu(), k.cpu(), v.cpu(), pattern_on(pat, "cpu"))
    base = oracle.masked_attention_in_dtype(q.cpu(), k.cpu(), v.cpu(), pattern_on(pat, "cpu"))
    oracle.assert_close_contract(out.cpu(), ref, dtype=dtype, device="cuda", lowp_baseline=base)


@gpu
@pytest.mark.parametrize("kind", KINDS)
def test_caches_on_gpu_match_reference(kind):
    b, hq, hkv, d = 3, 8, 2, 64
    lengths, max_len = [300, 811, 64], 1024
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=16)
    pat = pattern_on(pat, "cuda")
    bs = getattr(pat, "block_size", 16)
    full_k, full_v = randn(b, hkv, 811, d, dtype=torch.bfloat16), randn(b, hkv, 811, d, dtype=torch.bfloat16)
    caches = [KVCache(b, hkv, d, max_len, dtype=torch.bfloat16, device="cuda", pool_block_size=bs),
              PagedKVCache(b, hkv, d, num_pages=200, page_size=16, max_len=max_len, dtype=torch.bfloat16,
                           device="cuda", pool_block_size=bs)]
    _fill(caches, full_k.cuda(), full_v.cuda(), lengths, steps=[256, 1, 600])
    q = randn(b, hq, 2, d, dtype=torch.bfloat16).cuda()
    for c in caches:
        got = attention_with_cache(q, c, pat, backend="cuda")
        want = attention_with_cache(q, c, pat, backend="reference")
        oracle.assert_close_contract(got.cpu(), want.double().cpu(), dtype=torch.bfloat16, device="cuda")


@gpu
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_cache_kernel_on_gpu(kind, kv_dtype):
    """The kernel over quantized contiguous and paged caches on the GPU against the float64
    evaluation over the dequantized rows."""
    from test_quant_cache import _build, _check_rows
    b, hkv, d, lengths = 3, 2, 128, [37, 81, 64]
    pat = make_pattern(kind, b=b, hkv=hkv, sk=96, bs=16)
    caches, dk, dv, q = _build(pat, kv_dtype, b, 8, hkv, d, lengths, 96, torch.float32, (1, 3), steps=[30, 1, 50],
                               device="cuda")
    gpat = pattern_on(pat, "cuda")
    for c in caches:
        for sq in (1, 3):
            out = attention_with_cache(q[:, :, -sq:].cuda(), c, gpat, backend="cuda").cpu()
            _check_rows(out, q[:, :, -sq:], dk, dv, lengths, pat, f"cuda {kv_dtype} {kind} Sq={sq}", device="cuda")
