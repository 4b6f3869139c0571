"""Work lists of split-KV decode kernels (CUDA and Triton): which key blocks each (sequence, kv
head) visits, per-row block masks, page tables and lengths, built on the device from the pattern.

Every decode kernel reads K/V through a page table: key `j` of sequence `b` is at page
`page_table[b][j // page_size]`, offset `j % page_size`. A contiguous `(B, Hkv, Sk, D)` tensor is
one page per sequence (page size Sk), a `KVCache` one page of `max_len + 1` rows per sequence, a
`PagedKVCache` its own pages. Query row `t` of sequence `b` sits at `lengths[b] - Sq + t`.

What is visited is a per-(sequence, kv head) ascending list of key blocks: all blocks (Dense:
no list), the window's blocks and the sinks' (SlidingWindow), the union of the rows' layout rows
(BlockSparse), the forced and selected blocks (TopK). When the rows of one sequence differ inside
that union (Sq > 1), a per-row block mask says which rows see which block; the token rule
(causal, window, sinks) is applied per key by the kernel. No host synchronisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..patterns import BlockSparse, Dense, SlidingWindow, TopK
from .block_layout import compact, index_to_bool
from .topk_selection import topk_token_index

#: key block of Dense / SlidingWindow lists (BlockSparse and TopK use their block_size)
KEY_BLOCK = 64


class DecodeArgs(NamedTuple):
    """Arguments of a split-KV decode kernel (csrc/cuda/paged_decode.cuh documents each)."""
    q: torch.Tensor  # (B, Hq, Sq, D) contiguous
    k: torch.Tensor  # (pages, Hkv, page_size, D), unit stride along D
    v: torch.Tensor  # (pages, Hkv, page_size, Dv)
    page_table: torch.Tensor  # int32 (B, W)
    lengths: torch.Tensor  # int32 (B,)
    count: torch.Tensor | None  # int32 (B, Hkv) visited blocks, None = all blocks below the length
    index: torch.Tensor | None  # int32 (B, Hkv, N) ascending, -1 padded
    row_mask: torch.Tensor | None  # uint8 (B, Hkv, Sq, N) or None
    key_block: int
    causal: bool
    window: int  # 0: none
    sinks: int
    scale: float
    splits: int


def key_block_of(pattern) -> int:
    return pattern.block_size if isinstance(pattern, (BlockSparse, TopK)) else KEY_BLOCK


def _window_args(pattern):
    if isinstance(pattern, SlidingWindow):
        return pattern.window, pattern.sinks
    return 0, 0


def num_splits(units: int, batch: int, kv_heads: int, row_groups: int, visited_blocks: int) -> int:
    """Splits of each (sequence, kv head)'s key blocks: enough CTAs for ~2 waves over the SMs, and
    at least 2 key blocks per split so a split's fixed cost stays small (host integers only)."""
    ctas = max(1, batch * kv_heads * row_groups)
    want = -(-2 * units // ctas)
    return int(max(1, min(want, max(1, visited_blocks // 2), 256)))


def visited_blocks(q, k, pattern, key_block: int):
    """(count int32 (B, Hkv), index int32 (B, Hkv, W), row mask uint8 (B, Hkv, Sq, N) or None)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dev = q.device
    nb = -(-sk // key_block)
    if isinstance(pattern, Dense):
        return None, None, None
    rows_qb = torch.arange(sk - sq, sk, device=dev) // key_block  # (Sq,)
    blocks = torch.arange(nb, device=dev)
    row_mask = None
    if isinstance(pattern, SlidingWindow):
        lo = max(0, sk - sq - pattern.window + 1) // key_block
        vis = (blocks >= lo) | (blocks * key_block < pattern.sinks)
        grid = vis[None, None].expand(b, hkv, nb)
    elif isinstance(pattern, BlockSparse):
        lay = pattern.layout.to(dev)[:, :, :, :nb]
        rows = lay.index_select(2, rows_qb).expand(b, hkv, sq, nb)  # (B, Hkv, Sq, N)
        grid = rows.any(dim=2)
        row_mask = rows if sq > 1 else None
    elif isinstance(pattern, TopK):
        sel = index_to_bool(topk_token_index(q, k, pattern), nb)  # (B, Hkv, Sq, N)
        rows = sel | pattern.forced_block_mask(rows_qb, blocks)[None, None]
        grid = rows.any(dim=2)
        row_mask = rows if sq > 1 else None
    else:
        raise TypeError(f"unsupported pattern {type(pattern).__name__}")
    count, index = compact(grid, nb)
    if row_mask is not None:
        row_mask = row_mask.to(torch.uint8).contiguous()
    return count.contiguous(), index.contiguous(), row_mask


def block_lists(rows: torch.Tensor | None, sq: int):
    """Per-row visitable blocks `(B, Hkv, Sq, N)` -> the kernel's (count, index, row mask)."""
    if rows is None:
        return None, None, None
    grid = rows.any(dim=2)
    count, index = compact(grid, grid.shape[-1])
    row_mask = rows.to(torch.uint8).contiguous() if sq > 1 else None
    return count.contiguous(), index.contiguous(), row_mask


def tensor_decode_args(q, k, v, pattern, *, scale: float, units: int) -> DecodeArgs:
    """Arguments for `attention(q, k, v)` decode: every sequence is Sk long, one page each."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    key_block = key_block_of(pattern)
    count, index, row_mask = visited_blocks(q, k, pattern, key_block)
    nb = -(-sk // key_block)
    visited = nb if count is None else min(nb, -(-int(pattern.visited_pairs(1, sk)) // key_block) + 1)
    splits = num_splits(units, b, hkv, -(-(hq // hkv) * sq // 8), visited)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    page_table = torch.arange(b, dtype=torch.int32, device=q.device)[:, None]
    lengths = torch.full((b,), sk, dtype=torch.int32, device=q.device)
    return DecodeArgs(q.contiguous(), k, v, page_table, lengths, count, index, row_mask, key_block,
                      bool(pattern.causal), *_window_args(pattern), float(scale), splits)


def cache_decode_args(q, cache, pattern, *, scale: float, units: int) -> DecodeArgs:
    """Arguments for attention over a `KVCache` (one page per sequence) or a `PagedKVCache`."""
    from ..cache.attend import row_blocks
    from ..cache.paged import PagedKVCache

    b, hq, sq, _ = q.shape
    key_block = key_block_of(pattern)
    nb = -(-cache.max_length // key_block)
    qpos = cache.lengths.long()[:, None] - sq + torch.arange(sq, device=q.device)[None, :]
    count, index, row_mask = block_lists(row_blocks(q, cache, pattern, qpos, nb, key_block), sq)
    if isinstance(cache, PagedKVCache):
        k, v, table = cache.k_pages, cache.v_pages, cache.page_table
    else:  # contiguous: sequence b is page b (of max_len + 1 rows)
        k, v = cache.k, cache.v
        table = torch.arange(b, dtype=torch.int32, device=q.device)[:, None]
    splits = num_splits(units, b, cache.kv_heads, -(-(hq // cache.kv_heads) * sq // 8), nb)
    return DecodeArgs(q.contiguous(), k, v, table, cache.lengths, count, index, row_mask, key_block,
                      bool(pattern.causal), *_window_args(pattern), float(scale), splits)
