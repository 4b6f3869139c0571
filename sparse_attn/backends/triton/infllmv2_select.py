"""InfLLMv2's block selection in Triton: kernel scores tile by tile, a running max-pool onto blocks
and a running top-k per query token (contract, "InfLLMv2 semantics" steps 3-5).

Same result as :func:`sparse_attn.layout.infllmv2_selection.token_index_from_compressed` (the
PyTorch path) up to the float32 summation order of the scores: the compressed keys (fine `kc`,
and coarse `kc2` for `normalizer="coarse"`) are built by PyTorch in one pass over K (O(Sk x D)),
or read where a cache keeps them as window sums; the kernels do the O(Sq x Sk / stride) part.

* `_lse_kernel`, the first pass: one program per (tile of `BLOCK_M` query rows, batch, kv head)
  walks the normalising kernels the tile's last row can see (coarse, or the fine ones for
  "exact") for each head of the GQA group and writes the per-(row, head) log-sum-exp, float32
  `(B, Hq, Sq)`: the only per-row state that outlives a program (O(Sq x Hq)).
* `_select_kernel`, the second pass: the same programs walk the key blocks `BLOCK_B` at a time;
  for a chunk they score its `r * BLOCK_B` fine kernels (`r = block_size // stride`) for every head
  of the group (one matrix product per head), add `exp(s - LSE_h)` into the group score, max-pool
  each block over its kernels `[r*b - 1, r*b + r)` (the kernel before the chunk is carried from the
  previous chunk, so a kernel shared by two blocks is computed once: exact ties stay exact) and
  insert the chunk's candidate blocks into a running top-k (replace the worst of the row's slots;
  highest score first, ties to the lower block, NaN first as +inf). Each row has as many slots as
  it picks (`InfLLMv2.extra_blocks`). Nothing of size `Sq x kernels` or `Sq x blocks` exists.

Both passes multiply in IEEE float32 (not TF32), as TopK's selection, so the choice matches the
PyTorch one. Query rows sit at `lengths[b] - Sq + t`: end-aligned to `Sk` in prefill, to each
sequence's own length over a cache (the same kernels serve both). Runs on CUDA tensors, and on
CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`, how the tests run without a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout.infllmv2_selection import compressed_keys, num_windows
from ...patterns import InfLLMv2
from .runtime import on_gpu


@triton.jit
def _tile_rows(LEN, HKV, SQ, N, size, stride, BLOCK_M: tl.constexpr):
    """This program's (batch, kv head, query rows, their validity and positions) and how many of
    the `N` kernels (windows of `size` at `stride`) the tile's last row can see."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    length = tl.load(LEN + bh // HKV)
    last = length - SQ + tl.minimum(pid_m * BLOCK_M + BLOCK_M, SQ) - 1
    n_hi = tl.minimum(N, tl.where(last >= size - 1, (last - size + 1) // stride + 1, 0))
    return bh // HKV, bh % HKV, t, t < SQ, length - SQ + t, n_hi


@triton.jit
def _head_rows(Q, b, hq, t, row_ok, s_qb, s_qh, s_qs, D, qscale, BLOCK_D: tl.constexpr):
    """Query rows `t` of head `hq` as float32 `(BLOCK_M, BLOCK_D)`, times `qscale`."""
    dd = tl.arange(0, BLOCK_D)
    return tl.load(Q + b.to(tl.int64) * s_qb + hq * s_qh + t[:, None].to(tl.int64) * s_qs + dd[None, :],
                   mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32) * qscale


@triton.jit
def _lse_kernel(Q, KC, LEN, LSE, s_qb, s_qh, s_qs, s_cb, s_ch, s_cn, HQ, HKV, SQ, D, N, size, stride, qscale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, t, row_ok, pos, n_hi = _tile_rows(LEN, HKV, SQ, N, size, stride, BLOCK_M)
    group = HQ // HKV
    dd = tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    for g in range(0, group):
        hq = h * group + g
        q = _head_rows(Q, b, hq, t, row_ok, s_qb, s_qh, s_qs, D, qscale, BLOCK_D)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_M], tl.float32)
        has_nan = tl.zeros([BLOCK_M], tl.int32)  # logsumexp is NaN with a NaN score, else +inf with a +inf one
        has_inf = tl.zeros([BLOCK_M], tl.int32)
        for n0 in range(0, n_hi, BLOCK_N):
            j = n0 + nn
            kc = tl.load(KC + b.to(tl.int64) * s_cb + h * s_ch + j[None, :].to(tl.int64) * s_cn + dd[:, None],
                         mask=(j[None, :] < n_hi) & (dd[:, None] < D), other=0.0)
            s = tl.dot(q, kc, input_precision="ieee")
            vis = (j[None, :] < n_hi) & (j[None, :] * stride + size - 1 <= pos[:, None])
            has_nan = tl.maximum(has_nan, tl.max(tl.where(vis & (s != s), 1, 0), 1))
            has_inf = tl.maximum(has_inf, tl.max(tl.where(vis & (s == float("inf")), 1, 0), 1))
            x = tl.where(vis & (s == s) & (s != float("inf")), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
            m = m_new
        lse = tl.where(m == float("-inf"), float("inf"), m + tl.log(tl.where(acc > 0, acc, 1.0)))
        # no visible normalising kernel: +inf, so every score exp(s - inf) is 0 (as the PyTorch path)
        lse = tl.where(has_nan != 0, float("nan"), tl.where(has_inf != 0, float("inf"), lse))
        tl.store(LSE + (b * HQ + hq).to(tl.int64) * SQ + t, lse, mask=row_ok)


@triton.jit
def _select_kernel(Q, KC, LEN, LSE, OUT, s_qb, s_qh, s_qs, s_cb, s_ch, s_cn, HQ, HKV, SQ, D, N, size, stride,
                   ratio, bs, forced_init, window_blocks, topk, qscale, TOPK_OUT,
                   IS41: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, KW: tl.constexpr,
                   BLOCK_D: tl.constexpr, KP: tl.constexpr):
    b, h, t, row_ok, pos, n_hi = _tile_rows(LEN, HKV, SQ, N, size, stride, BLOCK_M)
    group = HQ // HKV
    qb = pos // bs
    last_cand = tl.where(row_ok, qb - window_blocks, -1)  # candidates: forced_init <= blk <= last_cand
    # picks per row (InfLLMv2.extra_blocks): topk minus the forced blocks it counts
    init_counted = tl.minimum(tl.maximum(qb - window_blocks + 1, 0), forced_init)
    if IS41:
        extra = tl.maximum(topk - init_counted - tl.minimum(qb + 1, window_blocks), 0)
    else:
        extra = topk - init_counted
    slot = tl.arange(0, KP)
    active = slot[None, :] < tl.where(row_ok, extra, 0)[:, None]
    BIG: tl.constexpr = 1 << 30
    run_v = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)  # empty slots: the worst
    run_i = tl.full([BLOCK_M, KP], BIG, tl.int32)
    dd = tl.arange(0, BLOCK_D)
    il = tl.arange(0, KW)  # kernel of the chunk: j = ratio * c0 + il, il < ratio * BLOCK_B
    bl = tl.arange(0, BLOCK_B)
    # block bl of the chunk pools its kernels il in [ratio*bl - 1, ratio*bl + ratio) (il = -1: the carry)
    pool = (il[None, :] >= ratio * bl[:, None] - 1) & (il[None, :] < ratio * bl[:, None] + ratio)
    carry = tl.zeros([BLOCK_M], tl.float32)  # group score of the kernel just before the chunk (0: none)
    hi = tl.max(last_cand, 0) + 1
    for c0 in range(0, hi, BLOCK_B):
        j = ratio * c0 + il
        jok = (il < ratio * BLOCK_B) & (j < n_hi)
        kc = tl.load(KC + b.to(tl.int64) * s_cb + h * s_ch + j[None, :].to(tl.int64) * s_cn + dd[:, None],
                     mask=jok[None, :] & (dd[:, None] < D), other=0.0)
        ssum = tl.zeros([BLOCK_M, KW], tl.float32)
        for g in range(0, group):
            hq = h * group + g
            q = _head_rows(Q, b, hq, t, row_ok, s_qb, s_qh, s_qs, D, qscale, BLOCK_D)
            lse = tl.load(LSE + (b * HQ + hq).to(tl.int64) * SQ + t, mask=row_ok, other=float("inf"))
            s = tl.dot(q, kc, input_precision="ieee")
            ssum += tl.exp(s - lse[:, None])
        vis = jok[None, :] & (j[None, :] * stride + size - 1 <= pos[:, None])
        ssum = tl.where(vis, ssum, 0.0)
        ssum = tl.where(ssum != ssum, float("inf"), ssum)  # NaN ranks first (as the PyTorch path)
        pooled = tl.max(tl.where(pool[None, :, :], ssum[:, None, :], float("-inf")), axis=2)  # (M, BLOCK_B)
        pooled = tl.where(bl[None, :] == 0, tl.maximum(pooled, carry[:, None]), pooled)
        carry = tl.max(tl.where(il[None, :] == ratio * BLOCK_B - 1, ssum, float("-inf")), 1)
        blk = c0 + bl
        val = tl.where((blk[None, :] >= forced_init) & (blk[None, :] <= last_cand[:, None]), pooled, float("-inf"))
        for u in range(0, BLOCK_B):
            v = tl.max(tl.where(bl[None, :] == u, val, float("-inf")), 1)
            iu = c0 + u
            # the row's worst slot: lowest score, then highest block (empty slots first)
            wv = tl.min(tl.where(active, run_v, float("inf")), 1)
            is_w = active & (run_v == wv[:, None])
            wi = tl.max(tl.where(is_w, run_i, -1), 1)
            better = (v > float("-inf")) & ((v > wv) | ((v == wv) & (iu < wi)))
            ws = tl.min(tl.where(is_w & (run_i == wi[:, None]), slot[None, :], KP), 1)
            rep = better[:, None] & (slot[None, :] == ws[:, None])
            run_v = tl.where(rep, v[:, None], run_v)
            run_i = tl.where(rep, iu, run_i)
    picked = active & (run_v > float("-inf"))
    row = (b * HKV + h).to(tl.int64) * SQ + t
    tl.store(OUT + row[:, None] * TOPK_OUT + slot[None, :], tl.where(picked, run_i, -1),
             mask=row_ok[:, None] & (slot[None, :] < TOPK_OUT))


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def picks_from_compressed(q: torch.Tensor, kc: torch.Tensor, kc2: torch.Tensor | None, lengths: torch.Tensor,
                          sk: int, pattern: InfLLMv2, *, kc_scale: float = 1.0, kc2_scale: float = 1.0) -> torch.Tensor:
    """Steps 3-5 from compressed keys: int32 `(B, Hkv, Sq, topk)` picks, ascending, -1 padded.

    `q` `(B, Hq, Sq, D)` float32 / bfloat16 / float16; `kc` `(B, Hkv, >= N, D)` float32 with unit
    stride along D, the first `N = num_windows(sk, kernel_size, stride)` rows meaning `kc[j] *
    kc_scale` (rows past a sequence's own complete windows are never read: visibility is by
    position); `kc2` likewise for the coarse windows (None for "exact"); `lengths` int32 `(B,)`:
    row `t` of sequence `b` sits at `lengths[b] - Sq + t`; `sk` the longest length (host). For a
    sparse call (the caller applies `dense_len`). No host synchronisation."""
    b, hq, sq, d = q.shape
    hkv = kc.shape[1]
    bs, ks, st = pattern.block_size, pattern.kernel_size, pattern.kernel_stride
    nb = -(-sk // bs)
    out = torch.full((b, hkv, sq, pattern.topk), -1, dtype=torch.int32, device=q.device)
    width = min(pattern.topk, nb)
    if width == 0 or sq == 0 or b == 0 or hkv == 0:
        return out
    for name, t in (("kc", kc), ("kc2", kc2)):
        if t is not None and (t.dtype != torch.float32 or t.stride(-1) != 1):
            raise ValueError(f"{name} must be float32 with unit stride along D, got {t.dtype}, strides {t.stride()}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    scale = d ** -0.5  # the selection's scale is the contract's, whatever the attention's
    coarse = pattern.normalizer == "coarse"
    norm, nsize, nstride, nscale = ((kc2, 4 * ks, 4 * st, kc2_scale) if coarse else (kc, ks, st, kc_scale))
    n_norm = num_windows(sk, nsize, nstride)
    n_fine = num_windows(sk, ks, st)
    gpu = on_gpu(q)
    block_m = 16 if gpu else 64  # the interpreter: fewer, larger programs
    block_d = _pow2(d, 16)
    grid = (triton.cdiv(sq, block_m), b * hkv)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    _lse_kernel[grid](q, norm, lengths, lse, q.stride(0), q.stride(1), q.stride(2), norm.stride(0), norm.stride(1),
                      norm.stride(2), hq, hkv, sq, d, n_norm, nsize, nstride, float(scale * nscale),
                      BLOCK_M=block_m, BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d, num_warps=4)
    ratio = pattern.pool_ratio
    block_b = _pow2(-(-32 // ratio), 4)  # at least 32 kernels per chunk: the product's N
    _select_kernel[grid](q, kc, lengths, lse, out, q.stride(0), q.stride(1), q.stride(2), kc.stride(0),
                         kc.stride(1), kc.stride(2), hq, hkv, sq, d, n_fine, ks, st, ratio, bs, pattern.forced_init,
                         pattern.window_blocks, pattern.topk, float(scale * kc_scale), pattern.topk,
                         IS41=pattern.variant == "minicpm4.1", BLOCK_M=block_m, BLOCK_B=block_b,
                         KW=_pow2(ratio * block_b), BLOCK_D=block_d, KP=_pow2(width), num_warps=4)
    # slot order is insertion order; the layout wants ascending block ids with -1 padding last
    key = torch.where(out < 0, torch.full_like(out, nb), out)
    key = torch.sort(key, dim=-1).values
    return torch.where(key == nb, torch.full_like(key, -1), key)


def infllmv2_token_index_triton(q: torch.Tensor, k: torch.Tensor, pattern: InfLLMv2) -> torch.Tensor:
    """Prefill picks beyond the forced blocks, rows end-aligned to `Sk`: int32 `(B, Hkv, Sq, topk)`,
    ascending, -1 padded (the format of `layout.infllmv2_selection.infllmv2_token_index`)."""
    ks, st = pattern.kernel_size, pattern.kernel_stride
    sk = k.shape[2]
    with torch.no_grad():
        kc = compressed_keys(k.detach(), ks, st, torch.float32)
        kc2 = compressed_keys(k.detach(), 4 * ks, 4 * st, torch.float32) if pattern.normalizer == "coarse" else None
        lengths = torch.full((q.shape[0],), sk, dtype=torch.int32, device=q.device)
        return picks_from_compressed(q.detach(), kc, kc2, lengths, sk, pattern)


def infllmv2_picks_over_cache_triton(q: torch.Tensor, view, pattern: InfLLMv2) -> torch.Tensor:
    """The picks over a cache's read view (`KVView`) from its window sums, read where the cache
    keeps them (no copy; the `1 / size` joins the query's scale): each sequence's rows end-aligned
    to its own length. The `picks` of `layout.infllmv2_selection.infllmv2_index_over_cache` (which
    applies `dense_len` per sequence); float32 window sums (any cache but a float64 one)."""
    ks, st = pattern.kernel_size, pattern.kernel_stride
    kc = view.window_sums(ks, st)
    kc2 = view.window_sums(4 * ks, 4 * st) if pattern.normalizer == "coarse" else None
    with torch.no_grad():
        return picks_from_compressed(q.detach(), kc, kc2, view.lengths, view.max_length, pattern,
                                     kc_scale=1.0 / ks, kc2_scale=0.25 / ks)
