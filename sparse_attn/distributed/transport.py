"""Moving tensors between ranks: pairwise rounds of `isend`/`irecv` (the ring schedule), a padded
all-gather, and a count of the bytes this process sends.

Round `i` (1 <= i < world) pairs every rank `r` with `dst = r + i` and `src = r - i` (mod world):
it sends to `dst` and receives from `src`. Over the rounds every ordered pair of ranks meets exactly
once, which is the ring's communication pattern without forwarding: a rank receives from each
owner only what it needs from that owner, and a round with nothing to move on either side posts no
message (both sides know the sizes from the fetch plan, so no size is ever exchanged).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ByteCounter:
    """Bytes this process handed to torch.distributed, by kind of message."""
    sent: dict = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


_COUNTERS: list[ByteCounter] = []


@contextlib.contextmanager
def count_bytes():
    """`with count_bytes() as c: ...` counts the bytes this process sends inside the block
    (`c.total`, `c.sent` by kind: "kv", "grad", "stats", "state")."""
    c = ByteCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _count(kind: str, nbytes: int) -> None:
    for c in _COUNTERS:
        c.add(kind, nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Round:
    """One posted round: the send to `dst` and the receive from `src`; `wait()` returns the
    received tensor (None when nothing was to be received)."""

    def __init__(self, group, *, send=None, dst=None, recv_shape=None, recv_like=None, src=None, tag=0, kind="kv"):
        self.works = []
        self.recv = None
        gdst = dist.get_global_rank(group, dst) if group is not None and dst is not None else dst
        gsrc = dist.get_global_rank(group, src) if group is not None and src is not None else src
        if recv_shape is not None:
            self.recv = recv_like.new_empty(recv_shape)
            self.works.append(dist.irecv(self.recv, src=gsrc, group=group, tag=tag))
        if send is not None:
            send = send.contiguous()
            self._keep = send  # the buffer must live until the send completes
            _count(kind, _nbytes(send))
            self.works.append(dist.isend(send, dst=gdst, group=group, tag=tag))

    def wait(self):
        for w in self.works:
            w.wait()
        return self.recv


def all_gather_padded(x: torch.Tensor, sizes: list[int], group, *, dim: int, kind: str) -> list[torch.Tensor]:
    """All-gather tensors whose `dim` lengths differ by rank (`sizes`, known everywhere): pad to the
    longest, gather, trim. Counts what leaves this process under a ring all-gather: `world - 1`
    copies of the padded block."""
    world = len(sizes)
    width = max(sizes) if sizes else 0
    shape = list(x.shape)
    shape[dim] = width - x.shape[dim]
    buf = torch.cat([x, x.new_zeros(shape)], dim=dim).contiguous() if shape[dim] else x.contiguous()
    parts = [torch.empty_like(buf) for _ in range(world)]
    _count(kind, _nbytes(buf) * (world - 1))
    dist.all_gather(parts, buf, group=group)
    return [p.narrow(dim, 0, s) for p, s in zip(parts, sizes)]


def all_reduce_sum(x: torch.Tensor, group, *, kind: str) -> torch.Tensor:
    """In-place sum over the group; counted as `2 (world-1)/world` of the tensor (ring all-reduce)."""
    world = dist.get_world_size(group)
    _count(kind, int(_nbytes(x) * 2 * (world - 1) / max(world, 1)))
    dist.all_reduce(x, group=group)
    return x


class AllGatherFn(torch.autograd.Function):
    """Differentiable all-gather of equal-shaped tensors along a new leading axis: the gradient of
    each rank's input is the sum over ranks of the gradient of its slot (all-reduce, then slice)."""

    @staticmethod
    def forward(ctx, x, group, kind):
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        _count(kind, _nbytes(x) * (world - 1))
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.kind = group, dist.get_rank(group), kind
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce_sum(grad, ctx.group, kind=ctx.kind)
        return grad[ctx.rank], None, None
