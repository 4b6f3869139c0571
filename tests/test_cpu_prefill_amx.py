"""The bfloat16 forward of cpu.block_sparse on AMX tiles (csrc/cpu/gemm_amx.h) and on the
vdpbf16ps products it replaces, each against the float64 evaluation of the contract: GQA 1-8,
Sq < Sk, lengths that are not multiples of any block or tile (a 16-row group's tail, a block's
last keys), head dims 32 / 64 / 80 (a 16-word chunk's tail) / 128 with Dv != D, Dense /
SlidingWindow with sinks / TopK (its per-token rows go through the tiles' row copy) /
BlockSparse, soft-capping and sink logits, packed varlen, a NaN in V. The run-time switch
(`set_amx` on the "cpu" extension, SPARSE_ATTN_CPU_AMX=0) and the scheduler's note are checked too.
On a CPU without AMX the "amx" cases are skipped and the vector path is still checked.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import (amx_or_vector, amx_test_pattern, assert_amx_built_follows_the_cpu, assert_amx_env_switch,
                      cpu_forward_ext, make_qkv_for, needs_jit, with_tiles_and_without)

pytestmark = needs_jit


@pytest.fixture(params=["amx", "vector"])
def products(request):
    """Run the case with the tiles on ("amx") or off ("vector"); the switch is restored after."""
    yield from amx_or_vector(cpu_forward_ext(), request.param)


CASES = [  # B, Hq, Hkv, Sq, Sk, D, Dv
    (1, 4, 2, 300, 300, 64, 64),    # the tiny served model's heads, square causal, 300 = no block multiple
    (2, 8, 2, 77, 1000, 128, 128),  # GQA 4, Sq < Sk, 77 rows: 32-row groups and a tail
    (1, 6, 3, 129, 513, 80, 80),    # D 80: 40 words, a 16-word chunk's tail of 8
    (1, 8, 1, 50, 200, 64, 32),     # GQA 8, Dv 32 < D (one column tile pair)
    (1, 2, 2, 33, 97, 32, 48),      # MHA, D 32 (one chunk), Dv 48 (a pair and a single column tile)
]


def _check(out, q, k, v, pattern, **opts):
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, backend="reference", **opts)
    base = oracle.masked_attention_in_dtype(q, k, v, pattern, **opts)
    oracle.assert_close_contract(out, ref, dtype=torch.bfloat16, device="cpu", lowp_baseline=base)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kind", ["dense", "window", "topk", "blocksparse"])
def test_against_float64(products, case, kind):
    b, hq, hkv, sq, sk, d, dv = case
    pattern = amx_test_pattern(kind, b, hkv, sk, window=100)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dv, dtype=torch.bfloat16)
    out = sa.attention(q, k, v, pattern, backend="cpu")
    _check(out, q, k, v, pattern)


@pytest.mark.parametrize("hq,hkv,sq,sk", [(4, 2, 1000, 1000), (4, 4, 517, 517), (8, 2, 301, 1090), (2, 1, 64, 640),
                                         (4, 2, 50, 50), (4, 2, 20, 90)],
                         ids=lambda x: str(x))
def test_causal_diagonal_blocks(products, hq, hkv, sq, sk):
    """A causal diagonal block on the tiles runs 32 rows at a time over the keys each group's
    last row sees (rounded up to 32): groups of GQA 1 / 2 / 4 positions, tiles of 64 and 128
    positions, query tiles that start inside a key block (Sq < Sk) and a last block of few keys
    (a whole sequence shorter than one block, 50 and 90 keys: the short block on the tiles)."""
    q, k, v = make_qkv_for(sa.Dense(), 1, hq, hkv, sq, sk, 64, dtype=torch.bfloat16)
    _check(sa.attention(q, k, v, sa.Dense(), backend="cpu"), q, k, v, sa.Dense())


def test_softcap_and_sinks(products):
    q, k, v = make_qkv_for(sa.Dense(), 1, 4, 2, 150, 410, 64, dtype=torch.bfloat16)
    opts = dict(softcap=7.5, sink_logits=torch.randn(4))
    _check(sa.attention(q, k, v, sa.Dense(), backend="cpu", **opts), q, k, v, sa.Dense(), **opts)


def test_varlen(products):
    lens_q, lens_k = [37, 130, 1], [37, 300, 64]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 64).bfloat16()
    k = torch.randn(sum(lens_k), 2, 64).bfloat16()
    v = torch.randn(sum(lens_k), 2, 64).bfloat16()
    out = sa.attention_varlen(q, k, v, cu_q, cu_k, sa.Dense(), backend="cpu")
    for i in range(3):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        q1, k1, v1 = (x.transpose(0, 1)[None] for x in (q[qs], k[ks], v[ks]))
        _check(out[qs].transpose(0, 1)[None], q1, k1, v1, sa.Dense())


def test_nonfinite_value_row(products):
    """A NaN in a visible V element: that output column is NaN where the key is seen (every query
    here), the other columns and the other kv head's rows finite and right (the tiles multiply the
    zero probabilities of a block's padding too)."""
    q, k, v = make_qkv_for(sa.Dense(), 1, 4, 2, 100, 300, 64, dtype=torch.bfloat16)
    v[0, 1, 123, 5] = float("nan")
    out = sa.attention(q, k, v, sa.Dense(), backend="cpu")
    assert torch.isnan(out[0, 2:, :, 5]).all()  # queries at 200 .. 299 all see key 123
    assert torch.isfinite(out[0, 2:, :, :5]).all() and torch.isfinite(out[0, 2:, :, 6:]).all()
    _check(out[:, :2], q[:, :2], k[:, :1], v[:, :1], sa.Dense())


def test_tiles_and_vectors_agree_closely():
    """Both products over the same inputs: another order of float32 sums, not another result."""
    q, k, v = (torch.randn(1, h, n, 64).bfloat16() for h, n in ((4, 500), (2, 1500), (2, 1500)))
    outs = with_tiles_and_without(cpu_forward_ext(), lambda: sa.attention(q, k, v, sa.Dense(), backend="cpu"))
    assert not torch.equal(outs[0], outs[1])  # two different product paths really ran
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=0, atol=2 ** -6)


def test_amx_built_follows_the_cpu():
    """The forward's extension ("cpu"): tiles built exactly where the CPU has them, the switch works."""
    assert_amx_built_follows_the_cpu(cpu_forward_ext())


def test_environment_switch_starts_off():
    """SPARSE_ATTN_CPU_AMX=0 in a process's environment: the forward's tiles start off there."""
    assert_amx_env_switch("__import__('sparse_attn.backends.cpu.kernels', fromlist=['_ext'])._ext()")


def test_explain_names_the_products(products):
    """The scheduler's note says which products the forward multiplies with (no silent path)."""
    q, k, v = (torch.randn(1, h, 256, 64).bfloat16() for h in (4, 2, 2))
    text = sa.plan(q, k, v, sa.Dense(), backend="cpu").explain()
    assert "chosen: cpu.block_sparse" in text
    if products == "amx":
        assert "AMX tiles in the forward" in text
    else:
        assert "AMX" not in text and "vdpbf16ps" in text
