"""`cp_attention`: softmax attention over a sequence sharded across the ranks of a process group,
exactly `attention(full q, full k, full v, pattern)` restricted to this rank's rows, forward and
backward.

Forward: this rank's queries attend to its own keys, then to each piece of remote keys the fetch
plan brings (ring rounds overlapped with compute, or one all-gather), and the partial results are
merged by log-sum-exp. Backward: the pieces are fetched again (nothing remote is kept between the
passes), dq accumulates locally, and each piece's dk/dv travel back to the rank that owns those
keys, which adds them to its own.

TopK: the per-block key sums are all-reduced first (`B * Hkv * ceil(S/bs) * D` numbers), each rank
selects per token for its own queries, the ranks all-gather one bool per key block saying which
blocks they selected, and the plan fetches only those.

InfLLMv2: the same, with the sums of the keys of every `c`-token chunk (`c = gcd(kernel_size,
kernel_stride)`: 16 for the models; each rank all-gathers its own chunks' sums, so a rank receives
`(world - 1) / world` of `B * Hkv * ceil(S/c) * D` float32 numbers: 1/8 of a bf16 K's bytes) in
place of the block sums: every window of the fine and coarse compressed keys is a run of
whole chunks, so each rank rebuilds all of `kc` / `kc2` and selects for its own rows; then the
attention is the pattern's TopK view with that selection. The `dense_len` switch follows the full
length (a call below it is Dense on every rank).
"""
from __future__ import annotations

import math

import torch

from ..backends.reference.softmax import acc_dtype
from ..layout.block_layout import index_to_bool
from ..layout.infllmv2_selection import num_windows, token_index_from_compressed
from ..layout.topk_selection import topk_token_index_pooled
from ..patterns import SOFTMAX_PATTERNS, InfLLMv2, Pattern, TopK, WindowLinear
from ..scheduler.problem import check_pattern, check_qkv, check_scale
from .fetch_plan import FetchPlan, build_plan
from .segment import KeySet, merge, segment_backward, segment_forward
from .sharding import check_layout, global_length, group_info, positions, rank_ranges, ranges_len, take, to_local
from .transport import Round, all_gather_padded, all_reduce_sum

_GRAD_TAG = 1 << 12  # p2p tags: fetch round i uses i, the gradient return of round i uses _GRAD_TAG + i
TRANSPORTS = (None, "ring", "allgather")


# ------------------------------------------------------------------------------------ fetching
def _pieces(plan: FetchPlan, kv: torch.Tensor, group):
    """Yield `(src, KeySet, kv_piece)` for every remote piece this rank needs: ring rounds with the
    next round posted before the current piece is handed out (so its transfer overlaps the
    caller's compute), or one all-gather."""
    w, r = plan.world, plan.rank
    shape = list(kv.shape)
    if plan.transport == "allgather":
        unions = [plan.union_sent(s) for s in range(w)]
        if not any(unions):
            return
        mine = take(kv, to_local(unions[r], plan.mine), 2)
        parts = all_gather_padded(mine, [ranges_len(u) for u in unions], group, dim=2, kind="kv")
        for s in range(w):
            want = plan.pair(s, r)
            if want:
                yield s, KeySet(want), take(parts[s], to_local(want, unions[s]), 2)
        return

    def post(i):
        dst, src = (r + i) % w, (r - i) % w
        out, inn = plan.pair(r, dst), plan.pair(src, r)
        shape[2] = ranges_len(inn)
        return src, inn, Round(group, send=take(kv, to_local(out, plan.mine), 2) if out else None, dst=dst,
                               recv_shape=list(shape) if inn else None, recv_like=kv, src=src, tag=i)

    rounds = plan.rounds()
    pending = post(rounds[0]) if rounds else None
    for n in range(len(rounds)):
        src, inn, rnd = pending
        got = rnd.wait()
        pending = post(rounds[n + 1]) if n + 1 < len(rounds) else None
        if got is not None:
            yield src, KeySet(inn), got


def _split(kv, d):
    return kv[..., :d], kv[..., d:]


# --------------------------------------------------------------------------------- the passes
def _forward(q, k, v, ctx):
    plan, kw = ctx.plan, ctx.kwargs
    mine = plan.mine
    out, lse = segment_forward(q, mine, k, v, KeySet(mine), **kw)
    kv = torch.cat([k, v], dim=-1)
    for _, keys, piece in _pieces(plan, kv, ctx.group):
        kp, vp = _split(piece, k.shape[-1])
        o2, l2 = segment_forward(q, mine, kp, vp, keys, **kw)
        out, lse = merge(out, lse, o2, l2)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))  # +inf: saw nothing
    return out, lse


def _backward(q, k, v, out, lse, dout, ctx):
    plan, kw = ctx.plan, ctx.kwargs
    w, r, mine = plan.world, plan.rank, plan.mine
    acc = acc_dtype(q.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)
    dq, dk, dv = segment_backward(q, mine, k, v, KeySet(mine), kw["pattern"], lse, delta, dout,
                                  **{x: kw[x] for x in ("total", "scale", "token_index")})
    kv = torch.cat([k, v], dim=-1)
    d = k.shape[-1]
    returns = []
    for src, keys, piece in _pieces(plan, kv, ctx.group):
        kp, vp = _split(piece, d)
        dq_i, dk_i, dv_i = segment_backward(q, mine, kp, vp, keys, kw["pattern"], lse, delta, dout,
                                            **{x: kw[x] for x in ("total", "scale", "token_index")})
        dq += dq_i
        i = (r - src) % w
        back = plan.pair(r, (r + i) % w)  # what the rank this round sends to returns to us
        returns.append((back, Round(ctx.group, send=torch.cat([dk_i, dv_i], dim=-1), dst=src,
                                    recv_shape=[*kv.shape[:2], ranges_len(back), kv.shape[3]] if back else None,
                                    recv_like=dk, src=(r + i) % w, tag=_GRAD_TAG + i, kind="grad")))
    # rounds in which we only send keys (nobody sends us a piece back in that round from our side)
    got_rounds = {(r - s) % w for s in range(w) if s != r and plan.pair(s, r)}
    for i in range(1, w):
        back = plan.pair(r, (r + i) % w)
        if back and i not in got_rounds:
            returns.append((back, Round(ctx.group, recv_shape=[*kv.shape[:2], ranges_len(back), kv.shape[3]],
                                        recv_like=dk, src=(r + i) % w, tag=_GRAD_TAG + i, kind="grad")))
    for back, rnd in returns:
        g = rnd.wait()
        if g is None:
            continue
        base = 0
        for a, b in to_local(back, mine):
            dk[:, :, a:b] += g[:, :, base:base + b - a, :d]
            dv[:, :, a:b] += g[:, :, base:base + b - a, d:]
            base += b - a
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Ctx:
    def __init__(self, plan, group, kwargs):
        self.plan, self.group, self.kwargs = plan, group, kwargs


class _CPAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp):
        out, lse = _forward(q, k, v, cp)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp = cp
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.cp)
        return dq, dk, dv, None


# ------------------------------------------------------------------------------------ TopK
def _topk_selection(q, k, pattern: TopK, *, mine, total, group):
    """Per-token selection of this rank's queries against the global pooled keys, and the bool
    per key block of what they selected. Communicates the block sums (all-reduce)."""
    b, hkv, _, d = k.shape
    bs = pattern.block_size
    nb = -(-total // bs)
    acc = acc_dtype(q.dtype)
    sums = torch.zeros(b, hkv, nb, d, dtype=acc, device=k.device)
    if k.shape[2]:
        sums.index_add_(2, positions(mine, k.device) // bs, k.detach().to(acc))
    all_reduce_sum(sums, group, kind="stats")
    counts = torch.tensor([min(bs, total - n * bs) for n in range(nb)], dtype=acc, device=k.device)
    kbar = sums / counts[:, None]
    parts, row = [], 0
    for a, e in mine:
        nbq = -(-e // bs)
        parts.append(topk_token_index_pooled(q[:, :, row:row + e - a].detach(), kbar[:, :, :nbq], e, pattern))
        row += e - a
    token_index = torch.cat(parts, dim=2) if parts else torch.full((b, hkv, 0, pattern.topk), -1, dtype=torch.int32,
                                                                    device=q.device)
    picked = index_to_bool(token_index, nb).flatten(0, 2).any(dim=0).to(torch.uint8)
    return token_index, picked


def windows_from_chunks(chunks: torch.Tensor, c: int, size: int, stride: int, n: int) -> torch.Tensor:
    """Mean keys of windows `j < n` of `size` at `stride` from chunk sums `(B, Hkv, NC, D)` of `c` keys."""
    m, step = size // c, stride // c
    if n == 0:
        return chunks[:, :, :0]
    return chunks[:, :, :(n - 1) * step + m].unfold(2, m, step).sum(dim=-1) / size


def _chunk_ids(ranges, c: int, device) -> torch.Tensor:
    """Ids of the `c`-key chunks that hold a position of `ranges` (ascending, unique)."""
    return torch.unique(positions(ranges, device) // c)


def _infllmv2_selection(q, k, pattern: InfLLMv2, *, ranks, rank, total, group):
    """InfLLMv2's per-token picks of this rank's queries from the compressed keys of the whole
    sequence, and the bool per key block of what they selected. `ranks`: every rank's position
    ranges. Communicates the chunk sums: each rank all-gathers the sums of the chunks its keys
    fall in (a chunk cut by a shard boundary comes as two partial sums, added)."""
    b, hkv, _, d = k.shape
    ks, st, bs = pattern.kernel_size, pattern.kernel_stride, pattern.block_size
    c = math.gcd(ks, st)
    acc = acc_dtype(q.dtype)
    mine = ranks[rank]
    ids = [_chunk_ids(r, c, k.device) for r in ranks]
    local = torch.zeros(b, hkv, len(ids[rank]), d, dtype=acc, device=k.device)
    if k.shape[2]:  # chunk id -> its slot among this rank's chunks
        local.index_add_(2, torch.searchsorted(ids[rank], positions(mine, k.device) // c), k.detach().to(acc))
    parts = all_gather_padded(local, [len(x) for x in ids], group, dim=2, kind="stats")
    chunks = torch.zeros(b, hkv, -(-total // c), d, dtype=acc, device=k.device)
    for x, part in zip(ids, parts):
        chunks.index_add_(2, x, part)
    kc = windows_from_chunks(chunks, c, ks, st, num_windows(total, ks, st))
    kc2 = None
    if pattern.normalizer == "coarse":
        kc2 = windows_from_chunks(chunks, c, 4 * ks, 4 * st, num_windows(total, 4 * ks, 4 * st))
    nb = -(-total // bs)
    parts, row = [], 0
    for a, e in mine:  # rows a .. e-1 are end-aligned to e keys: what they may see
        n1, n2 = num_windows(e, ks, st), num_windows(e, 4 * ks, 4 * st)
        parts.append(token_index_from_compressed(q[:, :, row:row + e - a].detach(), kc[:, :, :n1],
                                                 None if kc2 is None else kc2[:, :, :n2], None, e, pattern))
        row += e - a
    token_index = torch.cat(parts, dim=2) if parts else torch.full((b, hkv, 0, pattern.topk), -1, dtype=torch.int32,
                                                                    device=q.device)
    picked = index_to_bool(token_index, nb).flatten(0, 2).any(dim=0).to(torch.uint8)
    return token_index, picked


def _all_need(picked, world, group):
    parts = all_gather_padded(picked[None], [1] * world, group, dim=0, kind="stats")
    return [p[0].bool().tolist() for p in parts]


# ------------------------------------------------------------------------------------ public
def _check(q, k, v, pattern, gate, backend, transport):
    check_qkv(q, k, v)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be one of Dense, SlidingWindow, BlockSparse, TopK; got {type(pattern).__name__}")
    if isinstance(pattern, WindowLinear):
        raise ValueError("cp_attention does not run WindowLinear: its linear memory of the evicted keys is not "
                         "sharded yet; run SlidingWindow with cp_attention and the memory with cp_linear_attention")
    if not isinstance(pattern, SOFTMAX_PATTERNS + (InfLLMv2,)):
        raise TypeError(f"pattern must be one of Dense, SlidingWindow, BlockSparse, TopK, InfLLMv2; got "
                        f"{type(pattern).__name__}")
    if gate is not None:
        raise ValueError(f"gate is only used by WindowLinear, not by {type(pattern).__name__}")
    if backend not in (None, "reference"):
        raise ValueError(f"backend={backend!r}: cp_attention computes its pieces with the positioned chunked "
                         f"softmax (plain PyTorch, any device); use backend=None or 'reference'")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"cp_attention takes local shards of one sequence (prefill / training): q and k must "
                         f"have the same local length, got {q.shape[2]} and {k.shape[2]}")


def _prepare(q, k, v, pattern, group, layout, scale, transport):
    world, rank = group_info(group)
    total = global_length(q.shape[2], group, q.device)
    mine_len = ranges_len(rank_ranges(total, world, rank, layout))
    if q.shape[2] != mine_len:
        raise ValueError(f"q has local length {q.shape[2]}, but rank {rank} of a {layout} layout of {total} tokens "
                         f"over {world} ranks holds {mine_len} (use sparse_attn.distributed.shard)")
    check_pattern(pattern, q_heads=q.shape[1], kv_heads=k.shape[1], batch=q.shape[0], sq=total, sk=total,
                  gate=None, device=q.device)
    sc = check_scale(scale, q.shape[3])
    token_index, need = None, None
    if isinstance(pattern, InfLLMv2):
        pattern = pattern.clamped(total)  # Dense below dense_len (the full length decides)
    if isinstance(pattern, InfLLMv2):
        token_index, picked = _infllmv2_selection(
            q, k, pattern, ranks=[rank_ranges(total, world, r, layout) for r in range(world)], rank=rank,
            total=total, group=group)
        need = _all_need(picked, world, group)
        pattern = pattern.attention_view()  # the attention of the picks: TopK's, with this index
    elif isinstance(pattern, TopK):
        token_index, picked = _topk_selection(q, k, pattern, mine=rank_ranges(total, world, rank, layout),
                                              total=total, group=group)
        need = _all_need(picked, world, group)
    plan = build_plan(pattern, world=world, rank=rank, total=total, layout=layout, q_shape=q.shape,
                      k_shape=k.shape, v_shape=v.shape, dtype=q.dtype, device=q.device, topk_need=need,
                      transport=transport)
    kwargs = dict(pattern=pattern, total=total, scale=sc, token_index=token_index)
    return _Ctx(plan, group, kwargs)


def cp_plan(q, k, v, pattern, *, group=None, layout="zigzag", scale=None, transport=None) -> FetchPlan:
    """The fetch plan `cp_attention` would run (collective: every rank must call it; TopK runs its
    selection to know what to fetch). `.explain()` prints who fetches what and the transport choice."""
    check_layout(layout)
    _check(q, k, v, pattern, None, None, transport)
    return _prepare(q, k, v, pattern, group, layout, scale, transport).plan


def cp_attention(q, k, v, pattern, *, group=None, layout="zigzag", scale=None, gate=None, backend=None,
                 transport=None) -> torch.Tensor:
    """Context-parallel softmax attention (collective: every rank of `group` calls it).

    Args:
        q: this rank's shard `(B, Hq, S_local, D)` of the full queries (`shard(q_full, layout=...)`).
        k, v: this rank's shards `(B, Hkv, S_local, D)`, `(B, Hkv, S_local, Dv)`; `Hq % Hkv == 0`.
        pattern: Dense, SlidingWindow, BlockSparse (layout over the FULL sequence), TopK or InfLLMv2.
        group: the process group (default: the world).
        layout: "zigzag" (causal work balanced) or "contiguous": how the shards were cut.
        scale: softmax scale, default `D ** -0.5`.
        gate: WindowLinear only, which cp_attention refuses (ValueError).
        backend: None or "reference" (the positioned chunked softmax computes every piece).
        transport: None (cost model), "ring" or "allgather".
    Returns:
        `(B, Hq, S_local, Dv)` in q's dtype: this rank's rows of `attention(q_full, k_full, v_full,
        pattern)`. Differentiable in q, k, v (dk/dv of remote pieces are returned to their owners).
    """
    check_layout(layout)
    _check(q, k, v, pattern, gate, backend, transport)
    ctx = _prepare(q, k, v, pattern, group, layout, scale, transport)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _CPAttentionFn.apply(q, k, v, ctx)
    out, _ = _forward(q, k, v, ctx)
    return out.to(q.dtype)

