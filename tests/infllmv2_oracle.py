"""The float64 evaluation of the contract's "InfLLMv2 semantics", step by step, one query row at a time.

Written for reading, not speed (Python loops over rows and kernels): keep sizes small. Imports
nothing from `sparse_attn`; only the pattern's fields are read.
"""
from __future__ import annotations

import math

import torch

import oracle

F64 = torch.float64


def compressed_keys(k: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Step 2: `kc[j] = mean(k[j*stride : j*stride + size])` for every complete window, `(B, Hkv, N, D)`."""
    sk = k.shape[2]
    n = (sk - size) // stride + 1 if sk >= size else 0
    rows = [k[:, :, j * stride:j * stride + size].mean(dim=2) for j in range(n)]
    return torch.stack(rows, dim=2) if rows else k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])


def both_compressed(k, pattern):
    """Step 2's fine and coarse compressed keys of `k` (float64)."""
    k = k.to(F64)
    ks, s = pattern.kernel_size, pattern.kernel_stride
    return compressed_keys(k, ks, s), compressed_keys(k, 4 * ks, 4 * s)


def block_scores(q, k, pattern, p: int, t: int, kcs=None) -> torch.Tensor:
    """Steps 2-4 for query row `t` (position `p`): `score` float64 `(B, Hkv, ceil(Sk/bs))`.
    `kcs`: `both_compressed(k, pattern)` when the caller has it."""
    q, k = q.to(F64), k.to(F64)
    b, hq, _, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5
    ks, s, bs = pattern.kernel_size, pattern.kernel_stride, pattern.block_size
    kc, kc2 = kcs if kcs is not None else both_compressed(k, pattern)
    vis = [j for j in range(kc.shape[2]) if j * s + ks - 1 <= p]
    vis2 = [c for c in range(kc2.shape[2]) if c * 4 * s + 4 * ks - 1 <= p]
    nb = math.ceil(sk / bs)
    S = torch.zeros(b, hkv, kc.shape[2], dtype=F64)
    for h in range(hq):
        qh = q[:, h, t]                       # (B, D)
        kv = h // g
        fine = torch.einsum("bd,bnd->bn", qh, kc[:, kv]) * scale
        if pattern.normalizer == "coarse":
            if not vis2:
                continue                      # no coarse kernel visible: 0 scores
            coarse = torch.einsum("bd,bnd->bn", qh, kc2[:, kv]) * scale
            lse = torch.logsumexp(coarse[:, vis2], dim=-1)
        else:
            if not vis:
                continue
            lse = torch.logsumexp(fine[:, vis], dim=-1)
        for j in vis:
            S[:, kv, j] += torch.exp(fine[:, j] - lse)
    r = bs // s
    score = torch.zeros(b, hkv, nb, dtype=F64)
    for blk in range(nb):
        js = [j for j in range(r * blk - 1, r * blk + r) if 0 <= j < kc.shape[2]]
        if js:
            score[:, :, blk] = S[:, :, js].max(dim=-1).values
    return score


def select_blocks(q, k, pattern) -> torch.Tensor:
    """Steps 1-5: bool `(B, Hkv, Sq, ceil(Sk/bs))`, the blocks each query row attends."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    nb = math.ceil(sk / bs)
    sel = torch.zeros(b, hkv, sq, nb, dtype=torch.bool)
    sparse = pattern.dense_len == -1 or sk >= pattern.dense_len
    L, init, topk = pattern.local_blocks, pattern.init_blocks, pattern.topk
    kcs = both_compressed(k, pattern)
    for t in range(sq):
        p = sk - sq + t
        qb = p // bs
        if not sparse:
            sel[:, :, t, :qb + 1] = True
            continue
        score = block_scores(q, k, pattern, p, t, kcs)
        for bi in range(b):
            for h in range(hkv):
                if pattern.variant == "minicpm4.1":
                    forced = {x for x in range(qb + 1) if x < init or qb - L <= x}
                    cand = [x for x in range(qb - L) if x not in forced]
                    n_pick = topk - len(forced)
                    window = set()
                else:  # minicpm4: topk counts the init blocks and the picks among x < qb - L + 1
                    region = list(range(max(0, qb - L + 1)))
                    forced = set(region[:min(init, topk)])
                    cand = [x for x in region if x not in forced]
                    n_pick = topk - len(forced)
                    window = {x for x in range(qb - L + 1, qb + 1) if x >= 0}
                # highest score first, ties to the lower block index
                cand.sort(key=lambda x: (-score[bi, h, x].item(), x))
                chosen = forced | window | set(cand[:max(0, n_pick)])
                for x in chosen:
                    sel[bi, h, t, x] = True
    return sel


def visibility_mask(q, k, pattern) -> torch.Tensor:
    """Bool `(B, Hq, Sq, Sk)`: key `j` visible to row `t` (selected block and `j <= p`)."""
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    sel = select_blocks(q, k, pattern)
    j = torch.arange(sk)
    p = torch.arange(sk - sq, sk)[:, None]
    m = sel[..., j // pattern.block_size] & (j[None, :] <= p)
    return m.repeat_interleave(hq // k.shape[1], dim=1)


def attention(q, k, v, pattern, *, scale=None, mask=None):
    """Step 6 in float64 (differentiable in q, k, v through the attention only)."""
    if mask is None:
        with torch.no_grad():
            mask = visibility_mask(q.detach(), k.detach(), pattern)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return oracle._masked_softmax_attention(q.to(F64), k.to(F64), v.to(F64), mask, scale)


def margin(q, k, pattern) -> float:
    """Smallest relative gap, over rows that pick among candidates, between the last picked score and
    the first left out (inf when no row's choice depends on a comparison). Inputs whose selection
    rests on rounding are redrawn by the tests."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    bs, L = pattern.block_size, pattern.local_blocks
    worst = math.inf
    if not (pattern.dense_len == -1 or sk >= pattern.dense_len):
        return worst
    kcs = both_compressed(k, pattern)
    for t in range(sq):
        p = sk - sq + t
        qb = p // bs
        score = block_scores(q, k, pattern, p, t, kcs)
        if pattern.variant == "minicpm4.1":
            forced = {x for x in range(qb + 1) if x < pattern.init_blocks or qb - L <= x}
            cand = [x for x in range(qb - L) if x not in forced]
        else:
            region = list(range(max(0, qb - L + 1)))
            forced = set(region[:min(pattern.init_blocks, pattern.topk)])
            cand = [x for x in region if x not in forced]
        n_pick = pattern.topk - len(forced)
        if n_pick <= 0 or n_pick >= len(cand):
            continue
        vals = score[:, :, cand].sort(dim=-1, descending=True).values.reshape(-1, len(cand))
        for row in vals:
            # exact ties (neighbouring blocks pool the kernel they share) go to the lower index in
            # every implementation; what rounding could flip is the order of distinct values next to
            # the cut: the nearest distinct value below the last pick, and above it
            v = row[n_pick - 1]
            lower, higher = row[row < v], row[row > v]
            scale = max(abs(v.item()), 1e-30)
            if v.item() == 0.0 and lower.numel() == 0:
                continue  # all zero at the cut: exact ties
            if lower.numel():
                worst = min(worst, (v - lower.max()).item() / scale)
            if higher.numel():
                worst = min(worst, (higher.min() - v).item() / scale)
    return worst
