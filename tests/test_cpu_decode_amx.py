"""bfloat16 decode on AMX tiles (csrc/cpu/decode_amx.h) and the vdpbf16ps products it replaces
(decode_bf16.h), each against the float64 evaluation of the contract: GQA, Sq > 1, more than 16
query rows per kv head (two tile passes), head dims 32-256 with Dv != D, lengths that are not
multiples of 16 keys, Dense / SlidingWindow with sinks / TopK / BlockSparse, contiguous and paged
(pages in shuffled order: 16-key groups inside a page are one strided tile load, a window's start
is not). Paged equals contiguous bit for bit on either path. The run-time switch (`set_amx`,
SPARSE_ATTN_CPU_AMX=0) and the build rule (tiles exactly where the CPU has them) are checked too.
On a CPU without AMX the "amx" cases are skipped and the vector path is still checked.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import (amx_or_vector, amx_test_pattern, assert_amx_built_follows_the_cpu, assert_amx_env_switch,
                      make_qkv_for, needs_jit, shuffled_pages, with_tiles_and_without)

pytestmark = needs_jit


def _mod():
    from sparse_attn.backends.cpu import decode
    return decode


@pytest.fixture(params=["amx", "vector"])
def products(request):
    """Run the case with the tiles on ("amx", every shape: one query row per kv head up) or off
    ("vector"); the switch and the threshold are restored after."""
    ext = _mod()._ext()
    before = ext.amx_min_rows()
    if request.param == "amx" and ext.amx_built:
        ext.set_amx_min_rows(1)
    try:
        yield from amx_or_vector(ext, request.param)
    finally:
        if ext.amx_built:
            ext.set_amx_min_rows(before)


CASES = [  # B, Hq, Hkv, Sq, Sk, D, Dv
    (2, 8, 2, 1, 1531, 128, 128),   # GQA 4, one token: the real-model shape
    (1, 4, 1, 3, 700, 64, 32),      # Sq 3, Dv 32 (one 32-column chunk)
    (2, 20, 1, 1, 333, 32, 64),     # 20 rows per kv head: passes of 16 and 4 rows
    (1, 4, 2, 2, 1050, 256, 256),   # D 256: the q chunks reloaded per key group
    (1, 2, 2, 1, 17, 64, 64),       # one 16-key group and a tail
    (1, 8, 8, 1, 2049, 64, 128),    # MHA, Dv != D, runs of segments on a contiguous cache
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kind", ["dense", "window", "topk", "blocksparse"])
def test_against_float64(products, case, kind):
    b, hq, hkv, sq, sk, d, dv = case
    pattern = amx_test_pattern(kind, b, hkv, sk, window=300)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dv, dtype=torch.bfloat16)
    scale = d ** -0.5
    out, _ = _mod().decode_forward(q, k, v, pattern, scale=scale)  # TopK: the contract's selection
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, scale=scale, backend="reference")
    base = oracle.masked_attention_in_dtype(q, k, v, pattern, scale=scale)
    oracle.assert_close_contract(out, ref, dtype=torch.bfloat16, device="cpu", lowp_baseline=base)
    if kind in ("dense", "window"):  # the same keys as shuffled pages of 64: the same bits
        kp, vp, table = shuffled_pages(k, v, 64)
        lens = torch.full((b,), sk, dtype=torch.int32)
        paged, _ = _mod()._decode_fwd(q, kp, vp, pattern, scale=scale, token_index=None, lengths=lens,
                                      page_table=table, page_size=64)
        assert torch.equal(paged, out)


def test_tiles_and_vectors_agree_closely():
    """Both products over the same inputs: another order of float32 sums, not another result."""
    q, k, v = (torch.randn(1, h, n, 128).bfloat16() for h, n in ((32, 1), (8, 4096), (8, 4096)))
    outs = with_tiles_and_without(_mod()._ext(), lambda: _mod().decode_forward(q, k, v, sa.Dense(), scale=128 ** -0.5))
    (o1, l1), (o2, l2) = outs
    assert not (torch.equal(l1, l2) and torch.equal(o1, o2))  # two different product paths really ran
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-4)
    torch.testing.assert_close(o1.float(), o2.float(), rtol=0, atol=2 ** -7)


def test_tiles_from_four_rows_per_kv_head():
    """By default the tiles serve 4 or more query rows per (batch, kv head) only (fewer measured
    slower than vdpbf16ps): two rows get the vector products' exact bits and explain() says why;
    `set_amx_min_rows` moves the threshold and refuses less than one row."""
    ext = _mod()._ext()
    if not (ext.bf16_dot and ext.amx_built):
        pytest.skip("needs both the vdpbf16ps products and AMX tiles")
    assert ext.amx_min_rows() == 4
    with pytest.raises(ValueError, match="rows"):
        ext.set_amx_min_rows(0)
    # D 128 (at D 64 the two products happened to sum in the same order: the same bits)
    q2, k, v = make_qkv_for(sa.Dense(), 1, 4, 2, 1, 777, 128, dtype=torch.bfloat16)  # 2 rows per kv head
    q4 = torch.randn(1, 8, 1, 128).bfloat16()  # 4 rows
    run2 = lambda: _mod().decode_forward(q2, k, v, sa.Dense(), scale=0.09)  # (out, lse)
    run4 = lambda: _mod().decode_forward(q4, k, v, sa.Dense(), scale=0.09)
    same = lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    auto2, vec2 = with_tiles_and_without(ext, run2)
    assert same(auto2, vec2)
    auto4, vec4 = with_tiles_and_without(ext, run4)
    assert not same(auto4, vec4)
    note = sa.plan(q2, k, v, sa.Dense(), backend="cpu").explain()
    if ext.amx_enabled():
        assert "AMX tiles from 4 query rows per kv head; this call has 2" in note
        assert "AMX tiles (csrc/cpu/decode_amx.h" in sa.plan(q4, k, v, sa.Dense(), backend="cpu").explain()
    try:
        ext.set_amx_min_rows(1)
        tiles2, _ = with_tiles_and_without(ext, run2)
        assert not same(tiles2, vec2)
        ref = sa.attention(q2.double(), k.double(), v.double(), sa.Dense(), scale=0.09, backend="reference")
        oracle.assert_close_contract(tiles2[0], ref, dtype=torch.bfloat16, device="cpu",
                                     lowp_baseline=oracle.masked_attention_in_dtype(q2, k, v, sa.Dense(), scale=0.09))
    finally:
        ext.set_amx_min_rows(4)


def test_nonfinite_value_row(products):
    """A NaN in a visible V row: the rows that see it are NaN, the other kv head's rows finite and
    right (the tiles multiply P's zero halves with V too, as vdpbf16ps multiplies p = 0)."""
    q, k, v = make_qkv_for(sa.Dense(), 1, 8, 2, 1, 300, 64, dtype=torch.bfloat16)
    v[0, 1, 123, 5] = float("nan")
    out, _ = _mod().decode_forward(q, k, v, sa.Dense(), scale=0.125)
    assert torch.isnan(out[0, 4:]).all(dim=-1).all()
    ref = sa.attention(q.double(), k.double(), v.double(), sa.Dense(), scale=0.125, backend="reference")
    oracle.assert_close_contract(out[:, :4], ref[:, :4], dtype=torch.bfloat16, device="cpu",
                                 lowp_baseline=oracle.masked_attention_in_dtype(q, k, v, sa.Dense(), scale=0.125)[:, :4])


def test_amx_built_follows_the_cpu():
    """The decode extension's tiles: built exactly where the CPU has them, the switch works."""
    assert_amx_built_follows_the_cpu(_mod()._ext())


def test_environment_switch_starts_off():
    """SPARSE_ATTN_CPU_AMX=0 in a process's environment: the tiles start off there."""
    assert_amx_env_switch("__import__('sparse_attn.backends.cpu.decode', fromlist=['_ext'])._ext()")


def test_explain_names_the_products(products):
    """The scheduler's note says which products cpu.decode multiplies with (no silent path), from
    the kernel's own dispatch rules; it is worked out when explain() is called."""
    q, k, v = (torch.randn(1, h, n, 64).bfloat16() for h, n in ((8, 1), (2, 300), (2, 300)))
    p = sa.plan(q, k, v, sa.Dense(), backend="cpu")
    assert p.kernel.name == "cpu.decode"
    want = "AMX tiles (csrc/cpu/decode_amx.h" if products == "amx" else "bfloat16 dot products from the rows"
    assert f"note: cpu.decode: " in p.explain() and want in p.explain()
    ext = _mod()._ext()
    assert "float32 products" in sa.plan(q.float(), k.float(), v.float(), sa.Dense(), backend="cpu").explain()
    q80, k80, v80 = (torch.randn(1, h, n, 80).bfloat16() for h, n in ((8, 1), (2, 300), (2, 300)))
    assert "packed K/V" in sa.plan(q80, k80, v80, sa.Dense(), backend="cpu").explain()
    assert ext.products("bfloat16", "int8", 4, 64, 64).startswith("int8 codes")
    assert ext.products("float32", "float32", 1, 64, 64) == "float32 products, q held in registers"
    with pytest.raises(ValueError, match="kv_dtype"):
        ext.products("bfloat16", "int4", 4, 64, 64)
    with pytest.raises(ValueError, match="dtype"):
        ext.products("int8", "int8", 4, 64, 64)
