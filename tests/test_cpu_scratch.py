"""The CPU forward keeps each thread's scratch between calls (csrc/cpu/block_sparse_fwd.cpp,
`thread_scratch`): safe only if no call reads a scratch word it did not write first. Here every
kept buffer is filled with NaN before each use (`set_scratch_poison`) and the outputs must keep
their bits: any read of a stale word (a K column past a short block's keys, a V row past them, a
probability past the row's width, O or the row state before its reset) would turn a row NaN or
change it."""
from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from conftest import needs_jit
from sparse_attn.backends.cpu import kernels as K

pytestmark = needs_jit

CASES = [  # (pattern, t, s, hq, hkv, d, softcap)
    (sa.Dense(), 77, 77, 4, 2, 64, None),
    (sa.Dense(), 20, 90, 4, 2, 64, None),
    (sa.Dense(), 130, 130, 3, 3, 80, None),  # D a multiple of no tile
    (sa.SlidingWindow(40, sinks=3), 150, 150, 4, 1, 32, None),
    (sa.Dense(), 50, 50, 2, 2, 48, 5.0),
    (sa.TopK(2, block_size=16), 100, 100, 4, 2, 64, None),
    (sa.TopK(3, block_size=32), 30, 140, 8, 2, 40, None),
]


@pytest.fixture
def poison():
    ext = K._ext()
    yield ext.set_scratch_poison
    ext.set_scratch_poison(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=["dense", "sq_lt_sk", "mha_d80", "window", "softcap", "topk", "topk_gqa4"])
def test_stale_scratch_is_never_read(case, dtype, poison):
    pattern, t, s, hq, hkv, d, softcap = case
    g = torch.Generator().manual_seed(t + s)
    q = torch.randn(1, hq, t, d, generator=g).to(dtype)
    k = torch.randn(1, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(1, hkv, s, d, generator=g).to(dtype)
    with torch.inference_mode():
        p = sa.plan(q, k, v, pattern, softcap=softcap, backend="cpu")
        assert p.kernel.name == "cpu.block_sparse"
        clean = p.run(q, k, v)[0]
        poison(True)
        dirty = p.run(q, k, v)[0]
        poison(False)
    assert not clean.isnan().any()
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_stale_scratch_is_never_read_varlen(dtype, poison):
    """Packed sequences (`run_varlen` keeps the same per-thread scratch, sized by q_block): one
    shorter than a tile, one over two tiles with more keys than queries, one single query."""
    lens_q, lens_k = [37, 150, 1], [37, 300, 64]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), 2, 64, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), 2, 64, generator=g).to(dtype)
    with torch.inference_mode():
        clean = sa.attention_varlen(q, k, v, cu_q, cu_k, sa.Dense(), backend="cpu")
        poison(True)
        dirty = sa.attention_varlen(q, k, v, cu_q, cu_k, sa.Dense(), backend="cpu")
        poison(False)
    assert not clean.isnan().any()
    assert torch.equal(clean, dirty)
