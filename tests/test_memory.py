"""The reference backend never allocates `Sq x Sk` (contract, "Backends"), forward or backward.

Every op's output is recorded by a TorchDispatchMode (it sees the ops autograd runs in backward too),
by the size of the storage behind it: a view (expand, transpose) of a small tensor allocates nothing.
the shapes make `Sq * Sk` dwarf every legitimate tensor (B = H = 1, Sq = Sk = 2048, D = 8: q/k/v
are 16K elements, a full score matrix 4M).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sparse_attn as sa

S, D = 2048, 8


class NumelRecorder(TorchDispatchMode):
    """Records (op name, elements of its storage) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.records.append((str(func), t.untyped_storage().nbytes() // t.element_size()))
        return out

    def largest(self):
        return max(self.records, key=lambda r: r[1])


def test_recorder_sees_a_score_matrix():
    """The recorder itself: a naive evaluation is caught, in forward and in backward."""
    q = torch.randn(1, 1, S, D, requires_grad=True)
    with NumelRecorder() as rec:
        torch.softmax(q @ q.transpose(-1, -2), -1).sum().backward()
    assert rec.largest()[1] >= S * S
    assert any("backward" in name or "_softmax_backward" in name for name, _ in rec.records)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [sa.Dense(), sa.SlidingWindow(256), sa.TopK(2, block_size=64)],
                         ids=["dense_causal", "window", "topk"])
def test_reference_never_allocates_sq_by_sk(pattern):
    q, k, v = (torch.randn(1, 1, S, D, requires_grad=True) for _ in range(3))
    go = torch.randn(1, 1, S, D)
    with NumelRecorder() as fwd:
        out = sa.attention(q, k, v, pattern, backend="reference")
    with NumelRecorder() as bwd:
        out.backward(go)
    assert fwd.records and bwd.records, "the recorder saw no op"
    for phase, rec in (("forward", fwd), ("backward", bwd)):
        name, numel = rec.largest()
        assert numel < S * S, f"{phase}: {name} returned {numel} elements (Sq*Sk = {S * S})"
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
