"""`select_blocks(q, k, TopK(...))` returns exactly the contract's per-token selection."""
import math

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import DTYPE_IDS, TRITON_DEVICE, make_qkv_for, needs_jit

PATTERNS = {
    "k1-bs16": sa.TopK(1, block_size=16),
    "k2-bs8-sink0-local2": sa.TopK(2, block_size=8, sink_blocks=0, local_blocks=2),
    "k3-bs5-sink2-local1": sa.TopK(3, block_size=5, sink_blocks=2, local_blocks=1),
    "k0-bs16-sink1-local1": sa.TopK(0, block_size=16),
    "k64-bs16": sa.TopK(64, block_size=16),             # more than there are: dense causal
}
SHAPES = [  # (B, Hq, Hkv, Sq, Sk)
    (1, 1, 1, 71, 71),
    (2, 4, 2, 5, 50),
    (1, 8, 1, 1, 71),
    (2, 4, 4, 37, 37),
    (1, 8, 2, 20, 103),
]


def shape_id(s):
    return "b{}-hq{}-hkv{}-sq{}-sk{}".format(*s)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", PATTERNS)
def test_select_blocks_equals_oracle(name, shape):
    pattern = PATTERNS[name]
    b, hq, hkv, sq, sk = shape
    q, k, _ = make_qkv_for(pattern, b, hq, hkv, sq, sk, 64)
    sel = sa.select_blocks(q, k, pattern)
    assert sel.dtype == torch.bool
    assert sel.shape == (b, hkv, sq, math.ceil(sk / pattern.block_size))
    ref = oracle.oracle_select_blocks(q, k, pattern)
    diff = (sel != ref).nonzero()
    assert diff.numel() == 0, f"{len(diff)} entries differ, first (b, hkv, t, block): {diff[:5].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("d", [80, 128])
def test_select_blocks_other_dtypes(dtype, d):
    pattern = sa.TopK(2, block_size=16, sink_blocks=1, local_blocks=1)
    q, k, _ = make_qkv_for(pattern, 2, 4, 1, 9, 119, d, dtype=dtype)
    assert torch.equal(sa.select_blocks(q, k, pattern), oracle.oracle_select_blocks(q, k, pattern))


def test_select_blocks_decode_is_prefill_row():
    pattern = sa.TopK(2, block_size=8, sink_blocks=1, local_blocks=1)
    q, k, _ = make_qkv_for(pattern, 1, 4, 2, 61, 61, 32)
    full = sa.select_blocks(q, k, pattern)
    for t in [0, 7, 8, 9, 30, 59, 60]:
        step = sa.select_blocks(q[:, :, t:t + 1], k[:, :, :t + 1], pattern)
        nb = math.ceil((t + 1) / 8)
        assert torch.equal(step[:, :, 0], full[:, :, t, :nb]), f"token {t}"
        assert not full[:, :, t, nb:].any(), f"token {t} selected a future block"


def test_select_blocks_short_sequence_is_dense_causal():
    """With no more candidate blocks than topk every earlier block is in: dense causal."""
    pattern = sa.TopK(3, block_size=16)
    q, k, _ = make_qkv_for(pattern, 1, 2, 2, 70, 70, 64)     # 5 blocks: candidates 1..3 at most
    sel = sa.select_blocks(q, k, pattern)
    pb = torch.arange(70) // 16
    expect = torch.arange(5)[None, :] <= pb[:, None]
    assert torch.equal(sel, expect.expand_as(sel))


def test_select_blocks_is_shared_by_the_group_and_needs_no_grad():
    pattern = sa.TopK(1, block_size=4)
    q, k, _ = make_qkv_for(pattern, 1, 4, 1, 30, 30, 16, requires_grad=True)
    sel = sa.select_blocks(q, k, pattern)
    assert not sel.requires_grad
    # swapping the query heads inside the group leaves the group-averaged score unchanged
    assert torch.equal(sa.select_blocks(q.flip(1), k, pattern), sel)


def _tied(nan_query: bool):
    """Every complete key block equal, so every candidate score ties; or one NaN query of a GQA
    group, so every candidate score of that row is NaN (a tie too, as the selection ranks NaN)."""
    gen = torch.Generator().manual_seed(3)
    bs, sk, sq = 4, 43, 30
    block = torch.randint(-3, 4, (1, 2, bs, 16), generator=gen).float()  # small integers: exact sums
    k = block.repeat(1, 1, -(-sk // bs), 1)[:, :, :sk].contiguous()
    q = torch.randint(-3, 4, (1, 4, sq, 16), generator=gen).float()
    if nan_query:
        k = torch.randn(1, 2, sk, 16, generator=gen)
        q[0, 2, 25, 7] = float("nan")                      # kv head 1, row 25: all its scores NaN
    return q, k, sa.TopK(2, block_size=bs, sink_blocks=1, local_blocks=1)


@pytest.mark.parametrize("nan_query", [False, True], ids=["equal-blocks", "nan-query"])
@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=needs_jit), "triton", "oracle"])
def test_tied_scores_select_the_lower_blocks(impl, nan_query):
    """Equal block scores go to the lower block (the contract's InfLLMv2 rule; TopK's is left open by
    the contract), in every selection: torch.topk orders ties freely, so the PyTorch selection
    sorts stably, and the CPU and Triton kernels pick the lower block by construction."""
    from sparse_attn.layout.block_layout import index_to_bool
    from sparse_attn.layout.topk_selection import topk_token_index
    q, k, pattern = _tied(nan_query)
    nb = -(-k.shape[2] // pattern.block_size)
    pos = torch.arange(k.shape[2] - q.shape[2], k.shape[2])
    forced = pattern.forced_block_mask(pos // pattern.block_size, torch.arange(nb))
    if impl == "oracle":
        got = oracle.oracle_select_blocks(q, k, pattern)
    elif impl == "reference":
        got = index_to_bool(topk_token_index(q, k, pattern), nb) | forced
    elif impl == "cpu":
        from sparse_attn.backends.cpu.kernels import topk_select
        got = index_to_bool(topk_select(q, k, pattern), nb) | forced
    else:
        from sparse_attn.backends.triton.topk_select import topk_token_index_triton
        got = index_to_bool(topk_token_index_triton(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), pattern).cpu(),
                            nb) | forced
    rows = [(1, 25)] if nan_query else [(h, t) for h in range(2) for t in range(q.shape[2])]
    for h, t in rows:
        pb = int(pos[t]) // pattern.block_size
        cand = list(range(pattern.sink_blocks, pb - pattern.local_blocks + 1))
        want = forced[t].clone()
        want[cand[:pattern.topk]] = True                     # the lowest candidates
        assert torch.equal(got[0, h, t], want), (impl, h, t, got[0, h, t].nonzero().flatten().tolist())
