"""`cp_delta_rule`: the delta rule over a sequence sharded across ranks.

The delta rule is affine in its state: over a chunk, `S_end = M S_0 + B` with `M` a `D x D`
matrix (the product of the chunk's `(I - beta_t k_t k_t^T) diag(exp g_t)`) and `B` the state the
chunk reaches from zero. The columns of the state evolve independently (each value column sees the
same k, beta and decay), so ONE local call with `D` extra value columns set to zero and an initial
state `[0 | I]` gives both: its final state is `[B | M]`, and its extra output columns are
`scale * M_t^T q_t` per token, so the output of the chunk started from `S_0` is the zero-state
output plus `(extra columns) @ S_0` (no second pass). The `(M, B)` pairs are all-gathered
(`D * (D + Dv)` numbers per chunk and value head: independent of the length), every rank scans them in
sequence order for the state entering each of its chunks, and corrects its outputs. The backward
is autograd through these steps (the all-gather's backward all-reduces the pairs' gradients).

Cost against one process: each rank's local call carries `Dv + D` value columns instead of `Dv`.
"""
from __future__ import annotations

import torch

from ..api.delta import check_delta, delta_rule
from ..scheduler.problem import check_scale
from .linear import _chunk_ids
from .sharding import chunk_bounds, check_layout, global_length, group_info, rank_ranges, ranges_len
from .transport import AllGatherFn


def cp_delta_rule(q, k, v, beta, *, decay=None, group=None, layout="contiguous", scale=None, initial_state=None,
                  return_state=False, qk_l2norm=False, backend=None):
    """Context-parallel `delta_rule` (collective: every rank of `group` calls it).

    Args:
        q, k: this rank's shards `(B, Hk, S_local, D)`; v: `(B, Hv, S_local, Dv)`; beta: `(B, Hv, S_local)`;
            all cut from the full sequence by `layout` ("contiguous" or "zigzag", see `shard`).
        decay: None, or this rank's shard of `(B, Hv, S)` (Gated DeltaNet) or `(B, Hv, S, D)` (KDA)
            log-decays.
        initial_state: `(B, Hv, D, Dv)` state before the first token (the same on every rank), or None.
        return_state: also return the state after the last token `(B, Hv, D, Dv)` (on every rank).
        qk_l2norm, scale, backend: as for `delta_rule` (backend picks the local kernels).
    Returns:
        this rank's rows `(B, Hv, S_local, Dv)` of `delta_rule(full q, k, v, beta, ...)` (and the
        final state). Differentiable in q, k, v, beta, decay and initial_state.
    """
    check_layout(layout)
    check_delta(q, k, v, beta, decay, initial_state)
    world, rank = group_info(group)
    b, hk, s_loc, d = q.shape
    hv, dv = v.shape[1], v.shape[3]
    sc = check_scale(scale, d)
    total = global_length(s_loc, group, q.device)
    held = ranges_len(rank_ranges(total, world, rank, layout))
    if s_loc != held:
        raise ValueError(f"q has local length {s_loc}, but rank {rank} of a {layout} layout of {total} tokens over "
                         f"{world} ranks holds {held}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_chunks = 2 * world if layout == "zigzag" else world
    bounds = chunk_bounds(total, n_chunks)
    ids = _chunk_ids(world, rank, layout)
    # initial state [0 | I]: the extra columns carry the chunk's transition M
    seed = torch.cat([torch.zeros(d, dv, dtype=acc, device=q.device),
                      torch.eye(d, dtype=acc, device=q.device)], dim=1).expand(b, hv, d, dv + d).contiguous()

    locals_, packs, row = [], [], 0
    for c in ids:
        n = bounds[c][1] - bounds[c][0]
        sl = slice(row, row + n)
        row += n
        if n == 0:
            locals_.append(None)
            packs.append(seed.flatten(2))  # M = I, B = 0
            continue
        vx = torch.cat([v[:, :, sl], v.new_zeros(b, hv, n, d)], dim=-1)
        ox, st = delta_rule(q[:, :, sl], k[:, :, sl], vx, beta[:, :, sl],
                            decay=None if decay is None else decay[:, :, sl], scale=sc, initial_state=seed,
                            return_state=True, qk_l2norm=qk_l2norm, backend=backend)
        locals_.append(ox)
        packs.append(st.to(acc).flatten(2))  # (B, Hv, D * (Dv + D)): rows of [B | M]
    gathered = AllGatherFn.apply(torch.stack(packs), group, "state")  # (W, n_local, B, Hv, D * (Dv + D))
    where = {c: (r, j) for r in range(world) for j, c in enumerate(_chunk_ids(world, r, layout))}

    state = (torch.zeros(b, hv, d, dv, dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    entering = {}
    for c in range(n_chunks):
        entering[c] = state
        r, j = where[c]
        bm = gathered[r, j].view(b, hv, d, dv + d)
        state = torch.matmul(bm[..., dv:], state) + bm[..., :dv]

    parts = []
    for c, ox in zip(ids, locals_):
        if ox is None:
            continue
        fix = torch.matmul(ox[..., dv:].to(acc), entering[c])  # (scale M_t^T q_t)^T S_0
        parts.append((ox[..., :dv].to(acc) + fix).to(v.dtype))
    out = torch.cat(parts, dim=2) if parts else v.new_zeros(b, hv, 0, dv)
    return (out, state) if return_state else out
