"""The forward of cpu.block_sparse packs each key block's K / V once per call where the
layout visits it from several query tiles (`Prepacked` in csrc/cpu/block_sparse_fwd.cpp), in waves
of (batch, kv head) pairs under a byte budget (`set_prepack_bytes` on the "cpu" extension; 0: each
task packs its own blocks). TopK's per-token blocks are packed too where its tiles visit enough of them. The three ways --
one wave, one pair per wave, per task -- must give the same bits: bfloat16 on the tiles and on the vector products (pair-packed K and V), float32
(K transposed; V read in place where its rows fill whole vectors, else copied) and float16, for
lengths that end inside a block (the last block's padding), Dv != D (V's padding columns), D 80,
GQA, Sq < Sk, B > 1 and strided K / V; one of them is checked against the float64 evaluation of
the contract.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, amx_or_vector, amx_test_pattern, cpu_forward_ext, make_qkv_for

pytestmark = needs_jit


@pytest.fixture(params=["amx", "vector"])
def products(request):
    """The tiles on ("amx") or off ("vector"); the switch and the packing budget restored after."""
    ext = cpu_forward_ext()
    budget = ext.prepack_bytes()
    try:
        yield from amx_or_vector(ext, request.param)
    finally:
        ext.set_prepack_bytes(budget)


CASES = [  # B, Hq, Hkv, Sq, Sk, D, Dv
    (1, 4, 2, 300, 300, 64, 64),     # square causal, the last block 44 keys
    (2, 8, 2, 260, 1000, 128, 96),   # B 2, GQA 4, Sq < Sk, Dv 96
    (1, 6, 3, 300, 513, 80, 80),     # D 80: 40 words per key
    (1, 2, 2, 200, 333, 32, 40),     # MHA, D 32, Dv 40 (V rows padded to 48 columns)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kind", ["dense", "window", "blocksparse"])
def test_packed_once_same_bits_as_per_task(products, case, kind):
    b, hq, hkv, sq, sk, d, dv = case
    pattern = amx_test_pattern(kind, b, hkv, sk, window=150)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dv, dtype=torch.bfloat16)
    ext = cpu_forward_ext()
    outs = []
    for budget in (256 << 20, 1, 0):  # one wave, one (batch, kv head) pair per wave, per task
        ext.set_prepack_bytes(budget)
        outs.append(sa.attention(q, k, v, pattern, backend="cpu"))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    oracle.assert_close_contract(outs[0], ref, dtype=torch.bfloat16, device="cpu",
                                 lowp_baseline=oracle.masked_attention_in_dtype(q, k, v, pattern))


def _three_ways(q, k, v, pattern):
    ext = cpu_forward_ext()
    budget = ext.prepack_bytes()
    try:
        outs = []
        for b in (256 << 20, 1, 0):
            ext.set_prepack_bytes(b)
            outs.append(sa.attention(q, k, v, pattern, backend="cpu"))
    finally:
        ext.set_prepack_bytes(budget)
    return outs


def _same_bits_three_ways_and_close(kind, case, dtype):
    b, hq, hkv, sq, sk, d, dv = case
    pattern = amx_test_pattern(kind, b, hkv, sk, window=150)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dv, dtype=dtype)
    outs = _three_ways(q, k, v, pattern)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    oracle.assert_close_contract(outs[0], ref, dtype=dtype, device="cpu",
                                 lowp_baseline=oracle.masked_attention_in_dtype(q, k, v, pattern))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kind", ["dense", "blocksparse"])
def test_float32_and_half_packed_once(dtype, case, kind):
    _same_bits_three_ways_and_close(kind, case, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: "x".join(map(str, c)))
def test_topk_packed_once(products, dtype, case):
    """TopK(3) of 32-key blocks: its tiles visit enough blocks to be packed once (at least a
    quarter as many visits as blocks); lengths where a well-separated selection can be drawn."""
    _same_bits_three_ways_and_close("topk", case, dtype)


def test_strided_keys_and_values(products):
    """K / V as views of (B, S, H, D) tensors: packed from their strides, the same bits."""
    q = torch.randn(1, 4, 270, 64).bfloat16()
    k = torch.randn(1, 400, 2, 64).bfloat16().transpose(1, 2)
    v = torch.randn(1, 400, 2, 64).bfloat16().transpose(1, 2)
    ext = cpu_forward_ext()
    outs = []
    for budget in (256 << 20, 0):
        ext.set_prepack_bytes(budget)
        outs.append(sa.attention(q, k, v, sa.Dense(), backend="cpu"))
    assert torch.equal(outs[0], outs[1])
    ref = sa.attention(q.double(), k.double(), v.double(), sa.Dense(), backend="reference")
    oracle.assert_close_contract(outs[0], ref, dtype=torch.bfloat16, device="cpu",
                                 lowp_baseline=oracle.masked_attention_in_dtype(q, k, v, sa.Dense()))


def test_budget_is_checked():
    ext = cpu_forward_ext()
    assert ext.prepack_bytes() >= 0
    with pytest.raises(ValueError, match="bytes"):
        ext.set_prepack_bytes(-1)
