"""The `cpu` backend's split-KV decode kernel (`cpu.decode`, csrc/cpu/decode.cpp).

* against the float64 reference `attention(q.double(), ..., backend="reference")` and the
  contract's bounds (oracle.assert_close_contract, with the plain in-dtype evaluation as the
  float16 / bfloat16 baseline), for every softmax pattern, Sq in {1, 3, 16}, key lengths that are
  not multiples of any block (some shorter than one block), GQA 1/2/4/8, head dims 64/80/128,
  float32 / bfloat16 / float16 (an all-pairs covering design over those axes);
* several splits per (batch, kv head) (long inputs, 1 and 2 threads) and strided KV-cache views;
* decode of token t equals row t of the prefill; BlockSparse rows that see nothing give zeros;
* the scheduler: picks it for CPU decode, refuses Sq > 16 and training with a reason.

The first test in a fresh cache compiles the extension (a minute or two on the 2-core machine).
"""
from __future__ import annotations

import math

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, make_qkv_for, pairwise, random_layout, randn

pytestmark = needs_jit

KERNEL = "cpu.decode"
BS = 16  # BlockSparse / TopK block size of the matrix: no length below is a multiple of it


def _mod():
    from sparse_attn.backends.cpu import decode
    return decode


def pattern_of(kind, *, b, hkv, sk):
    if kind == "dense":
        return sa.Dense()
    if kind == "dense_full":
        return sa.Dense(causal=False)
    if kind == "window":
        return sa.SlidingWindow(20)
    if kind == "window_sinks":
        return sa.SlidingWindow(13, sinks=3)
    if kind == "blocksparse":
        return sa.BlockSparse(random_layout(b, hkv, sk, BS), block_size=BS)
    if kind == "blocksparse_bcast":
        return sa.BlockSparse(random_layout(1, 1, sk, BS), block_size=BS)
    if kind == "topk":
        return sa.TopK(2, block_size=BS)
    if kind == "topk_wide":
        return sa.TopK(3, block_size=5, sink_blocks=0, local_blocks=2)
    raise KeyError(kind)


KINDS = ["dense", "dense_full", "window", "window_sinks", "blocksparse", "blocksparse_bcast", "topk", "topk_wide"]
CASES = pairwise({
    "kind": KINDS,
    "sq": [1, 3, 16],
    "sk": [11, 37, 201, 333],  # 11 < 16 (one partial block); 37 < 64 (one segment)
    "group": [1, 2, 4, 8],
    "d": [64, 80, 128],
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
})
SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def check(q, k, v, pattern, out, *, scale=None):
    """`out` against the float64 reference with the contract's bounds (and, in low precision, at
    most twice the error of the plain evaluation in that dtype)."""
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, scale=scale, backend="reference")
    base = None
    if q.dtype in oracle.LOW_PRECISION:
        base = oracle.masked_attention_in_dtype(q, k, v, pattern, scale=scale)
    return oracle.assert_close_contract(out, ref, dtype=q.dtype, device="cpu", lowp_baseline=base)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{kind}-sq{sq}-sk{sk}-g{group}-d{d}-{}".format(
    SHORT[c["dtype"]], **c))
def test_against_float64_reference(case):
    kind, sq, sk, g, d, dtype = case["kind"], case["sq"], case["sk"], case["group"], case["d"], case["dtype"]
    if kind != "dense_full":
        sk = max(sk, sq)  # causal patterns need Sq <= Sk
    b, hkv = 2, 2
    pattern = pattern_of(kind, b=b, hkv=hkv, sk=sk)
    q, k, v = make_qkv_for(pattern, b, g * hkv, hkv, sq, sk, d, dtype=dtype)
    out, lse = _mod().decode_forward(q, k, v, pattern, scale=d ** -0.5)
    assert out.shape == (b, g * hkv, sq, d) and lse.shape == (b, g * hkv, sq) and lse.dtype == torch.float32
    check(q, k, v, pattern, out)
    # the public API with backend="cpu" runs whichever cpu kernel is cheaper: same contract
    p = sa.plan(q, k, v, pattern, backend="cpu")
    if sq > 1 and sq != sk:
        assert any(c.kernel.name == KERNEL and not c.reasons for c in p.candidates), p.explain()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=SHORT.get)
def test_odd_head_dims(dtype):
    """Head dims that are not multiples of the 8-float vectors (scalar tails), Dv != D; bfloat16
    on AVX-512 BF16: odd D packs K element by element, Dv not a multiple of 16 pads V's pairs."""
    for d, dv in [(33, 20), (72, 40), (5, 129)]:
        pattern = sa.SlidingWindow(50, sinks=4)
        q, k, v = make_qkv_for(pattern, 1, 6, 2, 3, 123, d, dv, dtype=dtype)
        out, _ = _mod().decode_forward(q, k, v, pattern, scale=d ** -0.5)
        assert out.shape == (1, 6, 3, dv)
        check(q, k, v, pattern, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
def test_head_dims_of_the_direct_bf16_path(dtype):
    """bfloat16 on AVX-512 BF16 multiplies straight from the K/V rows when D and Dv are 32, 64, 128
    or 256 (else it packs them): both sides of that rule, one or both dims, 1 to 9 rows per group."""
    for d, dv, g, sq in [(32, 32, 1, 1), (256, 256, 4, 2), (256, 64, 3, 3), (128, 80, 4, 1), (48, 128, 2, 1)]:
        pattern = sa.SlidingWindow(90, sinks=3)
        q, k, v = make_qkv_for(pattern, 1, 2 * g, 2, sq, 157, d, dv, dtype=dtype)
        out, _ = _mod().decode_forward(q, k, v, pattern, scale=d ** -0.5)
        assert out.shape == (1, 2 * g, sq, dv)
        check(q, k, v, pattern, out)


def test_lse_is_the_log_sum_exp():
    pattern = sa.SlidingWindow(30, sinks=2)
    q, k, v = make_qkv_for(pattern, 1, 8, 2, 3, 150, 64)
    out, lse = _mod().decode_forward(q, k, v, pattern, scale=0.2)
    qd, kd = q.double(), k.double().repeat_interleave(4, 1)
    s = (qd @ kd.transpose(-1, -2)) * 0.2
    mask = oracle.visibility_mask(qd, k.double(), pattern)
    ref = torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1)
    assert torch.allclose(lse.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["dense", "window_sinks", "topk", "blocksparse"])
def test_many_splits(kind, threads):
    """Long enough for several splits per (batch, kv head); results do not depend on the count."""
    b, hq, hkv, sq, sk, d = 1, 4, 1, 2, 3001, 64
    pattern = {"dense": sa.Dense(), "window_sinks": sa.SlidingWindow(1500, sinks=70),
               "topk": sa.TopK(40, block_size=32), "blocksparse": sa.BlockSparse(
                   random_layout(1, 1, sk, 64, 0.3), block_size=64)}[kind]
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dtype=torch.bfloat16)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, _ = _mod().decode_forward(q, k, v, pattern, scale=d ** -0.5)
    finally:
        torch.set_num_threads(n)
    check(q, k, v, pattern, out)


def test_kv_cache_views_and_scale():
    """K/V as slices of a longer cache (any batch / head / sequence strides), q transposed."""
    b, hq, hkv, sq, sk, d = 2, 8, 2, 3, 77, 80
    cache_k = torch.randn(b, hkv, 128, d)
    cache_v = torch.randn(b, 128, hkv, d).transpose(1, 2)  # (B, S, H, D) cache layout
    k, v = cache_k[:, :, :sk], cache_v[:, :, :sk]
    q = torch.randn(b, sq, hq, d).transpose(1, 2)
    for pattern in (sa.Dense(), sa.SlidingWindow(9, sinks=2), sa.TopK(1, block_size=16)):
        out, _ = _mod().decode_forward(q, k, v, pattern, scale=0.3)
        check(q, k, v, pattern, out, scale=0.3)
    kt = torch.randn(b, hkv, d, sk).transpose(-1, -2)  # head dim not contiguous: copied
    out, _ = _mod().decode_forward(q, kt, v, sa.Dense(), scale=0.3)
    check(q, kt, v, sa.Dense(), out, scale=0.3)


@pytest.mark.parametrize("kind", ["dense", "window_sinks", "blocksparse", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
def test_decode_equals_prefill_row(kind, dtype):
    """Token t decoded alone (and in a chunk of 3 ending at t) equals row t of the prefill."""
    s, b, hq, hkv, d = 75, 2, 8, 2, 64
    pattern = pattern_of(kind, b=b, hkv=hkv, sk=s)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, s, s, d, dtype=dtype)
    prefill = sa.attention(q, k, v, pattern)
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    for t in [2, 15, 16, 17, 40, 74]:
        pat_t = pattern
        if isinstance(pattern, sa.BlockSparse):
            n = -(-(t + 1) // BS)
            pat_t = sa.BlockSparse(pattern.layout[:, :, :n, :n], block_size=BS)
        for lo in (t, max(t - 2, 1)):  # lo = 0 would be a prefill (Sq == Sk)
            qs, ks, vs = q[:, :, lo:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]
            p = sa.plan(qs, ks, vs, pat_t, backend="cpu")  # tiny lengths: SDPA may be cheaper overall
            assert p.kernel.name == KERNEL, p.explain()
            step = p.run(qs, ks, vs)
            oracle.assert_close_contract(step, ref[:, :, lo:t + 1], dtype=dtype, device="cpu",
                                         what=f"rows {lo}..{t} vs float64")
            if dtype == torch.float32:
                oracle.assert_close_contract(step, prefill[:, :, lo:t + 1], dtype=dtype, device="cpu",
                                             what=f"rows {lo}..{t} vs prefill")


def test_blocksparse_rows_without_keys_are_zero():
    b, hq, hkv, sq, sk, d = 2, 4, 2, 3, 50, 64  # rows at positions 47, 48, 49: query blocks 2 and 3
    lay = torch.rand(b, hkv, 4, 4) < 0.7
    lay[0, 1, 3] = False  # (b=0, kv head 1): rows 48, 49 see nothing
    lay[1, :, 2] = False  # (b=1): row 47 sees nothing
    lay[1, :, 3, 0] = True
    pattern = sa.BlockSparse(lay, block_size=BS)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d)
    out, lse = _mod().decode_forward(q, k, v, pattern, scale=d ** -0.5)
    check(q, k, v, pattern, out)
    assert (out[0, 2:4, 1:] == 0).all() and torch.isinf(lse[0, 2:4, 1:]).all()
    assert (out[1, :, 0] == 0).all() and (lse[1, :, 0] == math.inf).all()
    assert torch.isfinite(lse[1, :, 1:]).all() and (out[1, :, 1:] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=SHORT.get)
def test_pooled_keys_and_selection(dtype):
    """The extension's pooled keys are the block means; the selection built on them is the contract's."""
    from sparse_attn.layout.topk_selection import topk_token_index
    k = randn(2, 3, 101, 80, dtype=dtype)[:, :, :99]  # strided rows, last block partial
    kbar = _mod()._ext().pool_keys(k, 16)
    ref = torch.stack([k[:, :, i:i + 16].double().mean(2) for i in range(0, 99, 16)], 2)
    assert kbar.dtype == torch.float32 and kbar.shape == ref.shape
    assert torch.allclose(kbar.double(), ref, rtol=0, atol=1e-6)
    pattern = sa.TopK(3, block_size=16)
    q, k, _ = make_qkv_for(pattern, 2, 6, 3, 4, 99, 80, dtype=dtype)
    sel = _mod().decode_prepare(q, k, pattern)
    assert torch.equal(sel, topk_token_index(q, k, pattern))
    mask = torch.zeros(2, 3, 4, 7, dtype=torch.bool)
    mask.scatter_(-1, sel.clamp(min=0).long(), sel >= 0)
    forced = pattern.forced_block_mask(torch.arange(95, 99) // 16, torch.arange(7))
    assert torch.equal(mask | forced, oracle.oracle_select_blocks(q, k, pattern))


def test_empty_and_keyless_inputs():
    dec = _mod().decode_forward
    q, k, v = randn(0, 4, 1, 16), randn(0, 2, 9, 16), randn(0, 2, 9, 16)
    out, lse = dec(q, k, v, sa.Dense(), scale=0.25)
    assert out.shape == (0, 4, 1, 16) and lse.shape == (0, 4, 1)
    q, k, v = randn(1, 4, 2, 16), randn(1, 2, 0, 16), randn(1, 2, 0, 16)
    out, lse = dec(q, k, v, sa.Dense(causal=False), scale=0.25)
    assert (out == 0).all() and torch.isinf(lse).all()


def test_too_many_rows_raises():
    q, k, v = randn(1, 2, 17, 16), randn(1, 1, 40, 16), randn(1, 1, 40, 16)
    with pytest.raises(ValueError, match="q has 17 query rows"):
        _mod().decode_forward(q, k, v, sa.Dense(), scale=0.25)


# ------------------------------------------------------------------------------------ scheduler
@pytest.mark.parametrize("pattern", [sa.Dense(), sa.SlidingWindow(1024), sa.TopK(16, block_size=64)],
                         ids=["dense", "window1024", "topk16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
def test_scheduler_picks_it_for_cpu_decode(pattern, dtype):
    b, hq, hkv, sk, d = 1, 8, 2, 4099, 128
    q, k, v = randn(b, hq, 1, d, dtype=dtype), randn(b, hkv, sk, d, dtype=dtype), randn(b, hkv, sk, d, dtype=dtype)
    p = sa.plan(q, k, v, pattern)
    assert p.problem.phase == "decode"
    assert p.kernel.name == KERNEL, p.explain()
    out = p.run(q, k, v)
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    oracle.assert_close_contract(out, ref, dtype=dtype, device="cpu")


def test_scheduler_refuses_long_chunks_and_training():
    q, k, v = randn(1, 4, 17, 32), randn(1, 2, 100, 32), randn(1, 2, 100, 32)
    p = sa.plan(q, k, v, sa.Dense())
    dec = next(c for c in p.candidates if c.kernel.name == KERNEL)
    assert any("Sq = 17" in r and "> 16" in r for r in dec.reasons), p.explain()
    assert "Sq = 17" in p.explain()
    q1 = randn(1, 4, 1, 32, requires_grad=True)
    p = sa.plan(q1, k, v, sa.Dense())
    dec = next(c for c in p.candidates if c.kernel.name == KERNEL)
    assert any("no backward" in r for r in dec.reasons) and p.kernel.name != KERNEL
    q, k, v = randn(1, 4, 10, 32), randn(1, 2, 10, 32), randn(1, 2, 10, 32)  # Sq == Sk: prefill
    dec = next(c for c in sa.plan(q, k, v, sa.Dense()).candidates if c.kernel.name == KERNEL)
    assert any("phase prefill" in r for r in dec.reasons)
