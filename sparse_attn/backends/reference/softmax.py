"""Softmax attention for every pattern in plain PyTorch: the portable reference path.

Queries are processed in chunks of rows; each chunk only touches the keys its pattern can see
(`Pattern.key_range` plus sinks) and builds the token mask of that chunk alone, so the largest
intermediate is `rows x keys_in_range`, sized by `_CHUNK_ELEMS`, never `Sq x Sk`. With autograd,
each chunk runs under activation checkpointing, so the backward pass recomputes one chunk at a
time instead of keeping every chunk's probabilities. Accumulation is float32 (float64 for
float64 inputs). Runs on any torch device.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ...layout.block_layout import _index_to_bool
from ...layout.topk_selection import topk_token_index
from ...patterns import TopK

#: elements of one chunk's score matrix (B * Hq * rows * keys); 4M floats = 16 MiB
_CHUNK_ELEMS = 1 << 22


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(pattern, *, batch_heads: int, sq: int, sk: int) -> int:
    """Rows per chunk so that one chunk's score matrix stays near `_CHUNK_ELEMS`."""
    lo, hi = pattern.key_range(sk - 1, sk, sk)  # the keys a late query reaches through its range
    reach = (hi - lo) + pattern.sink_tokens(sk)
    windowed = lo > 0  # a chunk of r rows then touches about r + reach keys, else up to sk
    keys = min(sk, 2 * reach) if windowed else sk
    rows = _CHUNK_ELEMS // max(1, batch_heads * keys)
    if windowed:
        rows = min(rows, reach)
    return max(1, min(max(sq, 1), rows))


def _chunk_keys(pattern, p_lo: int, p_hi: int, sk: int, device):
    """Key positions a chunk of queries [p_lo, p_hi) may see: sinks below the range, then the range."""
    lo, hi = pattern.key_range(p_lo, p_hi, sk)
    sinks = min(pattern.sink_tokens(sk), lo)
    if sinks > 0:
        return torch.cat([torch.arange(sinks, device=device), torch.arange(lo, hi, device=device)]), None
    return None, (lo, hi)


def masked_softmax_av(s: torch.Tensor, mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(s masked) @ v with rows that see no key giving exactly 0 (and finite gradients)."""
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v) / denom


def _attend_chunk(qc, k, v, qpos, kidx, krange, pattern, scale, selected):
    """One chunk: qc `(B, Hkv, G, r, D)`, k/v `(B, Hkv, Sk, *)` in accumulation dtype."""
    if kidx is not None:
        kc, vc, kpos = k.index_select(2, kidx), v.index_select(2, kidx), kidx
    else:
        lo, hi = krange
        kc, vc = k[:, :, lo:hi], v[:, :, lo:hi]
        kpos = torch.arange(lo, hi, device=k.device)
    mask = pattern.token_mask(qpos, kpos, selected=selected)
    mask = mask[None, None, None] if mask.dim() == 2 else mask[:, :, None]
    s = torch.matmul(qc, kc[:, :, None].transpose(-1, -2)) * scale
    return masked_softmax_av(s, mask, vc[:, :, None])


def softmax_attention(q, k, v, pattern, *, scale: float, token_index=None, out_dtype=None) -> torch.Tensor:
    """Reference attention for Dense, SlidingWindow, BlockSparse and TopK; returns `(B, Hq, Sq, Dv)`
    in `out_dtype` (default q's dtype)."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv if hkv else 1
    acc = acc_dtype(q.dtype)
    if isinstance(pattern, TopK) and token_index is None:
        with torch.no_grad():
            token_index = topk_token_index(q.detach(), k.detach(), pattern)
    qa = q.to(acc).view(b, hkv, g, sq, d)
    ka, va = k.to(acc), v.to(acc)
    nb = -(-sk // pattern.block_size) if isinstance(pattern, TopK) else 0
    rows = chunk_rows(pattern, batch_heads=b * hq, sq=sq, sk=sk)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    off = sk - sq
    outs = []
    for r0 in range(0, max(sq, 1), rows):
        r1 = min(sq, r0 + rows)
        qpos = torch.arange(off + r0, off + r1, device=q.device)
        kidx, krange = _chunk_keys(pattern, off + r0, off + r1, sk, q.device)
        selected = _index_to_bool(token_index[:, :, r0:r1], nb) if token_index is not None else None
        args = (qa[:, :, :, r0:r1], ka, va, qpos, kidx, krange, pattern, scale, selected)
        outs.append(checkpoint(_attend_chunk, *args, use_reentrant=False) if grad else _attend_chunk(*args))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)
    return out.reshape(b, hq, sq, dv).to(out_dtype or q.dtype)
