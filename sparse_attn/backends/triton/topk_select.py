"""TopK block selection in Triton: the contract's scores with a running top-k per query token.

Same result as :func:`sparse_attn.layout.topk_selection.topk_token_index` (the PyTorch path):
pooled keys `kbar` (block means) and group-averaged queries `qbar` are computed in float32 with
PyTorch (O(S x D)); the kernel does the O(Sq x blocks x D) part. One program per (tile of
`BLOCK_M` query tokens, batch, kv head) walks the candidate blocks `BLOCK_N` at a time, scores
them with one matrix product (IEEE float32, not TF32, so the choice matches the PyTorch
selection up to summation order), and merges them into a running top-k held in registers
(`topk` rounds of "take the larger of the two maxima"). Memory is `BLOCK_M x (topk + BLOCK_N)`
per program: the `Sq x blocks` score matrix never exists. Ties go to the lower block index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout.topk_selection import group_mean_queries, pooled_keys


@triton.jit
def _topk_select_kernel(QBAR, KBAR, OUT, Hkv, Sq, Sk, NB, D, bs, sink_blocks, local_blocks, TOPK,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        KP: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = t < Sq
    pb = (Sk - Sq + t) // bs
    last = tl.where(row_ok, pb - local_blocks, -1)  # candidates: sink_blocks <= n <= last
    offs_d = tl.arange(0, BLOCK_D)
    qbar = tl.load(QBAR + (bh * Sq + t[:, None]) * D + offs_d[None, :],
                   mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    slot = tl.arange(0, KP)
    run_v = tl.full([BLOCK_M, KP], float("-inf"), dtype=tl.float32)
    run_i = tl.full([BLOCK_M, KP], -1, dtype=tl.int32)
    BIG: tl.constexpr = 1 << 30
    hi = tl.max(last, 0) + 1
    for n0 in range(sink_blocks, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kbar_t = tl.load(KBAR + (bh * NB + n[None, :]) * D + offs_d[:, None],
                         mask=(n[None, :] < NB) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(qbar, kbar_t, input_precision="ieee")
        # NaN ranks first (as torch.topk), a -inf candidate last but still above the non-candidates
        s = tl.where(s != s, float("inf"), tl.where(s == float("-inf"), -3.4028234663852886e38, s))
        s = tl.where(n[None, :] <= last[:, None], s, float("-inf"))
        new_v = tl.full([BLOCK_M, KP], float("-inf"), dtype=tl.float32)
        new_i = tl.full([BLOCK_M, KP], -1, dtype=tl.int32)
        for kk in range(0, TOPK):
            m_chk = tl.max(s, 1)
            m_run = tl.max(run_v, 1)
            i_chk = tl.min(tl.where(s == m_chk[:, None], n[None, :], BIG), 1)
            i_run = tl.min(tl.where(run_v == m_run[:, None], run_i, BIG), 1)
            take_chk = (m_chk > m_run) | ((m_chk == m_run) & (i_chk < i_run))
            best = tl.where(take_chk, m_chk, m_run)
            best_i = tl.where(take_chk, i_chk, i_run)
            found = best > float("-inf")
            here = slot[None, :] == kk
            new_v = tl.where(here, best[:, None], new_v)
            new_i = tl.where(here & found[:, None], best_i[:, None], new_i)
            s = tl.where((n[None, :] == best_i[:, None]) & take_chk[:, None], float("-inf"), s)
            run_v = tl.where((run_i == best_i[:, None]) & (~take_chk)[:, None], float("-inf"), run_v)
        run_v = new_v
        run_i = new_i
    tl.store(OUT + (bh * Sq + t[:, None]) * TOPK + slot[None, :], run_i,
             mask=row_ok[:, None] & (slot[None, :] < TOPK))


def topk_token_index_triton(q: torch.Tensor, k: torch.Tensor, pattern) -> torch.Tensor:
    """Per-token selected blocks beyond the forced ones: int32 `(B, Hkv, Sq, topk)`, ascending,
    -1 padded (the format of `layout.topk_selection.topk_token_index`). No host synchronisation."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    nb = -(-sk // bs)
    out = torch.full((b, hkv, sq, pattern.topk), -1, dtype=torch.int32, device=q.device)
    if pattern.topk == 0 or sq == 0 or b == 0 or hkv == 0 or nb == 0:
        return out
    kbar = pooled_keys(k, bs, torch.float32).contiguous()  # (B, Hkv, NB, D)
    qbar = group_mean_queries(q, hkv, torch.float32).contiguous()  # (B, Hkv, Sq, D)
    block_m = 32
    _topk_select_kernel[(triton.cdiv(sq, block_m), b * hkv)](
        qbar, kbar, out, hkv, sq, sk, nb, d, bs, pattern.sink_blocks, pattern.local_blocks, pattern.topk,
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(d)),
        KP=triton.next_power_of_2(pattern.topk), num_warps=4)
    # kernel order is by score; the layout wants ascending block ids with -1 padding last
    key = torch.where(out < 0, torch.full_like(out, nb), out)
    key = torch.sort(key, dim=-1).values
    return torch.where(key == nb, torch.full_like(key, -1), key)
