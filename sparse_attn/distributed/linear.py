"""`cp_linear_attention`: linear attention over a sequence sharded across ranks.

Each rank runs its chunks from a zero state (any `linear_attention` kernel), then the chunks'
final states and total log-decays are all-gathered (`(D * Dv + 1)` numbers per chunk, head and
sequence: O(D x Dv) per rank, independent of the length) and every rank scans them in sequence
order to get the state entering each of its chunks. Since the recurrence is linear in its state,
the output of a chunk started from `S0` is the zero-state output plus `scale * exp(G_t) q_t^T S0`,
where `G_t` is the cumulative log-decay from the chunk's start to `t`: one matrix product per chunk
corrects it. The backward is autograd through these steps; the all-gather's backward all-reduces
the state gradients and hands each rank those of its own chunks.

`cp_delta_rule` (delta.py) scans `(M, B)` pairs instead: its chunk transition is a `D x D` matrix.
"""
from __future__ import annotations

import torch

from ..api.linear import _check_linear, linear_attention
from ..scheduler.problem import check_scale
from .sharding import chunk_bounds, check_layout, global_length, group_info, rank_ranges, ranges_len
from .transport import AllGatherFn


def _chunk_ids(world: int, rank: int, layout: str) -> list[int]:
    return [rank, 2 * world - 1 - rank] if layout == "zigzag" else [rank]


def _cum_decay(decay, kind, b, h, rows, device, dtype):
    """Cumulative log-decay `G_t` `(B, H, rows)` from the chunk start (inclusive of `t`)."""
    if kind == "none":
        return torch.zeros(b, h, rows, dtype=dtype, device=device)
    if kind == "per-head":
        steps = torch.arange(1, rows + 1, dtype=dtype, device=device)
        return (decay.to(dtype)[:, None] * steps[None, :])[None].expand(b, h, rows)
    return torch.cumsum(decay.to(dtype), dim=-1)


def cp_linear_attention(q, k, v, *, decay=None, group=None, layout="contiguous", scale=None, initial_state=None,
                        return_state=False, backend=None):
    """Context-parallel `linear_attention` (collective: every rank of `group` calls it).

    Args:
        q, k, v: this rank's shards `(B, H, S_local, D)`, `(B, Hk, S_local, D)`, `(B, Hk, S_local, Dv)`
            of the full sequence, cut by `layout` ("contiguous" or "zigzag").
        decay: None, `(H,)` per-head log-decays (same on every rank), or this rank's shard
            `(B, H, S_local)` of per-token log-decays.
        initial_state: `(B, H, D, Dv)` state before the first token (same on every rank), or None.
        return_state: also return the state after the last token `(B, H, D, Dv)` (on every rank).
        backend: passed to the local `linear_attention` calls.
    Returns:
        this rank's rows `(B, H, S_local, Dv)` of `linear_attention(full q, full k, full v, ...)`
        (and the final state). Differentiable in q, k, v, decay and initial_state.
    """
    check_layout(layout)
    kind = _check_linear(q, k, v, decay, initial_state)
    world, rank = group_info(group)
    b, h, s_loc, d = q.shape
    dv = v.shape[3]
    sc = check_scale(scale, d)
    total = global_length(s_loc, group, q.device)
    if s_loc != ranges_len(rank_ranges(total, world, rank, layout)):
        raise ValueError(f"q has local length {s_loc}, but rank {rank} of a {layout} layout of {total} tokens over "
                         f"{world} ranks holds {ranges_len(rank_ranges(total, world, rank, layout))}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_chunks = 2 * world if layout == "zigzag" else world
    bounds = chunk_bounds(total, n_chunks)
    ids = _chunk_ids(world, rank, layout)

    outs, packs, row = [], [], 0
    for c in ids:
        a, e = bounds[c]
        n = e - a
        sl = slice(row, row + n)
        dec = decay if kind != "per-token" else decay[:, :, sl]
        if n:
            o, st = linear_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], decay=dec, scale=sc, return_state=True,
                                     backend=backend)
            g = _cum_decay(dec, kind, b, h, n, q.device, acc)
            g_tot = g[:, :, -1]
        else:
            o = q.new_zeros(b, h, 0, dv)
            st = torch.zeros(b, h, d, dv, dtype=acc, device=q.device)
            g = torch.zeros(b, h, 0, dtype=acc, device=q.device)
            g_tot = torch.zeros(b, h, dtype=acc, device=q.device)
        outs.append((o, g, sl))
        packs.append(torch.cat([st.to(acc).flatten(2), g_tot[..., None]], dim=-1))  # (B, H, D*Dv + 1)
        row += n
    gathered = AllGatherFn.apply(torch.stack(packs), group, "state")  # (W, n_local, B, H, D*Dv + 1)
    where = {c: (r, j) for r in range(world) for j, c in enumerate(_chunk_ids(world, r, layout))}

    state = (torch.zeros(b, h, d, dv, dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    entering = {}
    for c in range(n_chunks):
        entering[c] = state
        r, j = where[c]
        pack = gathered[r, j]
        state = torch.exp(pack[..., -1])[..., None, None] * state + pack[..., :-1].view(b, h, d, dv)

    parts = []
    for c, (o, g, sl) in zip(ids, outs):
        if o.shape[2] == 0:
            parts.append(o)
            continue
        fix = torch.matmul(q[:, :, sl].to(acc), entering[c]) * (sc * torch.exp(g))[..., None]
        parts.append((o.to(acc) + fix).to(q.dtype))
    out = torch.cat(parts, dim=2) if parts else q.new_zeros(b, h, 0, dv)
    return (out, state) if return_state else out
