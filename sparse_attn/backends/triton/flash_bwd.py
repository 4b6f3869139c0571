"""Backward Triton kernels of block-sparse flash attention over a :class:`BlockLayout`.

With `P = exp(s - lse)` recomputed from the saved log-sum-exp and `delta = rowsum(dO * O)`:
`dV = P^T dO`, `dS = P * (dO V^T - delta)`, `dQ = scale dS K`, `dK = scale dS^T Q`. With `SOFTCAP` the
scores are capped as in the forward (`cap * tanh(s / cap)`) and `dS` is multiplied by `1 - tanh^2`.

* `_dq_tile_kernel`: the forward's tile grid and lists (rows = heads of a GQA group x positions);
* `_dq_token_kernel` (TopK): one program per (token, kv head) over that token's `token_index` row,
  adding to the tile part's float32 dq of the same rows (each row has one owner: no atomics);
* `_dkdv_kernel`: one program per (key chunk, batch, kv head): the query tiles of the transposed
  lists (`BlockLayout.transpose()`), every head of the group, then for TopK the tokens that
  selected this key block (`BlockLayout.transpose_tokens`), gathered `TQ` tokens x `G` heads at a time.
  dk/dv are accumulated in registers and written once: no atomics, deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_fwd import LOG2E, _mm, _pow2, upcast, _tanh_cap, _token_rule, layout_lists, tile_geometry
from .tiles import backward_config


@triton.jit
def _dq_block(dq, q, do, lse2, delta, pos, K, V, n, kb, Sk, qk_scale, cap, window, sinks,
              stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
              SOFTCAP: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    j_end = tl.minimum((n + 1) * kb, Sk)
    for j0 in range(n * kb, j_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jv = j < j_end
        k = tl.load(K + j[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=jv[:, None] & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(V + j[None, :] * stride_vs + offs_dv[:, None] * stride_vd,
                     mask=jv[None, :] & (offs_dv[:, None] < DV), other=0.0)
        s = _mm(q, tl.trans(k), UPCAST) * qk_scale
        if SOFTCAP:
            tc = _tanh_cap(s, cap)
            s = cap * tc
        ok = jv[None, :] & (pos[:, None] > -(1 << 30))
        if MASKED:
            ok = ok & _token_rule(pos, j, CAUSAL, HAS_WINDOW, window, sinks)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        if SOFTCAP:  # the cap's derivative folded into p now: tc is dead before the dP product
            p = p * (1.0 - tc * tc)
        dp = _mm(do, vt, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, UPCAST)
    return dq


@triton.jit
def _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, pos, j, jv, qk_scale, cap, window, sinks,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """dk, dv (BLOCK_N, *) += the contributions of the rows (q, do, lse2, delta at positions pos)."""
    s = _mm(q, tl.trans(k), UPCAST) * qk_scale  # (ROWS, BLOCK_N)
    if SOFTCAP:
        tc = _tanh_cap(s, cap)
        s = cap * tc
    ok = jv[None, :] & (pos[:, None] > -(1 << 30))
    if MASKED:
        ok = ok & _token_rule(pos, j, CAUSAL, HAS_WINDOW, window, sinks)
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    dv += _mm(tl.trans(p.to(do.dtype)), do, UPCAST)
    if SOFTCAP:  # the cap's derivative folded into p once dV has it: tc is dead before the dP product
        p = p * (1.0 - tc * tc)
    dp = _mm(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None])
    dk += _mm(tl.trans(ds.to(q.dtype)), q, UPCAST)
    return dk, dv


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, b, h, i, row_ok, Hq, Sq, D, DV,
               stride_qb, stride_qh, stride_qs, stride_qd, stride_ob, stride_oh, stride_os, stride_od,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """q (ROWS, BLOCK_D), dO (ROWS, BLOCK_DV), lse in log2 units and delta (ROWS,) of rows (h, i)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_ob + h[:, None] * stride_oh + i[:, None] * stride_os + offs_dv[None, :] * stride_od,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    r_off = (b * Hq + h) * Sq + i
    lse2 = tl.load(LSE + r_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + r_off, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _dq_tile_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                    FC, FI, PC, PI,
                    stride_qb, stride_qh, stride_qs, stride_qd,
                    stride_kb, stride_kh, stride_ks, stride_kd,
                    stride_vb, stride_vh, stride_vs, stride_vd,
                    stride_ob, stride_oh, stride_os, stride_od,
                    stride_gb, stride_gh, stride_gs, stride_gd,
                    s_fcb, s_fch, s_fib, s_fih, s_fim, s_pcb, s_pch, s_pib, s_pih, s_pim,
                    Hkv, G, Sq, Sk, D, DV, qb, kb, q_tile_offset, n_sub, n_hc,
                    scale, qk_scale, cap, window, sinks,
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                    SOFTCAP: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    tile = pid_t // n_sub
    sub = pid_t % n_sub
    hc = pid_h % n_hc
    bh = pid_h // n_hc
    b = (bh // Hkv).to(tl.int64)  # 64-bit offsets: B * H * S * D may exceed 2^31
    hkv = bh % Hkv
    ROWS: tl.constexpr = HPB * BLOCK_M
    r = tl.arange(0, ROWS)
    g = hc * HPB + r // BLOCK_M
    t = sub * BLOCK_M + r % BLOCK_M
    pos = (q_tile_offset + tile) * qb + t
    row_ok = (g < G) & (t < qb) & (pos >= Sk - Sq) & (pos < Sk)
    i = pos - (Sk - Sq)
    h = hkv * G + g
    q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, i, row_ok, Hkv * G, Sq, D, DV,
                                    stride_qb, stride_qh, stride_qs, stride_qd,
                                    stride_ob, stride_oh, stride_os, stride_od, BLOCK_D, BLOCK_DV)
    pos = tl.where(row_ok, pos, -(1 << 30))
    Kb = K + b * stride_kb + hkv * stride_kh
    Vb = V + b * stride_vb + hkv * stride_vh
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    n_full = tl.load(FC + b * s_fcb + hkv * s_fch + tile)
    f_off = b * s_fib + hkv * s_fih + tile * s_fim
    for c in range(0, n_full):
        n = tl.load(FI + f_off + c)
        dq = _dq_block(dq, q, do, lse2, delta, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                       stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                       False, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    n_part = tl.load(PC + b * s_pcb + hkv * s_pch + tile)
    p_off = b * s_pib + hkv * s_pih + tile * s_pim
    for c in range(0, n_part):
        n = tl.load(PI + p_off + c)
        dq = _dq_block(dq, q, do, lse2, delta, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                       stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                       True, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DQ + b * stride_gb + h[:, None] * stride_gh + i[:, None] * stride_gs + offs_d[None, :] * stride_gd,
             dq * scale, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dq_token_kernel(Q, K, V, DO, LSE, DELTA, DQ, TI,
                     stride_qb, stride_qh, stride_qs, stride_qd,
                     stride_kb, stride_kh, stride_ks, stride_kd,
                     stride_vb, stride_vh, stride_vs, stride_vd,
                     stride_ob, stride_oh, stride_os, stride_od,
                     stride_gb, stride_gh, stride_gs, stride_gd,
                     Hkv, G, Sq, Sk, D, DV, kb, TOPK, scale, qk_scale, cap,
                     GR: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)  # 64-bit offsets: B * H * S * D may exceed 2^31
    hkv = bh % Hkv
    g = tl.arange(0, GR)
    row_ok = g < G
    h = hkv * G + g
    ii = tl.zeros([GR], dtype=tl.int32) + i
    q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, ii, row_ok, Hkv * G, Sq, D, DV,
                                    stride_qb, stride_qh, stride_qs, stride_qd,
                                    stride_ob, stride_oh, stride_os, stride_od, BLOCK_D, BLOCK_DV)
    pos = tl.where(row_ok, Sk - Sq + ii, -(1 << 30))
    Kb = K + b * stride_kb + hkv * stride_kh
    Vb = V + b * stride_vb + hkv * stride_vh
    dq = tl.zeros([GR, BLOCK_D], dtype=tl.float32)
    ti_off = ((b * Hkv + hkv) * Sq + i) * TOPK
    for c in range(0, TOPK):
        n = tl.load(TI + ti_off + c)
        if n >= 0:
            dq = _dq_block(dq, q, do, lse2, delta, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, 0, 0,
                           stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                           False, False, False, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    offs_d = tl.arange(0, BLOCK_D)
    ptr = DQ + b * stride_gb + h[:, None] * stride_gh + i * stride_gs + offs_d[None, :] * stride_gd
    msk = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(ptr, tl.load(ptr, mask=msk, other=0.0) + dq * scale, mask=msk)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT,
                 TFC, TFI, TPC, TPI, TOK, OFF,
                 stride_qb, stride_qh, stride_qs, stride_qd,
                 stride_kb, stride_kh, stride_ks, stride_kd,
                 stride_vb, stride_vh, stride_vs, stride_vd,
                 stride_ob, stride_oh, stride_os, stride_od,
                 s_fcb, s_fch, s_fib, s_fih, s_fim, s_pcb, s_pch, s_pib, s_pih, s_pim,
                 s_tb, s_th, s_ob, s_oh,
                 Hkv, G, Sq, Sk, D, DV, qb, kb, q_tile_offset, n_sub, n_hc, n_subk,
                 scale, qk_scale, cap, window, sinks,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TOKENS: tl.constexpr,
                 BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
                 TQ: tl.constexpr, GP: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    pid_k = tl.program_id(0)
    bh = tl.program_id(1)
    n = pid_k // n_subk
    ksub = pid_k % n_subk
    b = (bh // Hkv).to(tl.int64)  # 64-bit offsets: B * H * S * D may exceed 2^31
    hkv = bh % Hkv
    Hq = Hkv * G
    j = n * kb + ksub * BLOCK_N + tl.arange(0, BLOCK_N)
    jv = (j < (n + 1) * kb) & (j < Sk)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * stride_kb + hkv * stride_kh + j[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=jv[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_vb + hkv * stride_vh + j[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                mask=jv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    ROWS: tl.constexpr = HPB * BLOCK_M
    r = tl.arange(0, ROWS)
    for kind in tl.static_range(2):  # 0: full query tiles (no mask), 1: partial ones
        if kind == 0:
            cnt = tl.load(TFC + b * s_fcb + hkv * s_fch + n)
            L = TFI + b * s_fib + hkv * s_fih + n * s_fim
        else:
            cnt = tl.load(TPC + b * s_pcb + hkv * s_pch + n)
            L = TPI + b * s_pib + hkv * s_pih + n * s_pim
        for c in range(0, cnt):
            tile = tl.load(L + c)
            for sub in range(0, n_sub):
                for hc in range(0, n_hc):
                    g = hc * HPB + r // BLOCK_M
                    t = sub * BLOCK_M + r % BLOCK_M
                    pos = (q_tile_offset + tile) * qb + t
                    row_ok = (g < G) & (t < qb) & (pos >= Sk - Sq) & (pos < Sk)
                    i = pos - (Sk - Sq)
                    h = hkv * G + g
                    q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, i, row_ok, Hq, Sq, D, DV,
                                                    stride_qb, stride_qh, stride_qs, stride_qd,
                                                    stride_ob, stride_oh, stride_os, stride_od,
                                                    BLOCK_D, BLOCK_DV)
                    pos = tl.where(row_ok, pos, -(1 << 30))
                    dk, dv = _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, pos, j, jv, qk_scale, cap, window,
                                        sinks, kind == 1, CAUSAL, HAS_WINDOW, UPCAST, SOFTCAP)
    if HAS_TOKENS:
        # TopK: the tokens that selected block n (always full for them), TQ tokens x GP heads a time
        RT: tl.constexpr = TQ * GP
        rt = tl.arange(0, RT)
        slot = rt // GP
        g = rt % GP
        start = tl.load(OFF + b * s_ob + hkv * s_oh + n)
        end = tl.load(OFF + b * s_ob + hkv * s_oh + n + 1)
        for s0 in range(start, end, TQ):
            row_ok = (s0 + slot < end) & (g < G)
            i = tl.load(TOK + b * s_tb + hkv * s_th + s0 + slot, mask=row_ok, other=0)
            h = hkv * G + g
            q, do, lse2, delta = _load_rows(Q, DO, LSE, DELTA, b, h, i, row_ok, Hq, Sq, D, DV,
                                            stride_qb, stride_qh, stride_qs, stride_qd,
                                            stride_ob, stride_oh, stride_os, stride_od, BLOCK_D, BLOCK_DV)
            pos = tl.where(row_ok, Sk - Sq + i, -(1 << 30))
            dk, dv = _dkdv_rows(dk, dv, k, v, q, do, lse2, delta, pos, j, jv, qk_scale, cap, 0, 0,
                                False, False, False, UPCAST, SOFTCAP)
    # DK / DV_OUT are contiguous (B, Hkv, Sk, *)
    base = (b * Hkv + hkv) * Sk
    tl.store(DK + (base + j[:, None]) * D + offs_d[None, :], dk * scale,
             mask=jv[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + (base + j[:, None]) * DV + offs_dv[None, :], dv,
             mask=jv[:, None] & (offs_dv[None, :] < DV))


def flash_backward(q, k, v, out, lse, dout, layout, *, scale: float, cfg, softcap=None):
    """(dq, dk, dv) in the inputs' dtypes over the forward's `layout`; `cfg` is the forward's tile
    config (its `bwd` tiles are used here: a query tile of the layout may be walked in sub-tiles).
    `softcap`: the forward's (float > 0 or None)."""
    cfg = backward_config(cfg)
    b, hq, sq, d = q.shape
    hkv, sk, dv_ = k.shape[1], k.shape[2], v.shape[3]
    if q.numel() == 0 or k.numel() == 0 or sq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    g = hq // hkv
    lse = lse.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, Hq, Sq)
    ti = layout.token_index
    has_tokens = ti is not None and ti.shape[-1] > 0
    dq = torch.empty(q.shape, dtype=torch.float32 if has_tokens else q.dtype, device=q.device)
    dk = torch.empty(b, hkv, sk, d, dtype=k.dtype, device=k.device)
    dvv = torch.empty(b, hkv, sk, dv_, dtype=v.dtype, device=v.device)
    block_d, block_dv = _pow2(d), _pow2(dv_)
    block_m, hpb, block_n, n_sub, n_hc = tile_geometry(layout, g, cfg)
    window = layout.window if layout.window is not None else 0
    cap = float(softcap) * LOG2E if softcap else 1.0  # base-2 units; unused without SOFTCAP
    consts = dict(CAUSAL=layout.causal, HAS_WINDOW=layout.window is not None, BLOCK_M=block_m, HPB=hpb,
                  BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, UPCAST=upcast(q), SOFTCAP=bool(softcap),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    fc, fi, pc, pi = layout_lists(layout.full_count, layout.full_index, layout.partial_count,
                                  layout.partial_index, b, hkv)
    _dq_tile_kernel[(layout.num_q_tiles * n_sub, b * hkv * n_hc)](
        q, k, v, dout, lse, delta, dq, fc, fi, pc, pi,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        *fc.stride()[:2], *fi.stride()[:3], *pc.stride()[:2], *pi.stride()[:3],
        hkv, g, sq, sk, d, dv_, layout.q_block, layout.k_block, layout.q_tile_offset, n_sub, n_hc,
        scale, scale * LOG2E, cap, window, layout.sink_tokens, **consts)

    gp = triton.next_power_of_2(g)
    if has_tokens:
        ti = ti.contiguous()
        _dq_token_kernel[(sq, b * hkv)](
            q, k, v, dout, lse, delta, dq, ti,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            hkv, g, sq, sk, d, dv_, layout.k_block, ti.shape[-1], scale, scale * LOG2E, cap,
            GR=_pow2(g), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, UPCAST=upcast(q),
            SOFTCAP=bool(softcap), num_warps=4, num_stages=cfg.num_stages)
        tokens, offsets = layout.transpose_tokens()
    else:
        tokens = torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
        offsets = torch.zeros(1, 1, 2, dtype=torch.int32, device=q.device)

    tfc, tfi, tpc, tpi = layout.transpose()
    tfc, tfi, tpc, tpi = layout_lists(tfc, tfi, tpc, tpi, b, hkv)
    n_subk = -(-layout.k_block // block_n)
    tq = max(1, 32 // gp)
    _dkdv_kernel[(layout.num_k_blocks * n_subk, b * hkv)](
        q, k, v, dout, lse, delta, dk, dvv, tfc, tfi, tpc, tpi, tokens, offsets,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *tfc.stride()[:2], *tfi.stride()[:3], *tpc.stride()[:2], *tpi.stride()[:3],
        tokens.stride(0) if has_tokens else 0, tokens.stride(1) if has_tokens else 0,
        offsets.stride(0) if has_tokens else 0, offsets.stride(1) if has_tokens else 0,
        hkv, g, sq, sk, d, dv_, layout.q_block, layout.k_block, layout.q_tile_offset, n_sub, n_hc, n_subk,
        scale, scale * LOG2E, cap, window, layout.sink_tokens,
        HAS_TOKENS=has_tokens, TQ=tq, GP=gp, **consts)
    return dq.to(q.dtype), dk, dvv
