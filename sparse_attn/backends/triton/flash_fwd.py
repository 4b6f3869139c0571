"""Forward Triton kernels of block-sparse flash attention over a :class:`BlockLayout`.

Two kernels, both float32 online softmax in the log2 domain:

* `_fwd_tile_kernel`: one program per (query sub-tile, batch, kv head, chunk of its GQA heads).
  Its rows are `HPB` query heads x `BLOCK_M` query positions, so every K/V chunk it loads serves
  all the heads of the group it holds. It walks the tile's full blocks (no token mask) and then
  its partial blocks (the layout's token rule: causal `j <= p`, window `p - j < W or j < sinks`).
* `_fwd_token_kernel` (TopK only): one program per (query token, batch, kv head), the rows being
  the group's `G` query heads (padded to 16 for the matrix units), walking that token's
  `token_index` row. It starts from the tile kernel's float32 output and log-sum-exp of the same
  rows, so the two parts are merged by the online softmax itself (no separate merge pass).

Rows that see no key output 0 and `lse = +inf` (contract). `SOFTCAP` (constexpr) caps each score
before the token rule: `cap * tanh(s / cap)`, with `cap` in the scores' base-2 units (softcap * log2 e).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import on_gpu

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """tl.dot; `UPCAST`: in float32 (Triton's interpreter multiplies bfloat16 bit patterns as
    integers, so bfloat16 operands are widened there; GPUs never set it)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:  # float32 inputs keep float32 products (Triton's default is TF32, which
        return tl.dot(a, b, input_precision="ieee")  # missed the contract's 1e-3 on the first GPU run)
    return tl.dot(a, b)


@triton.jit
def _tanh_cap(s, cap):
    """tanh(s / cap), `s` and `cap` in the same (base-2) units: (1 - e) / (1 + e) with e = e^{-2|s|/cap}
    (no overflow at any score; a NaN score stays NaN)."""
    e = tl.exp2(-2.8853900817779268 * (tl.abs(s) / cap))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(s < 0, -t, t)


@triton.jit
def _token_rule(pos, j, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, window, sinks):
    """Visible (row, key) pairs of a partial block: `pos` (ROWS,) and `j` (BLOCK_N,) absolute."""
    ok = j[None, :] >= 0
    if CAUSAL:
        ok = ok & (j[None, :] <= pos[:, None])
    if HAS_WINDOW:
        ok = ok & (((pos[:, None] - j[None, :]) < window) | (j[None, :] < sinks))
    return ok


@triton.jit
def _attend_block(acc, m_i, l_i, q, pos, K, V, n, kb, Sk, qk_scale, cap, window, sinks,
                  stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    """Online-softmax update of (acc, m, l) with key block `n`, walked `BLOCK_N` keys at a time."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    j_end = tl.minimum((n + 1) * kb, Sk)
    for j0 in range(n * kb, j_end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jv = j < j_end
        kt = tl.load(K + j[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=jv[None, :] & (offs_d[:, None] < D), other=0.0)
        s = _mm(q, kt, UPCAST) * qk_scale
        # a non-finite score (infinite / NaN q or k) is NaN, never a -inf taken for a masked pair
        s = tl.where(tl.abs(s) < float("inf"), s, float("nan"))
        if SOFTCAP:
            s = cap * _tanh_cap(s, cap)
        ok = jv[None, :] & (pos[:, None] > -(1 << 30))
        if MASKED:
            ok = ok & _token_rule(pos, j, CAUSAL, HAS_WINDOW, window, sinks)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + j[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                    mask=jv[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _finish(acc, m_i, l_i, O, LSE, o_off, lse_off, row_ok, DV, stride_od, BLOCK_DV: tl.constexpr):
    """out = acc / l (0 where no key), lse natural log (+inf where no key); a NaN `l` (the row saw a
    non-finite score: GPU max drops NaN, but the sum keeps it) gives NaN, never 0."""
    offs_dv = tl.arange(0, BLOCK_DV)
    seen = (l_i > 0.0) | (l_i != l_i)
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(O + o_off[:, None] + offs_dv[None, :] * stride_od, out,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + lse_off, lse, mask=row_ok)


@triton.jit
def _fwd_tile_kernel(Q, K, V, O, LSE,
                     FC, FI, PC, PI,
                     stride_qb, stride_qh, stride_qs, stride_qd,
                     stride_kb, stride_kh, stride_ks, stride_kd,
                     stride_vb, stride_vh, stride_vs, stride_vd,
                     stride_ob, stride_oh, stride_os, stride_od,
                     s_fcb, s_fch, s_fib, s_fih, s_fim, s_pcb, s_pch, s_pib, s_pih, s_pim,
                     Hkv, G, Sq, Sk, D, DV, qb, kb, q_tile_offset, n_sub, n_hc,
                     n_split, split_o, split_lse, qk_scale, cap, window, sinks,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr,
                     SOFTCAP: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = pid_t % n_split  # split-K: this program's share of the tile's block lists
    pid_t = pid_t // n_split
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
    tile_lo = (q_tile_offset + tile) * qb
    pos = tile_lo + t
    row_ok = (g < G) & (t < qb) & (pos >= Sk - Sq) & (pos < Sk)
    i = pos - (Sk - Sq)
    h = hkv * G + g
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    pos = tl.where(row_ok, pos, -(1 << 30))  # padding rows see nothing

    Kb = K + b * stride_kb + hkv * stride_kh
    Vb = V + b * stride_vb + hkv * stride_vh
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    n_full = tl.load(FC + b * s_fcb + hkv * s_fch + tile)
    f_off = b * s_fib + hkv * s_fih + tile * s_fim
    per = tl.cdiv(n_full, n_split)
    for c in range(split * per, tl.minimum(split * per + per, n_full)):
        n = tl.load(FI + f_off + c)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                                      stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                                      False, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    n_part = tl.load(PC + b * s_pcb + hkv * s_pch + tile)
    p_off = b * s_pib + hkv * s_pih + tile * s_pim
    per = tl.cdiv(n_part, n_split)
    for c in range(split * per, tl.minimum(split * per + per, n_part)):
        n = tl.load(PI + p_off + c)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, window, sinks,
                                      stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                                      True, CAUSAL, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    o_off = b * stride_ob + h * stride_oh + i * stride_os
    lse_off = (b * Hkv * G + h) * Sq + i
    _finish(acc, m_i, l_i, O + split * split_o, LSE + split * split_lse, o_off, lse_off, row_ok, DV,
            stride_od, BLOCK_DV)


@triton.jit
def _fwd_token_kernel(Q, K, V, O, LSE, O_IN, TI,
                      stride_qb, stride_qh, stride_qs, stride_qd,
                      stride_kb, stride_kh, stride_ks, stride_kd,
                      stride_vb, stride_vh, stride_vs, stride_vd,
                      stride_ob, stride_oh, stride_os, stride_od,
                      Hkv, G, Sq, Sk, D, DV, kb, TOPK, qk_scale, cap,
                      GR: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)  # 64-bit offsets: B * H * S * D may exceed 2^31
    hkv = bh % Hkv
    g = tl.arange(0, GR)
    row_ok = g < G
    h = hkv * G + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    # the tile part of the same rows (float32 output, natural lse) is the starting state
    lse_off = (b * Hkv * G + h) * Sq + i
    lse_in = tl.load(LSE + lse_off, mask=row_ok, other=float("inf"))
    o_off = b * stride_ob + h * stride_oh + i * stride_os  # O_IN is contiguous like O
    seen = (lse_in < float("inf")) | (lse_in != lse_in)  # NaN: keep the tile part's NaN
    acc = tl.load(O_IN + (b * Hkv * G + h)[:, None] * Sq * DV + i * DV + offs_dv[None, :],
                  mask=(row_ok & seen)[:, None] & (offs_dv[None, :] < DV), other=0.0)
    m_i = tl.where(seen, lse_in * 1.4426950408889634, float("-inf"))
    l_i = tl.where(seen, 1.0, 0.0)
    pos = tl.where(row_ok, Sk - Sq + i, -(1 << 30))
    Kb = K + b * stride_kb + hkv * stride_kh
    Vb = V + b * stride_vb + hkv * stride_vh
    ti_off = ((b * Hkv + hkv) * Sq + i) * TOPK
    for c in range(0, TOPK):
        n = tl.load(TI + ti_off + c)
        if n >= 0:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, pos, Kb, Vb, n, kb, Sk, qk_scale, cap, 0, 0,
                                          stride_ks, stride_kd, stride_vs, stride_vd, D, DV,
                                          False, False, False, BLOCK_N, BLOCK_D, BLOCK_DV, UPCAST, SOFTCAP)
    _finish(acc, m_i, l_i, O, LSE, o_off, lse_off, row_ok, DV, stride_od, BLOCK_DV)


def upcast(q: torch.Tensor) -> bool:
    """Widen bfloat16 matrix products to float32: only under the interpreter (CPU tensors)."""
    return q.dtype == torch.bfloat16 and not on_gpu(q)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, x)))


def layout_lists(fc, fi, pc, pi, b: int, h: int):
    """Counts `(B', H', X)` and index lists `(B', H', X, W)` expanded (stride 0, no copy) to
    `(b, h, ...)`, lists contiguous in their last axis and never of width 0."""
    out = []
    for cnt, idx in ((fc, fi), (pc, pi)):
        if idx.shape[-1] == 0:
            idx = torch.full((*idx.shape[:-1], 1), -1, dtype=torch.int32, device=idx.device)
        out += [cnt.contiguous().expand(b, h, -1), idx.contiguous().expand(b, h, -1, -1)]
    return out


def tile_geometry(layout, group: int, cfg):
    """Block sizes of the tile kernels for this layout: (BLOCK_M, heads per program, BLOCK_N,
    sub-tiles per query tile, head chunks)."""
    block_m = min(_pow2(layout.q_block), max(16, cfg.rows))
    gp = triton.next_power_of_2(max(1, group))
    hpb = max(1, min(gp, cfg.rows // block_m))
    block_n = min(_pow2(layout.k_block), max(16, cfg.block_n))
    n_sub = -(-layout.q_block // block_m)
    n_hc = -(-group // hpb)
    return block_m, hpb, block_n, n_sub, n_hc


def auto_splits(layout, programs: int, device) -> int:
    """Split-K factor of the tile kernel: only on a GPU, when the grid has fewer programs than
    twice the SMs (decode, short chunks) and its tiles list enough blocks to share."""
    if device.type != "cuda":
        return 1
    units = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = layout.full_index.shape[-1] + layout.partial_index.shape[-1]  # host bound of a list
    if programs >= 2 * units or blocks < 8:
        return 1
    return int(max(1, min(-(-2 * units // max(programs, 1)), blocks // 4, 64)))


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor):
    """Log-sum-exp merge of split-K partial results: `o_part` float32 `(S, B, H, Sq, Dv)` (each
    normalised by its own sum) and `lse_part` `(S, B, H, Sq)` (+inf: that split saw nothing) ->
    (float32 out, lse with +inf where no split saw a key)."""
    lg = torch.where(torch.isposinf(lse_part), torch.full_like(lse_part, float("-inf")), lse_part)
    m = lg.amax(dim=0)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lg - m_safe)  # (S, B, H, Sq); 0 for empty splits
    total = w.sum(dim=0)
    seen = (total > 0) | torch.isnan(total)  # NaN: a split saw a non-finite input; it stays NaN
    out = (w[..., None] * o_part).sum(dim=0) / torch.where(seen, total, torch.ones_like(total))[..., None]
    lse = torch.where(seen, m_safe + torch.log(torch.where(seen, total, torch.ones_like(total))),
                      torch.full_like(total, float("inf")))
    return out, lse


def flash_forward(q, k, v, layout, *, scale: float, cfg, splits: int | None = None, softcap=None):
    """(out `(B, Hq, Sq, Dv)` in q's dtype, lse float32 `(B, Hq, Sq)`) over `layout`.
    `splits`: split-K factor of the tile part (None: `auto_splits`, 1 on CPU); `softcap`: float > 0
    or None (contract)."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or sk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    g = hq // hkv
    has_tokens = layout.token_index is not None and layout.token_index.shape[-1] > 0
    # TopK: the tile part writes float32 first, the token kernel continues from it
    o_tile = torch.empty(b, hq, sq, dv, dtype=torch.float32, device=q.device) if has_tokens else out
    block_d, block_dv = _pow2(d), _pow2(dv)
    block_m, hpb, block_n, n_sub, n_hc = tile_geometry(layout, g, cfg)
    fc, fi, pc, pi = layout_lists(layout.full_count, layout.full_index, layout.partial_count,
                                  layout.partial_index, b, hkv)
    window = layout.window if layout.window is not None else 0
    cap = float(softcap) * LOG2E if softcap else 1.0  # base-2 units; unused without SOFTCAP
    programs = layout.num_q_tiles * n_sub * b * hkv * n_hc
    n_split = auto_splits(layout, programs, q.device) if splits is None else max(1, int(splits))
    if n_split > 1:  # each split writes a float32 partial result, merged by log-sum-exp below
        o_dst = torch.empty(n_split, b, hq, sq, dv, dtype=torch.float32, device=q.device)
        lse_dst = torch.empty(n_split, b, hq, sq, dtype=torch.float32, device=q.device)
    else:
        o_dst, lse_dst = o_tile[None], lse[None]
    grid = (layout.num_q_tiles * n_sub * n_split, b * hkv * n_hc)
    _fwd_tile_kernel[grid](
        q, k, v, o_dst, lse_dst, fc, fi, pc, pi,
        *q.stride(), *k.stride(), *v.stride(), *o_dst.stride()[1:],
        *fc.stride()[:2], *fi.stride()[:3], *pc.stride()[:2], *pi.stride()[:3],
        hkv, g, sq, sk, d, dv, layout.q_block, layout.k_block, layout.q_tile_offset, n_sub, n_hc,
        n_split, o_dst.stride(0), lse_dst.stride(0), scale * LOG2E, cap, window, layout.sink_tokens,
        CAUSAL=layout.causal, HAS_WINDOW=layout.window is not None,
        BLOCK_M=block_m, HPB=hpb, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, UPCAST=upcast(q),
        SOFTCAP=bool(softcap), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if n_split > 1:
        o_m, lse_m = merge_splits(o_dst, lse_dst)
        lse.copy_(lse_m)
        o_tile.copy_(o_m)
    if has_tokens:
        ti = layout.token_index.contiguous()
        _fwd_token_kernel[(sq, b * hkv)](
            q, k, v, out, lse, o_tile, ti,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            hkv, g, sq, sk, d, dv, layout.k_block, ti.shape[-1], scale * LOG2E, cap,
            GR=_pow2(g), BLOCK_N=min(_pow2(layout.k_block), max(16, cfg.block_n)),
            BLOCK_D=block_d, BLOCK_DV=block_dv, UPCAST=upcast(q), SOFTCAP=bool(softcap), num_warps=4,
            num_stages=cfg.num_stages)
    return out, lse
