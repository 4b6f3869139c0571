"""TopK block selection in plain PyTorch (the portable path; fast backends bring their own).

Follows the contract: pooled keys `kbar` (mean of each block, the last one partial), scores
`s[n] = mean over the group's heads of q_h . kbar[n]`, forced sink/local blocks, and the `topk`
best of the remaining blocks `n < pb`. Scores are computed in float32 (float64 for float64
inputs) whatever the input dtype, query chunk by query chunk, so memory is `chunk x nblocks`,
never `Sq x Sk` and never `Sq x nblocks` at once.
"""
from __future__ import annotations

import torch

from ..patterns import TopK
from .block_layout import index_to_bool

#: query rows scored at once are chosen so one chunk of scores holds about this many elements
_SCORE_CHUNK_ELEMS = 1 << 22


#: elements of K pooled by one reduction: large enough to amortise the call, small enough that the
#: reduction's float32 temporaries come from the allocator's cache (a fresh multi-MB buffer costs
#: page faults every call; measured 2^18 ~4x faster than converting all of K at once at 16K keys)
_POOL_CHUNK_ELEMS = 1 << 18


def pooled_keys(k: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean key of each block: `(B, Hkv, ceil(Sk/bs), D)` in `dtype`; the last block may be partial.

    K is read once in its own dtype and summed with `dtype` accumulation, a few blocks at a time:
    no float32 copy of K (at decode, pooling all of K is the selection's whole cost)."""
    b, h, sk, d = k.shape
    nb = -(-sk // block_size)
    full = sk // block_size
    out = torch.empty(b, h, nb, d, dtype=dtype, device=k.device)
    if full > 0:
        kb = k[:, :, :full * block_size].unflatten(2, (full, block_size))  # a view when k's rows are dense
        # chunks on a CPU only: on a GPU one reduction reads K at full bandwidth, and 2^18-element
        # chunks were ~4096 launches at 128K keys x B 8 (TopK decode took 32 ms on an H200, 2026-12-04)
        step = max(1, _POOL_CHUNK_ELEMS // max(1, b * h * block_size * d)) if k.device.type == "cpu" else full
        for n0 in range(0, full, step):
            n1 = min(full, n0 + step)
            torch.sum(kb[:, :, n0:n1], dim=3, dtype=dtype, out=out[:, :, n0:n1])
        out[:, :, :full].div_(block_size)
    if full < nb:  # the partial last block
        last = k[:, :, full * block_size:]
        torch.sum(last, dim=2, dtype=dtype, out=out[:, :, full])
        out[:, :, full].div_(last.shape[2])
    return out


def group_mean_queries(q: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """`(B, Hq, Sq, D)` -> mean over each GQA group `(B, Hkv, Sq, D)`; the group score is linear in q."""
    b, hq, sq, d = q.shape
    return q.to(dtype).view(b, kv_heads, hq // kv_heads, sq, d).mean(dim=2)


def rank_scores(scores: torch.Tensor) -> torch.Tensor:
    """Block scores as the selection ranks them: NaN first (as `torch.topk`; the row then sees the
    NaN key and comes out NaN, never finite and wrong), a `-inf` score last among the candidates but
    above the non-candidates (which the caller sets to `-inf`), so it is still taken when at most
    `topk` candidates exist."""
    return torch.nan_to_num(scores, nan=float("inf"), posinf=float("inf"), neginf=torch.finfo(scores.dtype).min)


def top_blocks(scores: torch.Tensor, candidates: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` best candidate blocks of each row of `scores` `(..., N)`: int32 `(..., width)`,
    ascending, -1 padded where fewer candidates exist. Ranked by :func:`rank_scores`; equal scores
    go to the lower block index (the contract's rule for InfLLMv2, kept for TopK by every backend:
    the CPU and Triton selections pick the same blocks), so tied NaN scores select alike everywhere."""
    nb = scores.shape[-1]
    ranked = rank_scores(scores).masked_fill(~candidates, float("-inf"))
    # torch.topk orders ties freely and a stable sort of the whole row costs ~17x more, so: topk's
    # blocks above its width-th value `cut` are right; those equal to `cut` are replaced by the
    # lowest-indexed blocks equal to it (`room` of them, none where `cut` is a non-candidate's -inf)
    val, idx = torch.topk(ranked, width, dim=-1, sorted=False)
    cut = val.amin(dim=-1, keepdim=True)
    over = val > cut
    above = torch.where(over, idx, nb)
    room = width - over.sum(dim=-1, keepdim=True)
    order = torch.arange(nb, device=scores.device, dtype=torch.float32)  # exact below 2^24 blocks
    lowest = torch.topk(torch.where(ranked == cut, order, float("inf")), width, dim=-1, largest=False).indices
    keep = (torch.arange(width, device=scores.device) < room) & (cut > float("-inf"))
    key = torch.cat([above, torch.where(keep, lowest, nb)], dim=-1)
    key = torch.topk(key, width, dim=-1, largest=False).values  # ascending, nb where fewer candidates
    return torch.where(key == nb, -1, key).to(torch.int32)


def topk_token_index(q: torch.Tensor, k: torch.Tensor, pattern: TopK) -> torch.Tensor:
    """Per-token selected blocks beyond the forced ones: int32 `(B, Hkv, Sq, topk)`, ascending, -1 padded."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    nb = -(-sk // bs)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    width = min(pattern.topk, nb)
    if width == 0 or sq == 0 or b == 0 or hkv == 0:
        return torch.full((b, hkv, sq, pattern.topk), -1, dtype=torch.int32, device=q.device)
    return topk_token_index_pooled(q, pooled_keys(k, bs, acc), sk, pattern)


def topk_token_index_pooled(q: torch.Tensor, kbar: torch.Tensor, qpos, pattern: TopK) -> torch.Tensor:
    """:func:`topk_token_index` from the pooled keys `kbar` `(B, Hkv, N, D)` (float32, or float64 for
    float64 queries): for callers that pool K their own way (a native kernel, a cache that keeps the
    block sums of its keys). `qpos`: the query rows' absolute positions, an int `Sk` (rows
    end-aligned to `Sk` keys) or a tensor `(B or 1, Sq)` (a cache: each sequence's rows end-aligned
    to its own length). Candidate blocks lie strictly below a row's own block, so they are complete
    whenever `kbar` holds the means of the keys present: the contract's selection."""
    b, hq, sq, d = q.shape
    hkv, nb = kbar.shape[1], kbar.shape[2]
    bs = pattern.block_size
    acc = kbar.dtype
    width = min(pattern.topk, nb)
    out = torch.full((b, hkv, sq, pattern.topk), -1, dtype=torch.int32, device=q.device)
    if width == 0 or sq == 0 or b == 0 or hkv == 0:
        return out
    if not isinstance(qpos, torch.Tensor):
        qpos = torch.arange(qpos - sq, qpos, device=q.device)[None]
    qbar = group_mean_queries(q, hkv, acc)  # (B, Hkv, Sq, D)
    blocks = torch.arange(nb, device=q.device)
    rows = max(1, _SCORE_CHUNK_ELEMS // max(1, b * hkv * nb))
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        pb = (qpos[:, r0:r1] // bs)[:, None, :, None]  # (B or 1, 1, r, 1)
        # candidates: not a sink, strictly before the local blocks
        cand = (blocks >= pattern.sink_blocks) & (blocks <= pb - pattern.local_blocks)
        scores = torch.matmul(qbar[:, :, r0:r1], kbar.transpose(-1, -2))  # (B, Hkv, r, N)
        out[:, :, r0:r1, :width] = top_blocks(scores, cand, width)
    return out


def topk_index_over_cache(q: torch.Tensor, view, pattern: TopK) -> torch.Tensor:
    """TopK's per-token selection over a KV cache's read view (`KVView`): int32 `(B, Hkv, Sq, topk)`
    as :func:`topk_token_index`, from the block means the cache keeps (O(blocks): K is not read),
    each sequence's rows end-aligned to its own length."""
    nb = -(-view.max_length // pattern.block_size)
    with torch.no_grad():
        return topk_token_index_pooled(q.detach(), view.pooled_keys(nb),
                                       query_positions(view.lengths, q.shape[2]), pattern)


def query_positions(lengths: torch.Tensor, sq: int) -> torch.Tensor:
    """Absolute positions `(B, Sq)` of `Sq` query rows end-aligned to each sequence's length (device)."""
    return lengths.long()[:, None] - sq + torch.arange(sq, device=lengths.device)[None, :]


def select_blocks_mask(q: torch.Tensor, k: torch.Tensor, pattern: TopK) -> torch.Tensor:
    """The full selection (forced + top-k) as bool `(B, Hkv, Sq, ceil(Sk/bs))`, for inspection."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    nb = -(-sk // bs)
    sel = index_to_bool(topk_token_index(q, k, pattern), nb)
    pos = torch.arange(sk - sq, sk, device=q.device)[None]
    return pattern.candidate_blocks(pos, nb, bs, selected=sel).expand(b, hkv, sq, nb)
