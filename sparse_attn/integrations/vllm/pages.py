"""vLLM's paged KV cache read in place: the page layout, the writes, the block sums, the `KVView`.

vLLM hands each attention layer one tensor `(num_pages, Hkv, page_size, 2 * D)` (its `LBHNC`
layout). We read it as vLLM's own CPU backend does: the `2 * page_size * D` values of one
(page, kv head) are the page's K rows followed by its V rows, so `k_pages` / `v_pages` are views
`(num_pages, Hkv, page_size, D)` whose rows of one (page, head) are contiguous. That is exactly a
`KVView` of kind "paged" (cache/view.py): sparse_attn's split-KV decode reads it through vLLM's
block table with no per-step copy.

TopK selects blocks from the mean key of each block. vLLM's pages are the blocks (the TopK block
size is the page size), and a page keeps its tokens for its whole life (prefix caching shares full
pages, a recomputed sequence is rewritten from its first row), so one float32 sum per (page, kv
head) is kept beside the pages: a write at row 0 of a page starts its sum afresh, every written
row adds to it. No vLLM import here: the layout is testable without vLLM.
"""
from __future__ import annotations

import math

import torch

from ...cache.view import KVView


def split_pages(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(num_pages, Hkv, page_size, 2 * D)` -> K and V views `(num_pages, Hkv, page_size, D)` (no copy)."""
    if kv_cache.dim() != 4 or kv_cache.shape[3] % 2:
        raise ValueError(f"kv_cache must have shape (num_pages, Hkv, page_size, 2 * head_dim), got "
                         f"{tuple(kv_cache.shape)}")
    pages, heads, page_size, two_d = kv_cache.shape
    both = kv_cache.view(pages, heads, 2 * page_size, two_d // 2)
    return both[:, :, :page_size], both[:, :, page_size:]


def write_pages(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                page_sums: torch.Tensor | None = None, chunk_sums: torch.Tensor | None = None) -> None:
    """Store the new tokens' `key` / `value` `(T, Hkv, D)` at their slots (`slot_mapping` `(>= T,)`:
    `page * page_size + row`, negative for padding tokens, which are skipped). `page_sums`
    `(num_pages, Hkv, D)` float32, when given, is kept equal to the sum of each page's rows;
    `chunk_sums` `(num_pages, page_size // c, Hkv, D)` float32 to the sums of each run of `c` rows
    of a page (InfLLMv2's windows are made of them: `PagedWindowSums`)."""
    k_pages, v_pages = split_pages(kv_cache)
    page_size = k_pages.shape[2]
    t = key.shape[0]
    slots = slot_mapping[:t].long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    page, row = slots // page_size, slots % page_size
    k_pages[page, :, row] = key.to(k_pages.dtype)  # advanced indices first: (T, Hkv, D)
    v_pages[page, :, row] = value.to(v_pages.dtype)
    if page_sums is not None and page.numel():
        page_sums[page[row == 0]] = 0  # a page written from its first row holds a new block
        page_sums.index_add_(0, page, key.to(page_sums.dtype))
    if chunk_sums is not None and page.numel():
        nch = chunk_sums.shape[1]
        chunk_sums[page[row == 0]] = 0
        flat = chunk_sums.view(-1, *chunk_sums.shape[2:])  # (pages * nch, Hkv, D)
        flat.index_add_(0, page * nch + row // (page_size // nch), key.to(chunk_sums.dtype))


def gather_keys(pages: torch.Tensor, table_row: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows `[lo, hi)` of one sequence, `(1, Hkv, hi - lo, D)`, from `pages` `(num_pages, Hkv,
    page_size, D)` through its block-table row: what a later chunk of a chunked prefill attends to.
    One pass: the pages are indexed on a head-major view, so the gather writes `(Hkv, pages, rows,
    D)` directly (indexing the pages first and then permuting copied every row twice)."""
    ps = pages.shape[2]
    first, last = lo // ps, -(-hi // ps)
    rows = pages.permute(1, 0, 2, 3)[:, table_row[first:last].long()]  # (Hkv, n, ps, D), contiguous
    heads, n, _, d = rows.shape
    return rows.reshape(heads, n * ps, d)[None, :, lo - first * ps:hi - first * ps]


def window_chunk(kernel_size: int, kernel_stride: int, page_size: int) -> int:
    """Rows per kept chunk sum: every InfLLMv2 window (fine, and coarse: 4x both) is a whole number
    of chunks, and a page a whole number of them."""
    return math.gcd(kernel_size, kernel_stride, page_size)


class PagedWindowSums:
    """InfLLMv2's compressed keys over vLLM's pages (the `compressed` of a `KVView`): the running
    sums of every `size`-token window at `stride` of each sequence, `(B, Hkv, ceil(max_len / stride)
    + 1, D)` as `cache/compressed.py` keeps them, made at each call from the chunk sums kept beside
    the pages (`write_pages`): the chunks of each sequence through its block table, window `j` the
    sum of its `size / c` chunks from row `j * stride`. O(windows) per step (a gather of the chunk
    sums, then `size / c` adds); K is not read. A window past a sequence's length holds stale
    chunks of reused pages: only complete windows are read (cache/compressed.py)."""

    def __init__(self, chunk_sums: torch.Tensor, page_table: torch.Tensor, page_size: int):
        self.chunk_sums, self.page_table, self.page_size = chunk_sums, page_table, page_size
        self.chunk = page_size // chunk_sums.shape[1]
        self._chunks = None

    @property
    def dtype(self) -> torch.dtype:
        """The sums' dtype (float32): the C++ decode selection reads float32 sums
        (`backends/cpu/infllmv2.native_over_cache`)."""
        return self.chunk_sums.dtype

    def chunks(self) -> torch.Tensor:
        """Each sequence's chunk sums in order, `(B, Hkv, W * page_size / c, D)` (one gather)."""
        if self._chunks is None:
            rows = self.chunk_sums.permute(0, 2, 1, 3)[self.page_table.long()]  # (B, W, Hkv, nch, D)
            b, w, h, nch, d = rows.shape
            self._chunks = rows.permute(0, 2, 1, 3, 4).reshape(b, h, w * nch, d)
        return self._chunks

    def sums(self, size: int, stride: int, view) -> torch.Tensor:
        c = self.chunk
        if size % c or stride % c:
            raise ValueError(f"windows of {size} keys at stride {stride} are not whole chunks of {c} rows")
        chunks = self.chunks()
        b, h, total, d = chunks.shape
        n = -(-view.max_len // stride)
        r, s = size // c, stride // c
        need = (n - 1) * s + r
        if need > total:
            chunks = torch.cat([chunks, chunks.new_zeros(b, h, need - total, d)], 2)
        out = chunks.new_zeros(b, h, n + 1, d)
        for i in range(r):
            out[:, :, :n] += chunks[:, :, i:i + (n - 1) * s + 1:s]
        return out


class PagesCache:
    """The few requests of a batch that decode, as a cache `attention_with_cache` reads: vLLM's
    pages, the requests' block-table rows and lengths (`kv_view()`, no copy of K/V).

    Args:
        kv_cache: the layer's `(num_pages, Hkv, page_size, 2 * D)` tensor.
        block_table: int32 `(B, W)`; seq_lens: int32 `(B,)`; host_lengths: the same as host ints.
        page_sums: `(num_pages, Hkv, D)` float32 sums of each page's keys (TopK), else None.
        chunk_sums: `(num_pages, page_size // c, Hkv, D)` float32 sums of each run of `c` rows
            (InfLLMv2's windows: `PagedWindowSums`), else None.
    """

    def __init__(self, kv_cache, block_table, seq_lens, host_lengths, *, page_sums=None, chunk_sums=None):
        self.k_pages, self.v_pages = split_pages(kv_cache)
        self.block_table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
        self.seq_lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)
        self.host_lengths = tuple(int(n) for n in host_lengths)
        self.page_sums = page_sums
        self.chunk_sums = chunk_sums

    def kv_view(self) -> KVView:
        page_size = self.k_pages.shape[2]
        sums = self.page_sums  # (pages, Hkv, D): read through the block table, as the keys are
        windows = None if self.chunk_sums is None else PagedWindowSums(self.chunk_sums, self.block_table, page_size)
        return KVView(kind="paged", k=self.k_pages, v=self.v_pages, page_table=self.block_table, page_size=page_size,
                      lengths=self.seq_lens, host_lengths=self.host_lengths, block_sums=sums, compressed=windows,
                      pool_block_size=page_size if sums is not None else None, sums_by_page=sums is not None,
                      max_len=self.block_table.shape[1] * page_size, value_dtype=self.k_pages.dtype)
