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

from ..patterns import InfLLMv2
from .block_layout import compact, index_to_bool
from .infllmv2_selection import infllmv2_index_over_cache
from .topk_selection import query_positions, topk_index_over_cache, topk_token_index

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
    softcap: float = 0.0  # > 0: scores capped to softcap * tanh(s / softcap); 0: off
    quant: str | None = None  # None, or "int8" / "fp8_e4m3": k, v hold codes (cache/quant.py)
    k_scale: torch.Tensor | None = None  # float32 (pages, Hkv, page_size) row scales of a quantized cache
    v_scale: torch.Tensor | None = None


def selection_over_cache(q: torch.Tensor, view, pattern, *, infllmv2_picks=None):
    """`(attention pattern, per-token index or None)` of a call over a cache's read view: TopK
    selects from the cache's block means, InfLLMv2 from its window sums (both O(blocks) per step),
    and InfLLMv2's attention is then its TopK view's (forced blocks + the index). The other
    patterns select nothing. The one place a decode kernel gets a cache's selection from.
    `infllmv2_picks`: the kernel's own scoring of the window sums (`picks` of
    `infllmv2_index_over_cache`; default the PyTorch one)."""
    if isinstance(pattern, InfLLMv2):
        return pattern.attention_view(), infllmv2_index_over_cache(q, view, pattern, picks=infllmv2_picks)
    if pattern.pool_block() is not None:
        return pattern, topk_index_over_cache(q, view, pattern)
    return pattern, None


def key_block_of(pattern) -> int:
    return pattern.key_block(KEY_BLOCK)


def _rule_args(pattern) -> tuple[bool, int, int]:
    """`(causal, window, sinks)` of the kernels' token rule (window 0: none)."""
    causal, window, sinks = pattern.token_rule()
    return bool(causal), int(window), int(sinks) if window else 0


def num_splits(units: int, batch: int, kv_heads: int, row_groups: int, visited_blocks: int) -> int:
    """Splits of each (sequence, kv head)'s key blocks: enough CTAs for ~2 waves over the SMs, and
    at least 2 key blocks per split so a split's fixed cost stays small (host integers only)."""
    ctas = max(1, batch * kv_heads * row_groups)
    want = -(-2 * units // ctas)
    return int(max(1, min(want, max(1, visited_blocks // 2), 256)))


def visited_rows(pattern, qpos: torch.Tensor, num_blocks: int, key_block: int, *, batch: int, kv_heads: int,
                 index: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which key blocks each query row visits: bool `(B, Hkv, Sq, num_blocks)`, or None for "every
    block below the sequence's length" (Dense). The one answer every decode kernel uses (the
    work lists here, the reference loop over a cache); the pattern says it
    (`Pattern.candidate_blocks`), from `qpos` `(B or 1, Sq)` and, for a selecting pattern, its
    per-token choice `index` (int32 `(B, Hkv, Sq, k)`, -1 padded). No host synchronisation."""
    selected = None if index is None else index_to_bool(index, num_blocks)
    rows = pattern.candidate_blocks(qpos, num_blocks, key_block, selected=selected)
    if rows is None:
        return None
    return rows.expand(batch, kv_heads, qpos.shape[-1], num_blocks)


def visited_blocks(q, k, pattern, key_block: int):
    """(count int32 (B, Hkv), index int32 (B, Hkv, W), row mask uint8 (B, Hkv, Sq, N) or None) of
    `attention(q, k, v)`: every sequence holds Sk keys."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    nb = -(-sk // key_block)
    qpos = torch.arange(sk - sq, sk, device=q.device)[None]
    index = topk_token_index(q, k, pattern) if pattern.pool_block() is not None else None
    return block_lists(visited_rows(pattern, qpos, nb, key_block, batch=b, kv_heads=hkv, index=index), sq)


def block_lists(rows: torch.Tensor | None, sq: int):
    """Per-row visitable blocks `(B, Hkv, Sq, N)` -> the kernel's (count, index, row mask)."""
    if rows is None:
        return None, None, None
    grid = rows.any(dim=2)
    count, index = compact(grid, grid.shape[-1])
    row_mask = rows.to(torch.uint8).contiguous() if sq > 1 else None
    return count.contiguous(), index.contiguous(), row_mask


def tensor_decode_args(q, k, v, pattern, *, scale: float, units: int, softcap=None) -> DecodeArgs:
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
                      *_rule_args(pattern), float(scale), splits, float(softcap or 0.0))


def cache_decode_args(q, view, pattern, *, scale: float, units: int, softcap=None,
                      infllmv2_picks=None) -> DecodeArgs:
    """Arguments for attention over a cache's read view (`cache.kv_view()`): its pages and page
    table (a contiguous cache is one page of `max_len + 1` rows per sequence), its lengths; the
    selection of TopK / InfLLMv2 by `selection_over_cache` (`infllmv2_picks`: see there)."""
    b, hq, sq, _ = q.shape
    pattern, index = selection_over_cache(q, view, pattern, infllmv2_picks=infllmv2_picks)
    key_block = key_block_of(pattern)
    nb = -(-view.max_length // key_block)
    qpos = query_positions(view.lengths, sq)
    rows = visited_rows(pattern, qpos, nb, key_block, batch=b, kv_heads=view.kv_heads, index=index)
    count, index, row_mask = block_lists(rows, sq)
    splits = num_splits(units, b, view.kv_heads, -(-(hq // view.kv_heads) * sq // 8), nb)
    return DecodeArgs(q.contiguous(), view.k, view.v, view.page_table, view.lengths, count, index, row_mask,
                      key_block, *_rule_args(pattern), float(scale), splits, float(softcap or 0.0), view.quant,
                      view.k_scale, view.v_scale)
