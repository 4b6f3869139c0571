"""What a cache gave back, and whether a pattern would read it (contract, "Bad input").

A paged cache returns pages to its pool (`release_outside`, `free`); their page-table entries then
point at the trash page, so reading them would silently return placeholder keys. The cache keeps,
per sequence, the key positions it released as a few disjoint half-open spans (host integers: a
streaming window releases one growing span), and `attention_with_cache` asks it, before running,
whether the pattern can reach any of them for the queries of this call.
"""
from __future__ import annotations

from ..patterns import BlockSparse, SlidingWindow, TopK


def add_span(spans: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The union of disjoint sorted `spans` and `[lo, hi)`, disjoint and sorted again."""
    if hi <= lo:
        return spans
    out = []
    for a, e in sorted(spans + [(lo, hi)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((a, e))
    return out


def reach(pattern, length: int, sq: int, b: int) -> list[tuple[int, int]]:
    """Key positions `[lo, hi)` that the `sq` queries ending at `length` (sequence `b`) may visit
    under `pattern`, as spans. Exact for Dense and SlidingWindow; TopK may select any causal block
    (its forced blocks only when `topk == 0`); BlockSparse reads its layout when it is on the CPU
    (no device sync), else every causal key."""
    p_lo = length - sq  # first query position
    if isinstance(pattern, SlidingWindow):
        return [(0, min(pattern.sinks, length)), (max(0, p_lo - pattern.window + 1), length)]
    if isinstance(pattern, TopK) and pattern.topk == 0:
        bs = pattern.block_size
        return [(0, min(pattern.sink_blocks * bs, length)),
                (max(0, (p_lo // bs - pattern.local_blocks + 1) * bs), length)]
    if isinstance(pattern, BlockSparse) and pattern.layout.device.type == "cpu":
        bs = pattern.block_size
        lay = pattern.layout[b if pattern.layout.shape[0] > 1 else 0]  # (H', NB, NB)
        rows = lay[:, p_lo // bs:(length - 1) // bs + 1].any(dim=1).any(dim=0)  # key blocks any row may see
        return [(int(n) * bs, min((int(n) + 1) * bs, length)) for n in rows.nonzero().flatten().tolist()]
    return [(0, length)]  # Dense, TopK, a BlockSparse layout on a device


def check_reach(pattern, released: list[list[tuple[int, int]]], lengths: list[int], sq: int) -> None:
    """Raise `ValueError` naming the pattern and the released range if the queries of this call
    (the last `sq` positions of every sequence) may read a released key."""
    for b, (spans, n) in enumerate(zip(released, lengths)):
        if not spans:
            continue
        for lo, hi in reach(pattern, n, sq, b):
            for a, e in spans:
                if lo < e and a < hi:
                    raise ValueError(
                        f"pattern {pattern!r} reaches key positions [{max(lo, a)}, {min(hi, e)}) of sequence {b}, "
                        f"which this cache released (released range [{a}, {e}), by release_outside / free): "
                        f"its pages hold other data now. Attend with a pattern that stays inside what was kept "
                        f"(e.g. the SlidingWindow given to release_outside), or release less")
