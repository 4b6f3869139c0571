"""Non-finite inputs through the CPU decode kernel (`cpu.decode`, csrc/cpu/decode_softmax.h).

The contract's "Bad input" rule: every output row whose float64 evaluation involves a NaN or an
infinity (its own query, or a key or value it sees) is NaN, and no output is finite and wrong
because of one. Checked for Dense, SlidingWindow (with sinks), TopK and BlockSparse, over plain
tensors and over contiguous and paged caches:
* a NaN / +inf / -inf in q, in a visible key's K row or V row: the rows that see it are NaN (a NaN
  query is not zeros; a -inf score is not taken for a masked key), every other row is untouched;
* a non-finite value in a key no row sees (before the window, an unselected or unlisted block, a
  key a row's causal rule hides): the rows are finite and equal the float64 evaluation. A V row of
  a key that only another row of the same call sees may spread NaN to this row (Sq > 1; 0 x NaN
  in P . V), which docs/semantics.md documents: those rows are not checked;
* the split merge: an infinite V whose weight underflows to 0 in the merge still gives NaN.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, make_qkv_for

pytestmark = needs_jit

B, HQ, HKV, D = 2, 8, 2, 64
G = HQ // HKV
SK = 203        # not a multiple of any block or segment
BS = 16
POISON_B, POISON_H = 1, 1  # the (batch, kv head) whose inputs are poisoned
VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
SHORT = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _mod():
    from sparse_attn.backends.cpu import decode
    return decode


def _pattern(kind, sk=SK):
    if kind == "dense":
        return sa.Dense()
    if kind == "window":
        return sa.SlidingWindow(40, sinks=3)
    if kind == "topk":
        return sa.TopK(2, block_size=BS)
    if kind == "blocksparse":
        nb = -(-sk // BS)
        lay = torch.rand(B, HKV, nb, nb) < 0.5
        lay[..., torch.arange(nb), torch.arange(nb)] = True  # the query's own block listed
        lay[..., 0] = True  # and the first
        return sa.BlockSparse(lay, block_size=BS)
    raise KeyError(kind)


def _expect(out, ref, bad_rows, *, dtype, what, unchecked=()):
    """Rows `bad_rows` (a list of (b, h, t)) all NaN; every other row, except `unchecked`, equal to
    the clean inputs' float64 evaluation within the contract's bound."""
    keep = torch.ones(out.shape[:3], dtype=torch.bool)
    for r in list(bad_rows) + list(unchecked):
        keep[r] = False
    for r in bad_rows:
        assert torch.isnan(out[r]).all(), f"{what}: row {r} should be NaN, got {out[r][:4].tolist()} ..."
    oracle.assert_close_contract(out[keep], ref[keep], dtype=dtype, device="cpu", what=what)


def _reference(q, k, v, pattern, scale):
    return oracle.oracle_attention(q, k, v, pattern, scale=scale)


def _group_rows(b, h, sq, tokens=None):
    return [(b, h * G + g, t) for g in range(G) for t in (range(sq) if tokens is None else tokens)]


# ---------------------------------------------------------------------------------- visible values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("kind", ["dense", "window", "topk", "blocksparse"])
def test_nonfinite_query_gives_nan_row(kind, value, dtype):
    """One element, or the whole row, of one query head: that row is NaN (not zeros), the others exact."""
    pattern = _pattern(kind)
    q, k, v = make_qkv_for(pattern, B, HQ, HKV, 1, SK, D, dtype=dtype)
    ref = _reference(q, k, v, pattern, D ** -0.5)
    h = POISON_H * G + 1
    for whole in (False, True):
        qp = q.clone()
        if whole:
            qp[POISON_B, h, 0] = VALUES[value]
        else:
            qp[POISON_B, h, 0, 5] = VALUES[value]
        # the selection is made from the clean queries: TopK's scores average the group's heads,
        # and a non-finite head would reorder the whole group's blocks (a selection question, not
        # this kernel's)
        tok = _mod().decode_prepare(q, k, pattern) if kind == "topk" else None
        out, lse = _mod().decode_forward(qp, k, v, pattern, scale=D ** -0.5, token_index=tok)
        _expect(out, ref, [(POISON_B, h, 0)], dtype=dtype, what=f"{kind} q={value} whole={whole}")
        assert torch.isnan(lse[POISON_B, h, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("kind", ["dense", "window", "topk", "blocksparse"])
def test_nonfinite_visible_key_or_value_gives_nan_rows(kind, where, value, dtype):
    """A NaN / inf in the K or V row of a key the group sees (its own key, and key 1: a sink, the
    first block): every query head of the group is NaN, other groups and batches are exact."""
    pattern = _pattern(kind)
    q, k, v = make_qkv_for(pattern, B, HQ, HKV, 1, SK, D, dtype=dtype)
    ref = _reference(q, k, v, pattern, D ** -0.5)
    for j in (SK - 1, 1):
        k2, v2 = k.clone(), v.clone()
        (k2 if where == "k" else v2)[POISON_B, POISON_H, j, 3] = VALUES[value]
        out, lse = _mod().decode_forward(q, k2, v2, pattern, scale=D ** -0.5)
        bad = _group_rows(POISON_B, POISON_H, 1)
        _expect(out, ref, bad, dtype=dtype, what=f"{kind} {where}[{j}]={value}")
        assert torch.isnan(lse[POISON_B, POISON_H * G:(POISON_H + 1) * G]).all()


# -------------------------------------------------------------------------------- invisible values
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
@pytest.mark.parametrize("kind", ["window", "topk", "blocksparse"])
def test_nonfinite_invisible_key_does_not_poison(kind, dtype):
    """NaN and inf in the K and V rows of keys the row does not see (before the window, in a block
    TopK did not select or the layout does not list): the rows are finite and exact."""
    pattern = _pattern(kind)
    q, k, v = make_qkv_for(pattern, B, HQ, HKV, 1, SK, D, dtype=dtype)
    ref = _reference(q, k, v, pattern, D ** -0.5)
    vis = oracle.visibility_mask(q.double(), k.double(), pattern)  # (B, Hq, 1, Sk)
    hidden = ~vis[POISON_B, POISON_H * G:(POISON_H + 1) * G, 0].any(0)  # keys no head of the group sees
    js = hidden.nonzero().flatten()
    assert len(js) >= 4, "the pattern hides too few keys for this test"
    js = js[torch.randperm(len(js))[:4]]
    k2, v2 = k.clone(), v.clone()
    v2[POISON_B, POISON_H, js, 2] = float("nan")
    v2[POISON_B, POISON_H, js, 7] = float("inf")
    if kind != "topk":  # a non-finite key changes TopK's block means, so the selection: V only
        k2[POISON_B, POISON_H, js, 0] = float("nan")
        k2[POISON_B, POISON_H, js, 1] = float("-inf")
    out, _ = _mod().decode_forward(q, k2, v2, pattern, scale=D ** -0.5)
    _expect(out, ref, [], dtype=dtype, what=f"{kind} hidden keys {js.tolist()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
@pytest.mark.parametrize("kind", ["dense", "window", "topk"])
def test_key_hidden_by_the_causal_rule_of_a_chunk(kind, dtype):
    """Sq = 4: the last key is seen by the last row only. A non-finite K there makes that row NaN
    and leaves the earlier rows exact (masked before the max); a non-finite V there makes the last
    row NaN (the earlier rows may be NaN too: the documented spreading)."""
    sq = 4
    pattern = _pattern(kind)
    q, k, v = make_qkv_for(pattern, B, HQ, HKV, sq, SK, D, dtype=dtype)
    ref = _reference(q, k, v, pattern, D ** -0.5)
    tok = _mod().decode_prepare(q, k, pattern) if kind == "topk" else None  # selection from clean K
    for where in ("k", "v"):
        k2, v2 = k.clone(), v.clone()
        (k2 if where == "k" else v2)[POISON_B, POISON_H, SK - 1, 4] = float("nan")
        out, _ = _mod().decode_forward(q, k2, v2, pattern, scale=D ** -0.5, token_index=tok)
        early = _group_rows(POISON_B, POISON_H, sq, range(sq - 1))
        _expect(out, ref, _group_rows(POISON_B, POISON_H, sq, [sq - 1]), dtype=dtype,
                what=f"{kind} {where}[last]=nan, Sq={sq}", unchecked=early if where == "v" else ())


# ------------------------------------------------------------------------------------ split merge
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
def test_infinite_value_in_a_split_that_the_merge_weighs_zero(dtype, threads):
    """The first ~600 keys score ~230 (base 2) below the rest, so the merge weighs their split 0 in
    float32; in float64 an infinite V row there is still weighted e^-160 > 0, so the row is inf:
    the kernel must give NaN, not the finite average of the other splits. A NaN K row in the middle
    of a long bf16 run (D = 128: the direct path's runs and steady-max shortcut on AVX-512 BF16)
    gives NaN too."""
    sk, d = 3001, 128
    q = torch.full((1, 4, 1, d), 1.0).to(dtype)
    k = (torch.randn(1, 1, sk, d) * 0.1).to(dtype)
    k[:, :, :600] = -20.0
    v = torch.randn(1, 1, sk, d).to(dtype)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, _ = _mod().decode_forward(q, k, v, sa.Dense(), scale=d ** -0.5)
        ref = _reference(q, k, v, sa.Dense(), d ** -0.5)
        oracle.assert_close_contract(out, ref, dtype=dtype, device="cpu", what="clean")
        v2 = v.clone()
        v2[0, 0, 5, 9] = float("inf")
        out, _ = _mod().decode_forward(q, k, v2, sa.Dense(), scale=d ** -0.5)
        assert torch.isnan(out).all(), "an infinite V behind an underflowing merge weight must give NaN"
        k2 = k.clone()
        k2[0, 0, 2000, 17] = float("nan")
        out, _ = _mod().decode_forward(q, k2, v, sa.Dense(), scale=d ** -0.5)
        assert torch.isnan(out).all()
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ caches
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=SHORT.get)
@pytest.mark.parametrize("kind", ["dense", "window", "topk"])
def test_caches_contiguous_and_paged(kind, dtype):
    """Over a contiguous and a paged cache (ragged lengths): a NaN in a key that sequence 1 sees
    makes its group NaN in both, the other rows equal the float64 evaluation and agree bit for bit
    between the caches; a NaN before the window changes nothing."""
    from sparse_attn.cache import KVCache, PagedKVCache, attention_with_cache

    lengths, max_len = [150, SK], 224
    pattern = _pattern(kind)
    q, k, v = make_qkv_for(pattern, B, HQ, HKV, 1, SK, D, dtype=dtype)
    pool = getattr(pattern, "block_size", BS)
    cases = [(SK - 1, True), (SK - 10, True)]
    if kind == "window":
        cases.append((60, False))  # before the window (40 keys) and past the sinks (3)
    for j, seen in cases:
        k2, v2 = k.clone(), v.clone()
        k2[POISON_B, POISON_H, j, 3] = float("nan")
        v2[POISON_B, POISON_H, j, 6] = float("nan")
        caches = [KVCache(B, HKV, D, max_len, dtype=dtype, pool_block_size=pool),
                  PagedKVCache(B, HKV, D, num_pages=40, page_size=24, max_len=max_len, dtype=dtype,
                               pool_block_size=pool)]
        for c in caches:
            c.append(k2, v2, lengths)
        outs = [attention_with_cache(q, c, pattern, backend="cpu") for c in caches]
        bad = _group_rows(POISON_B, POISON_H, 1) if seen else []
        for o in outs:
            assert torch.equal(torch.isnan(o), torch.isnan(outs[0]))
            assert torch.equal(torch.nan_to_num(o), torch.nan_to_num(outs[0])), "paged != contiguous"
        for i, n in enumerate(lengths):
            rows = [r for r in bad if r[0] == i]
            ref = _reference(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], pattern, D ** -0.5)
            _expect(outs[0][i:i + 1], ref, [(0, h, t) for _, h, t in rows], dtype=dtype,
                    what=f"{kind} cache seq {i}, NaN at key {j}")
