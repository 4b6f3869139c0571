"""The sparse-aware fetch plan: which keys each rank needs from each other rank, and whether they
travel in pairwise ring rounds or in one all-gather (a cost model chooses; `explain()` says why).

Every rank computes the same plan from host integers (lengths, layout, pattern parameters) plus,
for `TopK`, the all-gathered per-rank masks of the key blocks its tokens selected; so every rank
makes the same transport choice without a vote. A rank needs the keys its queries can see that it
does not hold (`Pattern.key_range` + sinks per query range; `BlockSparse`: the layout's rows of its
query blocks; `TopK`: its forced blocks and the blocks its tokens selected). Owner `s` sends rank
`r` exactly `need[r] ∩ owned[s]`: a sliding window talks to its neighbours only, and a rank whose
keys nobody visits sends nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..patterns import BlockSparse, TopK
from .sharding import Ranges, intersect, normalize, rank_ranges, ranges_len, subtract

#: per-message latency and bandwidth of the transports, nominal: gloo over loopback TCP on one CPU
#: host, NCCL between GPUs of one node (the bench's numbers are in docs/distributed.md)
_LINKS = {"cpu": (100e-6, 2e9), "cuda": (20e-6, 50e9)}
#: fraction of the device's fp32 matrix rate the positioned chunked softmax reaches
_COMPUTE_EFFICIENCY = 0.2


def visible_ranges(pattern, qranges: Ranges, total: int) -> Ranges:
    """Key positions some query in `qranges` may see, for patterns decided by positions alone
    (Dense, SlidingWindow) or by host-readable data (BlockSparse: its layout's rows)."""
    out = []
    for a, b in qranges:
        if isinstance(pattern, BlockSparse):
            bs = pattern.block_size
            rows = pattern.layout[:, :, a // bs:(b - 1) // bs + 1].detach().to("cpu")
            cols = rows.any(dim=0).any(dim=0).any(dim=0).tolist()
            out += [(n * bs, min((n + 1) * bs, b)) for n, on in enumerate(cols) if on and n * bs < b]
            continue
        lo, hi = pattern.key_range(a, b, total)
        out.append((lo, hi))
        out.append((0, min(pattern.sink_tokens(total), lo)))
    return normalize(out)


def topk_forced_ranges(pattern: TopK, qranges: Ranges) -> Ranges:
    """TopK's forced blocks (sinks, local) of the queries in `qranges`, clipped causally."""
    bs, out = pattern.block_size, []
    for a, b in qranges:
        out.append((0, min(pattern.sink_blocks * bs, b)))
        first = max(0, a // bs - pattern.local_blocks + 1)
        out.append((first * bs, b))
    return normalize(out)


def block_ranges(mask: list, bs: int, total: int) -> Ranges:
    """Bool list over key blocks -> position ranges."""
    return normalize([(n * bs, min((n + 1) * bs, total)) for n, on in enumerate(mask) if on])


@dataclass
class FetchPlan:
    world: int
    rank: int
    total: int
    layout: str
    owned: list  # per rank: Ranges
    need: list  # per rank: Ranges it needs from the others
    pattern_name: str
    head_bytes: int  # bytes of one token's K and V row over the batch and kv heads
    q_flops_per_pair: float  # flops per (query row, key) pair over batch and heads
    device_type: str = "cpu"
    peak_flops: float = 1e11
    transport: str = "ring"
    forced_transport: str | None = None
    est: dict = field(default_factory=dict)

    # --------------------------------------------------------------------------- who sends what
    @property
    def mine(self) -> Ranges:
        return self.owned[self.rank]

    def pair(self, src: int, dst: int) -> Ranges:
        """Positions rank `src` sends rank `dst`."""
        if src == dst:
            return []
        return intersect(self.need[dst], self.owned[src])

    def rounds(self) -> list[int]:
        """Ring rounds in which some rank moves something."""
        return [i for i in range(1, self.world)
                if any(self.pair(r, (r + i) % self.world) for r in range(self.world))]

    def union_sent(self, src: int) -> Ranges:
        """What `src` contributes to an all-gather: everything any rank needs from it."""
        return normalize([x for r in range(self.world) for x in self.pair(src, r)])

    def bytes_sent(self, rank: int, transport: str) -> int:
        if transport == "ring":
            return sum(ranges_len(self.pair(rank, r)) for r in range(self.world)) * self.head_bytes
        width = max(ranges_len(self.union_sent(s)) for s in range(self.world))
        return 0 if width == 0 else width * (self.world - 1) * self.head_bytes

    # ------------------------------------------------------------------------------ cost model
    def _compute_s(self, rows: int, keys: int) -> float:
        # causal: about half the (row, key) pairs of a piece are visible; the kernel computes all
        return self.q_flops_per_pair * rows * keys / (self.peak_flops * _COMPUTE_EFFICIENCY)

    def choose(self, forced: str | None = None) -> "FetchPlan":
        alpha, bw = _LINKS.get(self.device_type, _LINKS["cuda"])
        rows = [ranges_len(o) for o in self.owned]
        local = max(self._compute_s(rows[r], rows[r]) for r in range(self.world))
        ring = local
        for i in self.rounds():
            comm = max(ranges_len(self.pair(r, (r + i) % self.world)) for r in range(self.world)) * self.head_bytes / bw
            comp = max(self._compute_s(rows[r], ranges_len(self.pair((r - i) % self.world, r)))
                       for r in range(self.world))
            ring += alpha + max(comm, comp)
        width = max(ranges_len(self.union_sent(s)) for s in range(self.world))
        gather = local + max(self._compute_s(rows[r], ranges_len(self.need[r])) for r in range(self.world))
        if width:
            gather += alpha * math.ceil(math.log2(self.world)) + width * (self.world - 1) * self.head_bytes / bw
        self.est = {"ring": ring, "allgather": gather}
        self.forced_transport = forced
        self.transport = forced or ("allgather" if gather < ring else "ring")
        return self

    def explain(self) -> str:
        lines = [f"cp_attention plan: {self.pattern_name}, {self.total} tokens over {self.world} ranks "
                 f"({self.layout}); this is rank {self.rank}, holding {ranges_len(self.mine)} tokens {self.mine}"]
        for r in range(self.world):
            got = {s: ranges_len(self.pair(s, r)) for s in range(self.world) if s != r and self.pair(s, r)}
            lines.append(f"  rank {r} fetches {ranges_len(self.need[r])} keys: "
                         + (", ".join(f"{n} from rank {s}" for s, n in got.items()) or "nothing"))
        used = self.rounds()
        lines.append(f"  ring rounds with traffic: {used} of {list(range(1, self.world))}")
        for t in ("ring", "allgather"):
            mark = "chosen" if t == self.transport else "      "
            lines.append(f"  [{mark}] {t:9s} est {self.est.get(t, float('nan')) * 1e3:9.3f} ms, "
                         f"sends {self.bytes_sent(self.rank, t)} bytes from this rank")
        if self.forced_transport:
            lines.append(f"  transport forced by the caller: {self.forced_transport}")
        else:
            lines.append("  ring overlaps each round's transfer with the previous piece's compute and holds one "
                         "remote piece at a time; all-gather pays one latency but holds every fetched key and "
                         "cannot overlap: the cheaper estimate wins")
        return "\n".join(lines)


def build_plan(pattern, *, world: int, rank: int, total: int, layout: str, q_shape, k_shape, v_shape,
               dtype, device, topk_need: list | None = None, transport: str | None = None) -> FetchPlan:
    """The plan of one `cp_attention` call. `topk_need`: for TopK, per rank the bool list of key
    blocks its tokens selected (all-gathered by the caller)."""
    from ..scheduler.device import device_info

    owned = [rank_ranges(total, world, r, layout) for r in range(world)]
    need = []
    for r in range(world):
        if isinstance(pattern, TopK):
            vis = normalize(topk_forced_ranges(pattern, owned[r])
                            + block_ranges(topk_need[r], pattern.block_size, total))
            vis = intersect(vis, [(0, max((b for _, b in owned[r]), default=0))])
        else:
            vis = visible_ranges(pattern, owned[r], total)
        need.append(subtract(vis, owned[r]))
    b, hq, _, d = q_shape
    hkv, dv = k_shape[1], v_shape[3]
    elem = torch.finfo(dtype).bits // 8
    info = device_info(torch.device(device))
    name = pattern.describe() if not isinstance(pattern, BlockSparse) else repr(pattern)
    plan = FetchPlan(world=world, rank=rank, total=total, layout=layout, owned=owned, need=need,
                     pattern_name=name, head_bytes=elem * b * hkv * (d + dv),
                     q_flops_per_pair=2.0 * b * hq * (d + dv), device_type=info.type,
                     peak_flops=info.peak_tflops_fp32 * 1e12)
    return plan.choose(transport)

