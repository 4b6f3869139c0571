"""How a sequence is cut over the ranks of a process group: `zigzag` and `contiguous` layouts,
position ranges, and `shard` / `unshard`.

A position set is a list of half-open `(start, end)` ranges of absolute token positions, ascending
and disjoint (host integers: every plan decision here is host arithmetic on lengths).

Lengths that do not divide: the sequence of `S` tokens is cut into `n` chunks (`n = 2 * world` for
zigzag, `world` for contiguous) the way `torch.tensor_split` cuts it: the first `S % n` chunks hold
one token more. Shards are therefore *split unevenly, never padded*: rank shards differ by at most
two tokens (zigzag) or one (contiguous), and a rank may hold nothing when `S < n`. Only the
transport pads internally, where a collective needs equal sizes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")

Ranges = list  # list[tuple[int, int]]


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def chunk_bounds(total: int, n: int) -> list[tuple[int, int]]:
    """`n` chunks of `total` tokens, the first `total % n` one token longer (torch.tensor_split)."""
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def rank_ranges(total: int, world: int, rank: int, layout: str) -> Ranges:
    """The positions rank `rank` holds, ascending (its local shard is their concatenation)."""
    if layout == "zigzag":
        chunks = chunk_bounds(total, 2 * world)
        parts = [chunks[rank], chunks[2 * world - 1 - rank]]
    else:
        parts = [chunk_bounds(total, world)[rank]]
    return [(a, b) for a, b in parts if b > a]


def ranges_len(r: Ranges) -> int:
    return sum(b - a for a, b in r)


def normalize(r) -> Ranges:
    """Sorted, merged, non-empty ranges."""
    out: Ranges = []
    for a, b in sorted((a, b) for a, b in r if b > a):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def intersect(x: Ranges, y: Ranges) -> Ranges:
    out = []
    for a, b in x:
        for c, d in y:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                out.append((lo, hi))
    return normalize(out)


def subtract(x: Ranges, y: Ranges) -> Ranges:
    out = []
    for a, b in x:
        cur = a
        for c, d in normalize(y):
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return normalize(out)


def to_local(sub: Ranges, owned: Ranges) -> Ranges:
    """Absolute ranges `sub` (inside `owned`) -> index ranges into the concatenation of `owned`."""
    out, base = [], 0
    for a, b in owned:
        for c, d in sub:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                out.append((base + lo - a, base + hi - a))
        base += b - a
    return out


def positions(r: Ranges, device=None) -> torch.Tensor:
    """int64 positions of a range list."""
    if not r:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(a, b, device=device) for a, b in r])


def take(x: torch.Tensor, idx: Ranges, dim: int) -> torch.Tensor:
    """Rows `idx` (index ranges) of `x` along `dim`, concatenated (a view when it is one range)."""
    if len(idx) == 1:
        a, b = idx[0]
        return x.narrow(dim, a, b - a)
    shape = list(x.shape)
    shape[dim] = 0
    if not idx:
        return x.new_empty(shape)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in idx], dim=dim)


def group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sparse_attn.distributed needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun); none is")
    return dist.get_world_size(group), dist.get_rank(group)


def global_length(local_len: int, group, device) -> int:
    """Total sequence length: one all-reduce of the local lengths."""
    t = torch.tensor([local_len], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t.item())


def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    return dim % x.dim()


def shard(x: torch.Tensor, group=None, *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's part of the full-length tensor `x` along `dim` (the sequence axis; 2 in SDPA
    layout `(B, H, S, D)`). Every rank passes the same `x`; nothing is communicated."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_layout(layout)
    dim = _norm_dim(x, dim)
    world, rank = group_info(group)
    mine = rank_ranges(x.shape[dim], world, rank, layout)
    return take(x, mine, dim).contiguous()


def unshard(x_local: torch.Tensor, group=None, *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full tensor on every rank from each rank's shard (one all-gather, shards padded to the
    longest; the total length comes from one all-reduce). Not differentiable."""
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    check_layout(layout)
    dim = _norm_dim(x_local, dim)
    world, rank = group_info(group)
    total = global_length(x_local.shape[dim], group, x_local.device)
    expect = ranges_len(rank_ranges(total, world, rank, layout))
    if x_local.shape[dim] != expect:
        raise ValueError(f"x_local has {x_local.shape[dim]} rows on dim {dim}; rank {rank} of a {layout} layout "
                         f"of {total} tokens over {world} ranks holds {expect}")
    width = max(ranges_len(rank_ranges(total, world, r, layout)) for r in range(world))
    pad = list(x_local.shape)
    pad[dim] = width - x_local.shape[dim]
    buf = torch.cat([x_local, x_local.new_zeros(pad)], dim=dim).contiguous()
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    shape = list(x_local.shape)
    shape[dim] = total
    out = x_local.new_empty(shape)
    for r in range(world):
        base = 0
        for a, b in rank_ranges(total, world, r, layout):
            out.narrow(dim, a, b - a).copy_(parts[r].narrow(dim, base, b - a))
            base += b - a
    return out
