"""InfLLM-V2 block selection in plain PyTorch (the portable path; csrc/cpu/infllmv2_select.cpp is the CPU one).

Follows the contract's "InfLLMv2 semantics" steps 2-5, a chunk of query rows at a time: the
compressed keys (means of `kernel_size` windows at `kernel_stride`, and 4x both for the coarse
normaliser) are built once per call (`Sk / stride` rows, never `Sk` x anything); per chunk the
coarse logsumexp of each (row, head), then the fine kernel scores, summed over the GQA group, pooled
onto blocks and ranked. The largest intermediate is `B x Hq x rows x Sk/stride` (about
`_SCORE_CHUNK_ELEMS`), never `Sq x Sk` nor `Sq x Sk/stride`. Float32 arithmetic (float64 for
float64 inputs); the selection gets no gradient.
"""
from __future__ import annotations

import torch

from ..patterns.infllmv2 import InfLLMv2
from .block_layout import index_to_bool
from .topk_selection import query_positions

#: kernel scores of one chunk (B * Hq * rows * kernels)
_SCORE_CHUNK_ELEMS = 1 << 22


def compressed_keys(k: torch.Tensor, size: int, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """`kc[j] = mean(k[j*stride : j*stride + size])` for every complete window: `(B, Hkv, N, D)` in `dtype`.

    When `size` is a multiple of `stride` (the models: 32 / 16, and the coarse 128 / 64) K is read once,
    as contiguous `stride`-row sums, and each window adds `size / stride` of them; else a strided
    reduction per window (reads each key `size / stride` times)."""
    b, h, sk, d = k.shape
    n = (sk - size) // stride + 1 if sk >= size else 0
    if n == 0:
        return k.new_zeros(b, h, 0, d, dtype=dtype)
    if size % stride == 0:
        m = size // stride
        chunks = n + m - 1  # stride-row chunks the windows cover
        sums = k[:, :, :chunks * stride].unflatten(2, (chunks, stride)).sum(dim=3, dtype=dtype)
        out = sums[:, :, :n].clone()
        for i in range(1, m):
            out += sums[:, :, i:i + n]
        return out.div_(size)
    windows = k.unfold(2, size, stride)  # (B, H, N, D, size), a view
    return windows.sum(dim=-1, dtype=dtype).div_(size)


def num_windows(length: int, size: int, stride: int) -> int:
    """Complete `size`-token windows at `stride` in `length` keys."""
    return (length - size) // stride + 1 if length >= size else 0


def kernel_ends(n: int, size: int, stride: int, device) -> torch.Tensor:
    """Last key position of each of `n` kernels: kernel `j` is visible to `p` iff `end[j] <= p`."""
    return torch.arange(n, device=device) * stride + (size - 1)


def pool_to_blocks(s: torch.Tensor, ratio: int, num_blocks: int) -> torch.Tensor:
    """Step 4: `score[b] = max s[j]` over the kernels `j in [ratio*b - 1, ratio*b + ratio)` that
    exist (those that overlap block `b` at `kernel_size = 2 * stride`); `s >= 0`, so a missing
    kernel is padded with 0. `s` `(..., N)` -> `(..., num_blocks)`."""
    padded = s.new_zeros(*s.shape[:-1], ratio * num_blocks + 1)
    n = min(s.shape[-1], ratio * num_blocks)
    padded[..., 1:1 + n] = s[..., :n]
    return padded.unfold(-1, ratio + 1, ratio).amax(dim=-1)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """NaN ranks first (as TopK's selection: the row then sees the NaN and comes out NaN)."""
    return torch.where(torch.isnan(scores), torch.full_like(scores, float("inf")), scores)


def _group_matmul(qg: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
    """`qg` `(B, Hkv, G, r, D)` times `kc` `(B, Hkv, N, D)` transposed -> `(B, Hkv, G, r, N)`, the
    group's rows stacked into one product per kv head (a broadcast over G would copy kc G times)."""
    b, hkv, g, r, d = qg.shape
    return torch.matmul(qg.reshape(b, hkv, g * r, d), kc.transpose(-1, -2)).view(b, hkv, g, r, -1)


def group_kernel_scores(qg, kc, kc2, pos, pattern: InfLLMv2, scale: float, *, kc_scale: float = 1.0,
                        kc2_scale: float = 1.0, min_pos: int | None = None) -> torch.Tensor:
    """Step 3 for a chunk: `S[j] = sum_h exp(scale q_h . kc[j] - LSE_h)` on visible kernels.

    `qg` `(B, Hkv, G, r, D)`, `kc` `(B, Hkv, N, D)`, `kc2` `(B, Hkv, N2, D)` (coarse; unused for
    "exact"), `pos` `(B or 1, r)` absolute positions. The compressed keys are `kc * kc_scale` and
    `kc2 * kc2_scale` (a cache keeps window sums: the scale `1 / size` joins the query's instead of
    copying them). `min_pos`: the lowest position of `pos` when the caller knows it on the host
    (then kernels every row sees need no mask: a decode step's). Returns `(B, Hkv, r, N)`."""
    ks, st = pattern.kernel_size, pattern.kernel_stride

    def mask_of(n, size, stride):  # None: every row sees every kernel
        if min_pos is not None and (n == 0 or (n - 1) * stride + size - 1 <= min_pos):
            return None
        return (kernel_ends(n, size, stride, kc.device) <= pos[..., None])[:, None, None]  # (B', 1, 1, r, N)

    vis = mask_of(kc.shape[2], ks, st)
    fine = _group_matmul(qg * (scale * kc_scale), kc)  # (B, Hkv, G, r, N)
    if pattern.normalizer == "coarse":
        vis2 = mask_of(kc2.shape[2], 4 * ks, 4 * st)
        coarse = _group_matmul(qg * (scale * kc2_scale), kc2)
        lse = torch.logsumexp(coarse if vis2 is None else coarse.masked_fill_(~vis2, float("-inf")), dim=-1)
    else:
        lse = torch.logsumexp(fine if vis is None else fine.masked_fill(~vis, float("-inf")), dim=-1)
    # no visible normalising kernel: every score is 0 (exp(x - inf))
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    p = fine.sub_(lse[..., None]).exp_()
    if vis is not None:
        p.masked_fill_(~vis, 0.0)
    return p.sum(dim=2)


def infllmv2_token_index(q: torch.Tensor, k: torch.Tensor, pattern: InfLLMv2) -> torch.Tensor:
    """Per-token blocks picked by the scores (forced ones not included): int32 `(B, Hkv, Sq, topk)`,
    ascending, -1 padded; rows end-aligned to `Sk`. For a sparse call (the caller applies the
    `dense_len` switch)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ks, st = pattern.kernel_size, pattern.kernel_stride
    kc = compressed_keys(k, ks, st, acc)
    kc2 = compressed_keys(k, 4 * ks, 4 * st, acc) if pattern.normalizer == "coarse" else None
    return token_index_from_compressed(q, kc, kc2, None, k.shape[2], pattern)


def token_index_from_compressed(q: torch.Tensor, kc: torch.Tensor, kc2: torch.Tensor | None, qpos,
                                sk: int, pattern: InfLLMv2, *, kc_scale: float = 1.0,
                                kc2_scale: float = 1.0, min_pos: int | None = None) -> torch.Tensor:
    """Steps 3-5 from compressed keys: int32 `(B, Hkv, Sq, topk)` picks, ascending, -1 padded.

    `kc` `(B, Hkv, N, D)` / `kc2` (None for "exact") in float32 (float64 for float64 q), times
    `kc_scale` / `kc2_scale` (see `group_kernel_scores`); every window the rows may see must be
    among them (more are fine: visibility is by position). `qpos`: absolute positions
    `(B or 1, Sq)`, or None for rows end-aligned to `sk` (then a chunk scores only the kernels and
    blocks its last row can see: causal prefill does about half the work). `min_pos`: the lowest
    row position when known on the host (see `group_kernel_scores`)."""
    b, hq, sq, d = q.shape
    hkv = kc.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bs = pattern.block_size
    ks, st = pattern.kernel_size, pattern.kernel_stride
    nb = -(-sk // bs)
    width = min(pattern.topk, nb)
    out = torch.full((b, hkv, sq, pattern.topk), -1, dtype=torch.int32, device=q.device)
    if width == 0 or sq == 0 or b == 0 or hkv == 0:
        return out
    aligned = qpos is None  # rows end-aligned to Sk: a chunk's reach is known on the host
    if aligned:
        qpos = torch.arange(sk - sq, sk, device=q.device)[None]
    g = hq // hkv
    scale = d ** -0.5  # the selection's scale is the contract's, whatever the attention's
    slots = torch.arange(width, device=q.device)
    n = max(kc.shape[2], 1) + (kc2.shape[2] if kc2 is not None else 0)
    rows = max(1, min(256, _SCORE_CHUNK_ELEMS // max(1, b * hq * n)))
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        pos = qpos[:, r0:r1]
        qg = q[:, :, r0:r1].to(acc).view(b, hkv, g, r1 - r0, d)
        n1, n2, nbc = kc.shape[2], (kc2.shape[2] if kc2 is not None else 0), nb
        if aligned:  # only what the chunk's last row can see (causal: ~half the work of prefill)
            last = sk - sq + r1 - 1
            n1 = min(n1, max(0, (last - ks + 1) // st + 1))
            n2 = min(n2, max(0, (last - 4 * ks + 1) // (4 * st) + 1))
            nbc = last // bs + 1
        s = group_kernel_scores(qg, kc[:, :, :n1], None if kc2 is None else kc2[:, :, :n2], pos, pattern, scale,
                                kc_scale=kc_scale, kc2_scale=kc2_scale,
                                min_pos=(sk - sq + r0) if aligned else min_pos)
        score = _rank(pool_to_blocks(s, pattern.pool_ratio, nbc))  # (B, Hkv, r, nbc)
        blocks = torch.arange(nbc, device=q.device)
        qb = (pos // bs)[:, None, :, None]  # (B', 1, r, 1)
        cand = (blocks >= pattern.forced_init) & (blocks <= qb - pattern.window_blocks)
        score = score.masked_fill(~cand, float("-inf"))
        # highest first, ties to the lower block index (stable sort)
        val, idx = torch.sort(score, dim=-1, descending=True, stable=True)
        w = min(width, nbc)
        val, idx = val[..., :w], idx[..., :w]
        keep = (slots[:w] < pattern.extra_blocks(qb)) & ~torch.isneginf(val)
        idx = torch.where(keep, idx, torch.full_like(idx, nb))
        idx = torch.sort(idx, dim=-1).values
        out[:, :, r0:r1, :w] = torch.where(idx == nb, torch.full_like(idx, -1), idx).to(torch.int32)
    return out


def infllmv2_select_mask(q: torch.Tensor, k: torch.Tensor, pattern: InfLLMv2) -> torch.Tensor:
    """The whole selection (forced and picked, or every causal block when the call is dense) as
    bool `(B, Hkv, Sq, ceil(Sk/bs))`, for inspection (`select_blocks`)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    nb = -(-sk // bs)
    pos = torch.arange(sk - sq, sk, device=q.device)[None]
    if pattern.is_dense_causal_for(sq, sk):
        blocks = torch.arange(nb, device=q.device)
        return (blocks <= (pos // bs)[..., None])[:, None].expand(b, hkv, sq, nb).contiguous()
    sel = index_to_bool(infllmv2_token_index(q, k, pattern), nb)
    return pattern.candidate_blocks(pos, nb, bs, selected=sel).expand(b, hkv, sq, nb).contiguous()


def infllmv2_picks_over_cache(q: torch.Tensor, view, pattern: InfLLMv2) -> torch.Tensor:
    """The picks of steps 3-5 over a cache's window sums, in PyTorch (any device): int32
    `(B, Hkv, Sq, topk)`, ascending, -1 padded, each sequence's rows end-aligned to its own length.
    The definition `csrc/cpu/infllmv2_decode.cpp` (the CPU decode's) is tested against."""
    sq = q.shape[2]
    sk = view.max_length
    ks, st = pattern.kernel_size, pattern.kernel_stride
    qpos = query_positions(view.lengths, sq)
    kc = view.window_sums(ks, st)[:, :, :num_windows(sk, ks, st)]
    kc2 = None
    if pattern.normalizer == "coarse":
        kc2 = view.window_sums(4 * ks, 4 * st)[:, :, :num_windows(sk, 4 * ks, 4 * st)]
    return token_index_from_compressed(q, kc, kc2, qpos, sk, pattern, kc_scale=1.0 / ks, kc2_scale=0.25 / ks,
                                       min_pos=min(view.host_lengths) - sq)


def infllmv2_index_over_cache(q: torch.Tensor, view, pattern: InfLLMv2, *, picks=None) -> torch.Tensor:
    """InfLLMv2's per-token picks over a KV cache's read view (`KVView`), each sequence's rows
    end-aligned to its own length: int32 `(B, Hkv, Sq, W)`, ascending, -1 padded, the blocks
    beyond the forced ones (`pattern.attention_view()`'s sink and local blocks).

    Read from the window sums the cache keeps (`KVView.window_sums`: O(blocks) per step, K is not
    read), by `picks(q, view, pattern)` (default `infllmv2_picks_over_cache`, PyTorch; the CPU
    decode passes its C++ one). The `dense_len` switch follows each sequence's own length (its
    total keys): a sequence below it lists every causal block that is not forced (then
    `W = max(topk, blocks)`), so the attention is dense causal for its rows. For a pattern that is
    sparse for the longest sequence."""
    b, hq, sq, d = q.shape
    sk = view.max_length
    with torch.no_grad():
        q = q.detach()
        out = (picks or infllmv2_picks_over_cache)(q, view, pattern)
        dense = [i for i, n in enumerate(view.host_lengths) if not pattern.is_sparse_call(n)]
        if not dense:
            return out
        qpos = query_positions(view.lengths, sq)
        nb = -(-sk // pattern.block_size)
        width = max(out.shape[-1], nb)
        wide = torch.full((b, out.shape[1], sq, width), -1, dtype=torch.int32, device=q.device)
        wide[..., :out.shape[-1]] = out
        # every block of [forced_init, qb - window] (the causal blocks the forced ones leave out)
        blocks = pattern.forced_init + torch.arange(width, device=q.device)
        qb = (qpos // pattern.block_size)[:, None, :, None]
        every = torch.where(blocks <= qb - pattern.window_blocks, blocks, torch.full_like(blocks, -1))
        rows = torch.tensor(dense, device=q.device)
        wide[rows] = every[rows].expand(len(dense), out.shape[1], sq, width).to(torch.int32)
        return wide
