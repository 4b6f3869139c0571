"""BlockLayout: built from every pattern, equal to the oracle's token visibility, full blocks
really full, listed blocks never empty, transpose consistent, and no host synchronisation."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_attn as sa
from sparse_attn.layout.topk_selection import topk_token_index
from conftest import make_qkv, random_layout
import oracle

LENGTHS = [(37, 37), (5, 37), (1, 50), (71, 71), (20, 71), (0, 19)]


def _patterns(sk):
    yield "dense", sa.Dense(), (16, 16)
    yield "dense-q32k16", sa.Dense(), (32, 16)
    yield "noncausal", sa.Dense(causal=False), (16, 32)
    yield "window", sa.SlidingWindow(9), (16, 8)
    yield "window-sinks", sa.SlidingWindow(13, sinks=5), (8, 16)
    yield "window-long", sa.SlidingWindow(200, sinks=3), (16, 16)
    yield "blocksparse", sa.BlockSparse(random_layout(2, 2, sk, 16, 0.4), block_size=16), (None, None)
    yield "blocksparse-bcast", sa.BlockSparse(random_layout(1, 1, sk, 8, 0.5), block_size=8), (None, None)
    yield "topk", sa.TopK(2, block_size=8), (None, None)
    yield "topk-local2-nosink", sa.TopK(1, block_size=8, sink_blocks=0, local_blocks=2), (None, None)


def _cases():
    for sq, sk in LENGTHS:
        for name, pat, blocks in _patterns(sk):
            yield pytest.param(sq, sk, pat, blocks, id=f"{name}-Sq{sq}-Sk{sk}")


def _layout(q, k, pat, blocks):
    ti = topk_token_index(q, k, pat) if isinstance(pat, sa.TopK) else None
    return sa.build_layout(pat, batch=q.shape[0], kv_heads=k.shape[1], sq=q.shape[2], sk=k.shape[2],
                           q_block=blocks[0], k_block=blocks[1], token_index=ti)


@pytest.mark.parametrize("sq,sk,pat,blocks", list(_cases()))
def test_layout_equals_oracle_visibility(sq, sk, pat, blocks):
    q, k, v = make_qkv(2, 4, 2, sq, sk, 8, dtype=torch.float64)
    lay = _layout(q, k, pat, blocks)
    want = oracle.visibility_mask(q, k, pat)[:, ::2]  # (B, Hkv, Sq, Sk): one query head per group
    got = lay.to_dense().expand_as(want)
    assert torch.equal(got, want), f"{(got != want).sum().item()} pairs differ\n{lay}"

    # every full block is visible in full, every listed block has a visible pair
    nb = lay.num_k_blocks
    for i in range(lay.num_q_tiles):
        r0, r1 = lay.q_rows(i)
        assert 0 <= r0 < r1 <= sq
        for which, cnt, idx in (("full", lay.full_count, lay.full_index), ("partial", lay.partial_count, lay.partial_index)):
            cnt, idx = cnt.expand(2, 2, -1), idx.expand(2, 2, -1, -1)
            for b in range(2):
                for h in range(2):
                    c = int(cnt[b, h, i])
                    blocks_i = idx[b, h, i, :c].tolist()
                    assert all(0 <= n < nb for n in blocks_i) and blocks_i == sorted(set(blocks_i))
                    assert (idx[b, h, i, c:] == -1).all()
                    for n in blocks_i:
                        tile = want[b, h, r0:r1, n * lay.k_block:(n + 1) * lay.k_block]
                        if which == "full":
                            assert tile.all(), f"full block {n} of tile {i} has hidden pairs"
                        elif lay.token_index is None:
                            assert tile.any(), f"partial block {n} of tile {i} has no visible pair"


@pytest.mark.parametrize("pat", [sa.Dense(), sa.SlidingWindow(20, sinks=3), sa.TopK(2, block_size=16)],
                         ids=["dense", "window", "topk"])
def test_transpose_lists_the_same_pairs(pat):
    q, k, v = make_qkv(1, 2, 1, 90, 101, 8)
    lay = _layout(q, k, pat, (16, 16) if not isinstance(pat, sa.TopK) else (None, None))
    fcnt, fidx, pcnt, pidx = lay.transpose()
    m = lay.num_q_tiles
    for fwd_idx, t_cnt, t_idx in ((lay.full_index, fcnt, fidx), (lay.partial_index, pcnt, pidx)):
        fwd = {(i, n) for i in range(m) for n in fwd_idx[0, 0, i].tolist() if n >= 0}
        bwd = {(i, n) for n in range(lay.num_k_blocks) for i in t_idx[0, 0, n, :int(t_cnt[0, 0, n])].tolist()}
        assert fwd == bwd


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (`.item()`, `.tolist()`, `bool(t)`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pat", [sa.Dense(), sa.SlidingWindow(20, sinks=3), sa.TopK(2, block_size=16)],
                         ids=["dense", "window", "topk"])
def test_build_plan_and_reference_run_without_host_sync(pat):
    q, k, v = make_qkv(1, 4, 2, 70, 101, 16)
    with _NoHostSync():
        ti = topk_token_index(q, k, pat) if isinstance(pat, sa.TopK) else None
        sa.build_layout(pat, batch=1, kv_heads=2, sq=70, sk=101, token_index=ti)
        sa.plan(q, k, v, pat)
        sa.attention(q, k, v, pat, backend="reference")


def test_no_host_sync_check_can_fail():
    with pytest.raises(AssertionError, match="host synchronisation"):
        with _NoHostSync():
            torch.ones(3).sum().item()


def test_widths_are_static_bounds():
    # a window's list width depends on window / block only, not on the sequence length
    w = [sa.build_layout(sa.SlidingWindow(100), batch=1, kv_heads=1, sq=s, sk=s).full_index.shape[-1]
         for s in (1000, 4000)]
    assert w[0] == w[1] <= 4
    t = sa.build_layout(sa.TopK(16, block_size=64, sink_blocks=1, local_blocks=2), batch=1, kv_heads=1,
                        sq=4096, sk=4096)
    assert t.full_index.shape[-1] == 3


def test_repr_draws_the_grid_and_density():
    lay = sa.build_layout(sa.SlidingWindow(200, sinks=4), batch=1, kv_heads=1, sq=600, sk=600)
    text = repr(lay)
    assert "#" in text and "+" in text and "window=200" in text
    d = lay.density()
    want = sa.SlidingWindow(200, sinks=4).visited_pairs(600, 600) / (600 * 600)
    assert abs(d - want) < 1e-9


@pytest.mark.parametrize("pat", [sa.Dense(), sa.Dense(causal=False), sa.SlidingWindow(7), sa.SlidingWindow(7, 3),
                                 sa.SlidingWindow(100, 2), sa.TopK(3, block_size=8), sa.TopK(0, block_size=4, sink_blocks=2)],
                         ids=lambda p: repr(p))
@pytest.mark.parametrize("sq,sk", [(50, 50), (9, 61), (1, 33)])
def test_visited_pairs_counts_the_visible_pairs(pat, sq, sk):
    q, k, v = make_qkv(1, 1, 1, sq, sk, 4)
    exact = oracle.visibility_mask(q, k, pat).sum().item()
    est = pat.visited_pairs(sq, sk)
    if isinstance(pat, sa.TopK):  # an estimate: at most the selected blocks' keys
        assert exact <= est + 1e-9
    else:
        assert est == exact


def test_blocked_patterns_need_their_own_block_size():
    with pytest.raises(ValueError, match="block_size"):
        sa.build_layout(sa.TopK(2, block_size=16), batch=1, kv_heads=1, sq=40, sk=40, q_block=32)


def test_block_token_lists():
    """Per key block, the tokens that selected it: ascending, padding dropped."""
    from sparse_attn.layout.block_layout import block_token_lists
    ti = torch.tensor([[[[0, 2], [2, -1], [-1, -1], [0, 1]]]], dtype=torch.int32)
    tokens, offsets = block_token_lists(ti, 4)
    assert offsets[0, 0].tolist() == [0, 2, 3, 5, 5]
    assert tokens[0, 0, :5].tolist() == [0, 3, 3, 0, 1]
