"""Packed varlen block-sparse flash attention in Triton: all sequences in ONE launch per kernel.

Inputs are FlashAttention's packed layout: q `(Tq, Hq, D)`, k/v `(Tk, Hkv, D)`, `cu_seqlens_q/k`
int32 `(nseq + 1,)` on the device. Nothing here reads the offsets on the host:

* the work list is built on the device with torch ops (`work_items`): item `w` is the pair
  (sequence, query tile) or (sequence, key block); the grid is a host bound on the number of
  items (`Tq // q_block + 2 nseq`, known from shapes alone), spare items carry sequence -1 and do
  nothing;
* the block lists come from ONE layout built for a square `L x L` problem with `L >= max Sk_i`
  (`max_seqlen_k`, else `Tk`). Query tiles and key blocks are cut at absolute positions, so the
  lists of tile `t` hold for every sequence whose queries reach tile `t`: keys past a sequence's
  end are masked by its `Sk_i` (`j < Sk_i`), rows outside `[Sk_i - Sq_i, Sk_i)` by `row_ok`, and a
  list built with unclamped tile bounds is a superset whose "full" blocks are still full
  (build.py's rule only gets more conservative).

The kernels reuse the per-block bodies of flash_fwd.py / flash_bwd.py; only the addressing
differs (a sequence's rows start at `cu_seqlens[s]`, the log-sum-exp is `(Hq, Tq)`).
TopK is not served: its per-token selection is per sequence (the scheduler gets a reason).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .flash_bwd import _dkdv_rows, _dq_block, _load_rows
from .flash_fwd import LOG2E, _attend_block, _finish, _pow2, layout_lists, tile_geometry, upcast
from .tiles import backward_config

#: Triton before 3.9 (the H200 machine's 3.6): its register allocation differs (see the dk/dv launch)
_OLD_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9)


def work_items(cu_q: torch.Tensor, cu_k: torch.Tensor, block: int, bound: int, *, keys: bool = False):
    """(seq, index) int32 `(bound,)` on the device: the query tiles (or with `keys` the key blocks)
    of every sequence, in order; `seq = -1` past the last one. A query tile `t` of sequence `s`
    covers absolute positions `[t * block, (t + 1) * block)` of `[Sk_s - Sq_s, Sk_s)`."""
    sq = (cu_q[1:] - cu_q[:-1]).long()
    sk = (cu_k[1:] - cu_k[:-1]).long()
    last = (sk + block - 1) // block
    if keys:
        first = torch.zeros_like(last)
        n = last
    else:
        first = torch.div(sk - sq, block, rounding_mode="floor")
        n = torch.where(sq > 0, last - first, torch.zeros_like(last))
    ends = torch.cumsum(n, 0)
    item = torch.arange(bound, device=cu_q.device)
    seq = torch.searchsorted(ends, item, right=True)
    valid = seq < sq.numel()
    s = torch.clamp(seq, max=max(sq.numel() - 1, 0))
    index = first[s] + item - (ends[s] - n[s])
    return torch.where(valid, seq, -1).to(torch.int32), torch.where(valid, index, 0).to(torch.int32)


def item_bound(total: int, nseq: int, block: int, max_len: int | None) -> int:
    """Host bound on the work items: each sequence of `S` queries spans `ceil(S / block) + 1` tiles."""
    bound = total // block + 2 * nseq
    if max_len is not None:
        bound = min(bound, nseq * (-(-max_len // block) + 1))
    return max(1, bound)


@triton.jit
def _seq_rows(SEQ, IDX, CUQ, CUK, item, sub, hc, G, qb, HPB: tl.constexpr, BLOCK_M: tl.constexpr):
    """A work item's rows: (seq (clamped), layout tile, live, q0, k0 (int64 scalars: the sequence's
    first packed row / key), Sk, g, i (row within the sequence), pos, row_ok). Row r is head
    `hc * HPB + r // BLOCK_M` at tile row `sub * BLOCK_M + r % BLOCK_M`. Offsets inside a sequence
    stay int32; only the scalar bases are 64-bit (as the batched kernels' `b`)."""
    seq_raw = tl.load(SEQ + item)
    live = seq_raw >= 0
    seq = tl.maximum(seq_raw, 0)
    tile = tl.load(IDX + item)
    q0 = tl.load(CUQ + seq)
    sq = tl.load(CUQ + seq + 1) - q0
    k0 = tl.load(CUK + seq)
    sk = tl.load(CUK + seq + 1) - k0
    sk = tl.where(live, sk, 0)  # a spare item (tile 0) has no row: pos >= 0 = sk
    ROWS: tl.constexpr = HPB * BLOCK_M
    r = tl.arange(0, ROWS)
    g = hc * HPB + r // BLOCK_M
    t = sub * BLOCK_M + r % BLOCK_M
    pos = tile * qb + t
    row_ok = (g < G) & (t < qb) & (pos >= sk - sq) & (pos < sk)
    i = pos - (sk - sq)
    return seq, tl.maximum(tile, 0), live, q0.to(tl.int64), k0.to(tl.int64), sk, g, i, pos, row_ok


@triton.jit
def _fwd_varlen_kernel(Q, K, V, O, LSE, SEQ, IDX, CUQ, CUK,
                       FC, FI, PC, PI,
                       stride_qh, stride_qs, stride_qd, stride_kh, stride_ks, stride_kd,
                       stride_vh, stride_vs, stride_vd, stride_oh, stride_os, stride_od,
                       s_fcb, s_fch, s_fib, s_fih, s_fim, s_pcb, s_pch, s_pib, s_pih, s_pim,
                       Hkv, G, Tq, D, DV, qb, kb, n_sub, n_hc, qk_scale, cap, window, sinks,
                       CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                       SOFTCAP: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    hc = pid_h % n_hc
    hkv = pid_h // n_hc
    seq, tile, live, q0, k0, Sk, g, i, pos, row_ok = _seq_rows(SEQ, IDX, CUQ, CUK, pid_t // n_sub, pid_t % n_sub,
                                                               hc, G, qb, HPB, BLOCK_M)
    h = hkv * G + g
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + q0 * stride_qs + h[:, None] * stride_qh + i[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    pos = tl.where(row_ok, pos, -(1 << 30))
    Kb = K + hkv * stride_kh + k0 * stride_ks
    Vb = V + hkv * stride_vh + k0 * stride_vs
    ROWS: tl.constexpr = HPB * BLOCK_M
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    n_full = tl.where(live, tl.load(FC + seq * s_fcb + hkv * s_fch + tile), 0)
    f_off = seq * s_fib + hkv * s_fih + tile * s_fim
    for c in range(0, n_full):
        n = tl.load(FI + f_off + c)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                                      stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                                      False, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    n_part = tl.where(live, tl.load(PC + seq * s_pcb + hkv * s_pch + tile), 0)
    p_off = seq * s_pib + hkv * s_pih + tile * s_pim
    for c in range(0, n_part):
        n = tl.load(PI + p_off + c)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                                      stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                                      True, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    _finish(acc, m_i, l_i, O + q0 * stride_os, LSE + q0, h * stride_oh + i * stride_os, h * Tq + i, row_ok, DV,
            stride_od, BLOCK_DV)


@triton.jit
def _dq_varlen_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEQ, IDX, CUQ, CUK,
                      FC, FI, PC, PI,
                      stride_qh, stride_qs, stride_qd, stride_kh, stride_ks, stride_kd,
                      stride_vh, stride_vs, stride_vd, stride_oh, stride_os, stride_od,
                      stride_gh, stride_gs, stride_gd,
                      s_fcb, s_fch, s_fib, s_fih, s_fim, s_pcb, s_pch, s_pib, s_pih, s_pim,
                      Hkv, G, Tq, D, DV, qb, kb, n_sub, n_hc, scale, qk_scale, cap, window, sinks,
                      CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    hc = pid_h % n_hc
    hkv = pid_h // n_hc
    seq, tile, live, q0, k0, Sk, g, i, pos, row_ok = _seq_rows(SEQ, IDX, CUQ, CUK, pid_t // n_sub, pid_t % n_sub,
                                                               hc, G, qb, HPB, BLOCK_M)
    h = hkv * G + g
    # (b = 0, the sequence's rows i from its base, lse / delta as (Hq, Tq))
    q, do, lse2, delta = _load_rows(Q + q0 * stride_qs, DO + q0 * stride_os, LSE + q0, DELTA + q0, 0, h, i, row_ok,
                                    Hkv * G, Tq, D, DV,
                                    0, stride_qh, stride_qs, stride_qd, 0, stride_oh, stride_os, stride_od,
                                    BLOCK_D, BLOCK_DV)
    pos = tl.where(row_ok, pos, -(1 << 30))
    Kb = K + hkv * stride_kh + k0 * stride_ks
    Vb = V + hkv * stride_vh + k0 * stride_vs
    ROWS: tl.constexpr = HPB * BLOCK_M
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    n_full = tl.where(live, tl.load(FC + seq * s_fcb + hkv * s_fch + tile), 0)
    f_off = seq * s_fib + hkv * s_fih + tile * s_fim
    for c in range(0, n_full):
        n = tl.load(FI + f_off + c)
        dq = _dq_block(dq, q, do, lse2, delta, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                       stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                       False, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    n_part = tl.where(live, tl.load(PC + seq * s_pcb + hkv * s_pch + tile), 0)
    p_off = seq * s_pib + hkv * s_pih + tile * s_pim
    for c in range(0, n_part):
        n = tl.load(PI + p_off + c)
        dq = _dq_block(dq, q, do, lse2, delta, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                       stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                       True, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DQ + q0 * stride_gs + h[:, None] * stride_gh + i[:, None] * stride_gs + offs_d[None, :] * stride_gd,
             dq * scale, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_varlen_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, SEQ, IDX, CUQ, CUK,
                        TFC, TFI, TPC, TPI,
                        stride_qh, stride_qs, stride_qd, stride_kh, stride_ks, stride_kd,
                        stride_vh, stride_vs, stride_vd, stride_oh, stride_os, stride_od,
                        s_fcb, s_fch, s_fib, s_fih, s_fim, s_pcb, s_pch, s_pib, s_pih, s_pim,
                        Hkv, G, Tq, Tk, D, DV, qb, kb, n_sub, n_hc, n_subk, scale, qk_scale, cap, window, sinks,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, ALL_TILES: tl.constexpr,
                        BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                        SOFTCAP: tl.constexpr):
    pid_k = tl.program_id(0)
    hkv = tl.program_id(1)
    item = pid_k // n_subk
    ksub = pid_k % n_subk
    seq_raw = tl.load(SEQ + item)
    live = seq_raw >= 0
    seq = tl.maximum(seq_raw, 0)
    n = tl.load(IDX + item)
    q0 = tl.load(CUQ + seq)
    Sq = tl.load(CUQ + seq + 1) - q0
    k0 = tl.load(CUK + seq)
    Sk = tl.where(live, tl.load(CUK + seq + 1) - k0, 0)
    q0 = q0.to(tl.int64)
    k0 = k0.to(tl.int64)
    j = n * kb + ksub * BLOCK_N + tl.arange(0, BLOCK_N)
    jv = (j < (n + 1) * kb) & (j < Sk)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + k0 * stride_ks + hkv * stride_kh + j[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=jv[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + k0 * stride_vs + hkv * stride_vh + j[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                mask=jv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # this sequence's query tiles (absolute; negative ones only for a non-causal Sq > Sk)
    t_lo = tl.where(Sk - Sq >= 0, (Sk - Sq) // qb, -((Sq - Sk + qb - 1) // qb))
    t_hi = tl.where(Sq > 0, (Sk + qb - 1) // qb, t_lo)
    Qs = Q + q0 * stride_qs
    DOs = DO + q0 * stride_os
    ROWS: tl.constexpr = HPB * BLOCK_M
    r = tl.arange(0, ROWS)
    if ALL_TILES:
        # Dense without a causal rule: every tile of the sequence sees every key (no lists)
        for tile in range(t_lo, t_hi):
            dk, dv = _dkdv_tile(dk, dv, k, v, Qs, DOs, LSE + q0, DELTA + q0, tile, j, jv, r, hkv, G, Tq, Sq, Sk, D, DV,
                                qb, n_sub, n_hc, qk_scale, cap, window, sinks,
                                stride_qh, stride_qs, stride_qd, stride_oh, stride_os, stride_od,
                                False, CAUSAL, HAS_WINDOW, BLOCK_M, HPB, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    else:
        for kind in tl.static_range(2):  # 0: full query tiles (no mask), 1: partial ones
            if kind == 0:
                cnt = tl.load(TFC + seq * s_fcb + hkv * s_fch + n)
                L = TFI + seq * s_fib + hkv * s_fih + n * s_fim
            else:
                cnt = tl.load(TPC + seq * s_pcb + hkv * s_pch + n)
                L = TPI + seq * s_pib + hkv * s_pih + n * s_pim
            cnt = tl.where(live, cnt, 0)
            for c in range(0, cnt):
                tile = tl.load(L + c)
                if (tile >= t_lo) & (tile < t_hi):  # the layout lists the tiles of every sequence
                    dk, dv = _dkdv_tile(dk, dv, k, v, Qs, DOs, LSE + q0, DELTA + q0, tile, j, jv, r, hkv, G, Tq, Sq,
                                        Sk, D, DV, qb, n_sub, n_hc, qk_scale, cap, window, sinks,
                                        stride_qh, stride_qs, stride_qd, stride_oh, stride_os, stride_od,
                                        kind == 1, CAUSAL, HAS_WINDOW, BLOCK_M, HPB, BLOCK_D, BLOCK_DV, UPCAST,
                                        SOFTCAP)
    # DK / DV_OUT are contiguous (Hkv, Tk, *)
    base = (hkv * Tk + k0).to(tl.int64)
    tl.store(DK + base * D + j[:, None] * D + offs_d[None, :], dk * scale, mask=jv[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + base * DV + j[:, None] * DV + offs_dv[None, :], dv,
             mask=jv[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dkdv_tile(dk, dv, k, v, Qs, DOs, LSEs, DELTAs, tile, j, jv, r, hkv, G, Tq, Sq, Sk, D, DV, qb, n_sub, n_hc,
               qk_scale, cap, window, sinks, stride_qh, stride_qs, stride_qd, stride_oh, stride_os, stride_od,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
               HPB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """dk, dv += the rows of query tile `tile` (all its sub-tiles and head chunks) of one sequence."""
    for sub in range(0, n_sub):
        for hc in range(0, n_hc):
            g = hc * HPB + r // BLOCK_M
            t = sub * BLOCK_M + r % BLOCK_M
            pos = tile * qb + t
            row_ok = (g < G) & (t < qb) & (pos >= Sk - Sq) & (pos < Sk)
            i = pos - (Sk - Sq)
            h = hkv * G + g
            q, do, lse2, delta = _load_rows(Qs, DOs, LSEs, DELTAs, 0, h, i, row_ok, 0, Tq, D, DV,
                                            0, stride_qh, stride_qs, stride_qd, 0, stride_oh, stride_os, stride_od,
                                            BLOCK_D, BLOCK_DV)
            pos = tl.where(row_ok, pos, -(1 << 30))
            dk, dv = _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, pos, j, jv, qk_scale, cap, window, sinks,
                                MASKED, CAUSAL, HAS_WINDOW, UPCAST, SOFTCAP)
    return dk, dv


def _heads_first(x):
    """(T, H, D) -> the (H, T, D) view (no copy): the kernels take strides."""
    return x.transpose(0, 1)


def flash_forward_varlen(q, k, v, cu_q, cu_k, layout, *, scale: float, cfg, max_seqlen_q=None, softcap=None):
    """(out `(Tq, Hq, Dv)` in q's dtype, lse float32 `(Hq, Tq)`) of every packed sequence over
    `layout` (built for `L x L`, `L >= max Sk_i`, batch 1 or nseq). One launch."""
    tq, hq, d = q.shape
    tk, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    nseq = cu_q.numel() - 1
    out = torch.zeros(tq, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.full((hq, tq), float("inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or tk == 0 or nseq == 0:
        return out, lse
    g = hq // hkv
    block_m, hpb, block_n, n_sub, n_hc = tile_geometry(layout, g, cfg)
    seq, tile = work_items(cu_q, cu_k, layout.q_block, item_bound(tq, nseq, layout.q_block, max_seqlen_q))
    fc, fi, pc, pi = layout_lists(layout.full_count, layout.full_index, layout.partial_count,
                                  layout.partial_index, nseq, hkv)
    window = layout.window if layout.window is not None else 0
    cap = float(softcap) * LOG2E if softcap else 1.0
    qh, kh, vh, oh = (_heads_first(x) for x in (q, k, v, out))
    _fwd_varlen_kernel[(seq.numel() * n_sub, hkv * n_hc)](
        q, k, v, out, lse, seq, tile, cu_q, cu_k, fc, fi, pc, pi,
        *qh.stride(), *kh.stride(), *vh.stride(), *oh.stride(),
        *fc.stride()[:2], *fi.stride()[:3], *pc.stride()[:2], *pi.stride()[:3],
        hkv, g, tq, d, dv, layout.q_block, layout.k_block, n_sub, n_hc, scale * LOG2E, cap, window,
        layout.sink_tokens, CAUSAL=layout.causal, HAS_WINDOW=layout.window is not None,
        BLOCK_M=block_m, HPB=hpb, BLOCK_N=block_n, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv), UPCAST=upcast(q),
        SOFTCAP=bool(softcap), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def flash_backward_varlen(q, k, v, out, lse, dout, cu_q, cu_k, layout, *, scale: float, cfg, max_seqlen_q=None,
                          max_seqlen_k=None, softcap=None, all_tiles: bool = False):
    """(dq, dk, dv) in the packed layouts and the inputs' dtypes; one launch for dq, one for dk/dv.
    `all_tiles`: the pattern is Dense without a causal rule (dk/dv walk every tile of a sequence,
    negative ones too when Sq_i > Sk_i, without the lists)."""
    cfg = backward_config(cfg)
    tq, hq, d = q.shape
    tk, hkv, dv_ = k.shape[0], k.shape[1], v.shape[2]
    nseq = cu_q.numel() - 1
    if q.numel() == 0 or k.numel() == 0 or nseq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    g = hq // hkv
    lse = lse.contiguous()
    delta = (dout.float() * out.float()).sum(-1).transpose(0, 1).contiguous()  # (Hq, Tq)
    dq = torch.zeros_like(q)
    dk = torch.zeros(hkv, tk, d, dtype=k.dtype, device=k.device)
    dvv = torch.zeros(hkv, tk, dv_, dtype=v.dtype, device=v.device)
    block_m, hpb, block_n, n_sub, n_hc = tile_geometry(layout, g, cfg)
    window = layout.window if layout.window is not None else 0
    cap = float(softcap) * LOG2E if softcap else 1.0
    consts = dict(CAUSAL=layout.causal, HAS_WINDOW=layout.window is not None, BLOCK_M=block_m, HPB=hpb,
                  BLOCK_N=block_n, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv_), UPCAST=upcast(q), SOFTCAP=bool(softcap),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    qh, kh, vh, doh, dqh = (_heads_first(x) for x in (q, k, v, dout, dq))
    seq, tile = work_items(cu_q, cu_k, layout.q_block, item_bound(tq, nseq, layout.q_block, max_seqlen_q))
    fc, fi, pc, pi = layout_lists(layout.full_count, layout.full_index, layout.partial_count,
                                  layout.partial_index, nseq, hkv)
    _dq_varlen_kernel[(seq.numel() * n_sub, hkv * n_hc)](
        q, k, v, dout, lse, delta, dq, seq, tile, cu_q, cu_k, fc, fi, pc, pi,
        *qh.stride(), *kh.stride(), *vh.stride(), *doh.stride(), *dqh.stride(),
        *fc.stride()[:2], *fi.stride()[:3], *pc.stride()[:2], *pi.stride()[:3],
        hkv, g, tq, d, dv_, layout.q_block, layout.k_block, n_sub, n_hc, scale, scale * LOG2E, cap, window,
        layout.sink_tokens, **consts)

    kseq, kblk = work_items(cu_q, cu_k, layout.k_block, item_bound(tk, nseq, layout.k_block, max_seqlen_k),
                            keys=True)
    tfc, tfi, tpc, tpi = layout_lists(*layout.transpose(), nseq, hkv)
    n_subk = -(-layout.k_block // block_n)
    # dk/dv: half the backward's rows (and 4 warps for float32): the per-sequence bounds kept
    # across its loops spilled at 255 (bf16, sm_80) / 128 (fp32, sm_90) registers with the
    # batched kernel's tiles (bench/gpu_static.py, D=128). float32 stages: Triton 3.9 spills with
    # 1 stage (8-16 bytes), Triton 3.6 with 2 (48-56 bytes), so the stage count follows the version
    f32 = q.element_size() == 4
    kcfg = replace(cfg, rows=max(16, cfg.rows // 2), num_warps=4 if f32 else cfg.num_warps,
                   num_stages=1 if f32 and _OLD_TRITON else cfg.num_stages)
    block_m, hpb, _, n_sub, n_hc = tile_geometry(layout, g, kcfg)
    consts.update(BLOCK_M=block_m, HPB=hpb, num_warps=kcfg.num_warps, num_stages=kcfg.num_stages)
    _dkdv_varlen_kernel[(kseq.numel() * n_subk, hkv)](
        q, k, v, dout, lse, delta, dk, dvv, kseq, kblk, cu_q, cu_k, tfc, tfi, tpc, tpi,
        *qh.stride(), *kh.stride(), *vh.stride(), *doh.stride(),
        *tfc.stride()[:2], *tfi.stride()[:3], *tpc.stride()[:2], *tpi.stride()[:3],
        hkv, g, tq, tk, d, dv_, layout.q_block, layout.k_block, n_sub, n_hc, n_subk, scale, scale * LOG2E, cap,
        window, layout.sink_tokens, ALL_TILES=all_tiles, **consts)
    return dq, dk.transpose(0, 1), dvv.transpose(0, 1)
