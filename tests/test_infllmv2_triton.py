"""InfLLMv2 on the Triton backend (sparse_attn/backends/triton/infllmv2_select.py, the block-sparse
Triton attention, the Triton split-KV decode over a cache).

Runs on TRITON_DEVICE: "cuda" with a GPU, else CPU tensors in Triton's interpreter (small sizes).
The selection equals the PyTorch one index for index (and the float64 oracle's blocks) on
well-separated draws; attention and gradients meet the contract's bounds against the float64
oracle; both variants, both normalisers, odd lengths, Sq < Sk, GQA 1..16, both sides of
`dense_len`; decode steps over contiguous and paged caches equal the prefill's rows.
"""
import pytest
import torch

import infllmv2_oracle as O
import oracle
import sparse_attn as sa
from conftest import TRITON_DEVICE as DEV
from sparse_attn.layout.infllmv2_selection import infllmv2_picks_over_cache, infllmv2_token_index
from test_infllmv2 import CONFIGS, SHAPES, check_selection, draw, full_selection

triton = pytest.importorskip("triton")
from sparse_attn.backends.triton.infllmv2_select import (  # noqa: E402
    infllmv2_picks_over_cache_triton, infllmv2_token_index_triton)

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)


#: two float32 kernel results compared with each other: the interpreter computes in IEEE float32,
#: a GPU's products are TF32 (contract: 1e-3 for float32 on GPU)
TOL = 2e-5 if DEV == "cpu" else 2e-3


def dev(*xs):
    return [x.to(DEV) for x in xs]


# ------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("i, name", list(enumerate(CONFIGS)), ids=list(CONFIGS))
def test_selection_equals_pytorch_and_oracle(i, name):
    check_selection(infllmv2_token_index_triton, i, name, device=DEV)


@pytest.mark.parametrize("hq, hkv", [(1, 1), (4, 2), (8, 2), (8, 1), (16, 1)], ids=lambda x: str(x))
def test_selection_gqa_ratios_and_bfloat16(hq, hkv):
    """GQA 1..16, bfloat16 queries read as they sit (converted in registers); several chunks of
    blocks per row (the carried kernel between chunks), the models' block / kernel sizes."""
    pattern = sa.InfLLMv2(topk=7, local_blocks=2, dense_len=-1)
    q, k = torch.randn(1, hq, 70, 64), torch.randn(1, hkv, 1201, 64)
    qb, kb = q.bfloat16(), k.bfloat16()
    got = infllmv2_token_index_triton(*dev(qb, kb), pattern).cpu()
    ref = infllmv2_token_index(qb.float(), kb.float(), pattern)
    # random draws (no margin check): float32 summation order may flip a near tie, rarely
    assert (got != ref).any(-1).float().mean() <= 0.02
    assert ((got >= 0).sum(-1) == pattern.extra_blocks(torch.arange(1131, 1201) // 64)).all()


def test_rows_without_visible_kernels_and_nan_inputs():
    """Early rows see no (coarse) kernel: every score is 0 and ties go to the lower blocks; a NaN
    key or query ranks its blocks first, as the PyTorch selection does."""
    pattern = sa.InfLLMv2(topk=4, block_size=8, kernel_size=32, kernel_stride=8, init_blocks=0, local_blocks=1,
                          dense_len=-1)
    q, k = torch.randn(2, 4, 60, 16), torch.randn(2, 2, 60, 16)
    got = infllmv2_token_index_triton(*dev(q, k), pattern).cpu()
    assert torch.equal(got, infllmv2_token_index(q, k, pattern))
    assert torch.equal(full_selection(got, pattern, 60, 60).expand(2, 2, -1, -1), O.select_blocks(q, k, pattern))
    k[1, 0, 21] = float("nan")
    q[0, 3, 50] = float("nan")
    assert torch.equal(infllmv2_token_index_triton(*dev(q, k), pattern).cpu(), infllmv2_token_index(q, k, pattern))


# ------------------------------------------------------------------------------------ attention
def _triton_plan(q, k, v, pattern):
    """The plan with backend="triton": a sparse call runs triton.block_sparse (InfLLMv2's selection
    in Triton, then its TopK view)."""
    plan = sa.plan(q, k, v, pattern, backend="triton")
    if isinstance(plan.problem.pattern, sa.InfLLMv2):
        assert plan.kernel.name == "triton.block_sparse", plan.explain()
    return plan


@pytest.mark.parametrize("name, shape", [("41-coarse", SHAPES[1]), ("4-exact", SHAPES[2]),
                                         ("4-coarse-ks12", (1, 4, 2, 33, 117))], ids=["41", "4-gqa16", "4-ks12"])
def test_attention_and_gradients_equal_oracle(name, shape):
    pattern = CONFIGS[name]
    q, k, v = draw(pattern, shape, 64, min_margin=1e-5)
    qd, kd, vd = (x.to(DEV).requires_grad_() for x in (q, k, v))
    assert "InfLLMv2" in _triton_plan(qd, kd, vd, pattern).explain()
    out = sa.attention(qd, kd, vd, pattern, backend="triton")
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = O.attention(q64, k64, v64, pattern)
    oracle.assert_close_contract(out.detach().cpu(), ref.detach(), dtype=torch.float32, device=DEV)
    dout = torch.randn_like(ref, dtype=torch.float32)
    grads = torch.autograd.grad(out, (qd, kd, vd), dout.to(DEV))
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for n, g, r in zip("qkv", grads, refs):
        oracle.assert_close_contract(g.cpu(), r, dtype=torch.float32, device=DEV, what=f"d{n}")


def test_attention_bfloat16():
    pattern = CONFIGS["41-exact"]
    q, k, v = draw(pattern, (1, 8, 2, 16, 157), 128, dtype=torch.bfloat16, min_margin=1e-3)
    out = sa.attention(*dev(q, k, v), pattern, backend="triton").cpu()
    mask = O.visibility_mask(q.double(), k.double(), pattern)
    base = oracle._masked_softmax_attention(q, k, v, mask, 128 ** -0.5)
    oracle.assert_close_contract(out, O.attention(q, k, v, pattern, mask=mask), dtype=q.dtype, device=DEV,
                                 lowp_baseline=base)


@pytest.mark.parametrize("dense_len, sparse", [(134, True), (135, False)])
def test_dense_len_switch(dense_len, sparse):
    pattern = sa.InfLLMv2(topk=3, block_size=16, kernel_size=8, kernel_stride=4, local_blocks=1, dense_len=dense_len)
    q, k, v = draw(pattern, (1, 4, 2, 9, 134), 32, min_margin=1e-5)
    plan = _triton_plan(*dev(q, k, v), pattern)
    assert isinstance(plan.problem.pattern, sa.InfLLMv2) == sparse
    out = sa.attention(*dev(q, k, v), pattern, backend="triton").cpu()
    oracle.assert_close_contract(out, O.attention(q, k, v, pattern), dtype=q.dtype, device=DEV)


# ------------------------------------------------------------------------------------ decode
def _cache(kind, b, hkv, d, max_len):
    if kind == "paged":
        return sa.PagedKVCache(b, hkv, d, num_pages=b * (-(-max_len // 16)), page_size=16, max_len=max_len,
                               device=DEV)
    return sa.KVCache(b, hkv, d, max_len, device=DEV)


@pytest.mark.parametrize("kind, name", [("contiguous", "41-coarse"), ("paged", "4-exact")])
def test_decode_over_cache_equals_prefill_rows(kind, name):
    """Steps (Sq = 1) and a chunk of 3 rows over a ragged batch: the picks equal the PyTorch ones
    over the same window sums, the outputs the Triton prefill's rows (float64 oracle at the end)."""
    pattern = CONFIGS[name]
    b, hq, hkv, s, d = 2, 4, 2, 99, 32
    q, k, v = draw(pattern, (b, hq, hkv, s, s), d, min_margin=1e-5)
    full = sa.attention(*dev(q, k, v), pattern, backend="triton").cpu()
    cur = [57, 46]  # ragged: each sequence's rows end-aligned to its own length
    cache = _cache(kind, b, hkv, d, 112)
    cache.append(*dev(k[:, :, :57], v[:, :, :57]), num_new=cur)
    for rows, gap in [(3, 0), (1, 12), (1, 12), (1, 12)]:
        n = [c + gap + rows for c in cur]
        kk = torch.stack([k[i, :, cur[i]:n[i]] for i in range(b)])
        vv = torch.stack([v[i, :, cur[i]:n[i]] for i in range(b)])
        cache.append(*dev(kk, vv))
        assert list(cache.host_lengths) == n
        cur = n
        qq = torch.stack([q[i, :, n[i] - rows:n[i]] for i in range(b)]).to(DEV)
        view = cache.kv_view()
        picks = infllmv2_picks_over_cache_triton(qq, view, pattern)
        assert torch.equal(picks, infllmv2_picks_over_cache(qq, view, pattern))
        plan = sa.plan_with_cache(qq, cache, pattern, backend="triton")
        assert plan.kernel.name == "triton.splitkv_decode", plan.explain()
        out = sa.attention_with_cache(qq, cache, pattern, backend="triton").cpu()
        for i in range(b):
            torch.testing.assert_close(out[i], full[i, :, n[i] - rows:n[i]], rtol=TOL, atol=TOL)
    ref = O.attention(q[1:, :, n[1] - 1:n[1]], k[1:, :, :n[1]], v[1:, :, :n[1]], pattern)
    oracle.assert_close_contract(out[1:], ref, dtype=q.dtype, device=DEV)


def test_decode_below_dense_len_is_dense():
    """The switch follows the longest sequence: below dense_len the plan is Dense."""
    pattern = sa.InfLLMv2(topk=3, block_size=16, kernel_size=8, kernel_stride=4, local_blocks=1, dense_len=200)
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 150, 32), torch.randn(1, 2, 150, 32)
    cache = _cache("contiguous", 1, 2, 32, 160)
    cache.append(*dev(k, v))
    plan = sa.plan_with_cache(q.to(DEV), cache, pattern, backend="triton")
    assert isinstance(plan.problem.pattern, sa.Dense)
    out = sa.attention_with_cache(q.to(DEV), cache, pattern, backend="triton").cpu()
    oracle.assert_close_contract(out, O.attention(q, k, v, pattern), dtype=q.dtype, device=DEV)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_decode_over_a_quantized_paged_cache(kv_dtype):
    """The window sums of a quantized cache are of the dequantized keys; the Triton decode equals the
    reference's PyTorch loop over the same cache (the contract's attention over dequantized rows)."""
    pattern = CONFIGS["41-coarse"]
    cache = sa.PagedKVCache(2, 2, 32, num_pages=20, page_size=16, max_len=150, kv_dtype=kv_dtype, device=DEV)
    cache.append(torch.randn(2, 2, 130, 32, device=DEV), torch.randn(2, 2, 130, 32, device=DEV), num_new=[130, 101])
    q = torch.randn(2, 8, 2, 32, device=DEV)
    assert sa.plan_with_cache(q, cache, pattern, backend="triton").kernel.name == "triton.splitkv_decode"
    out = sa.attention_with_cache(q, cache, pattern, backend="triton")
    torch.testing.assert_close(out, sa.attention_with_cache(q, cache, pattern, backend="reference"),
                               rtol=TOL, atol=TOL)
