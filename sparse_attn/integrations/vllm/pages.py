"""vLLM's paged KV cache read in place: the page layout, the writes, the block sums, the `KVView`.

vLLM hands each attention layer one tensor `(num_pages, Hkv, page_size, 2 * D)` (its `LBHNC`
layout). We lay it out as vLLM's own CPU backend does: the `2 * page_size * D` values of one
(page, kv head) are the page's K followed by its V rows, so `k_pages` / `v_pages` are views
`(num_pages, Hkv, page_size, D)` whose values of one (page, head) are contiguous; float32 K is kept
as columns (`k_columns`: `D` rows of `page_size` values, the view's last two strides `(1,
page_size)`), as vLLM's writer keeps it, which the decode kernel reads with the keys in its vector
lanes. That is exactly a `KVView` of kind "paged" (cache/view.py): sparse_attn's split-KV decode
reads it through vLLM's block table with no per-step copy.

TopK selects blocks from the mean key of each block. vLLM's pages are the blocks (the TopK block
size is the page size), and a page keeps its tokens for its whole life (prefix caching shares full
pages, a recomputed sequence is rewritten from its first row), so one float32 sum per (page, kv
head) is kept beside the pages: a write at row 0 of a page starts its sum afresh, every written
row adds to it. No vLLM import here: the layout is testable without vLLM.
"""
from __future__ import annotations

import math

import torch

from ..._build import load_extension
from ...cache.view import KVView


def k_columns(dtype: torch.dtype) -> bool:
    """Whether the plugin keeps K as columns in pages of this dtype: float32 (as vLLM's own CPU writer
    does). Each (page, kv head) block's K half is then `D` rows of `page_size` values, row d holding
    element d of the page's keys, so the decode kernel's scores come out with the keys in the vector
    lanes (csrc/cpu/decode_kcols.h). bfloat16 / float16 keep K rows (their products read pairs of rows)."""
    return dtype == torch.float32


def split_pages(kv_cache: torch.Tensor, columns: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(num_pages, Hkv, page_size, 2 * D)` -> K and V views `(num_pages, Hkv, page_size, D)` (no copy).
    `columns` (default: `k_columns(kv_cache.dtype)`): K as columns, the view's strides along
    (page_size, D) then (1, page_size); any reader that goes through the views sees the same keys."""
    if kv_cache.dim() != 4 or kv_cache.shape[3] % 2:
        raise ValueError(f"kv_cache must have shape (num_pages, Hkv, page_size, 2 * head_dim), got "
                         f"{tuple(kv_cache.shape)}")
    pages, heads, page_size, two_d = kv_cache.shape
    both = kv_cache.view(pages, heads, 2 * page_size, two_d // 2)
    k, v = both[:, :, :page_size], both[:, :, page_size:]
    if columns is None:
        columns = k_columns(kv_cache.dtype)
    if columns:
        halves = kv_cache.view(pages, heads, 2, page_size * (two_d // 2))
        k = halves[:, :, 0].view(pages, heads, two_d // 2, page_size).transpose(2, 3)
    return k, v


def write_pages(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                page_sums: torch.Tensor | None = None, windows: "PageWindows | None" = None,
                pages: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Store the new tokens' `key` / `value` `(T, Hkv, D)` at their slots (`slot_mapping` `(>= T,)`:
    `page * page_size + row`, negative for padding tokens, which are skipped). `page_sums`
    `(num_pages, Hkv, D)` float32, when given, is kept equal to the sum of each page's rows;
    `windows` (InfLLMv2) gets the rows' keys into its chunk sums (`PageWindows.add_rows`; its
    windows are completed by `PageWindows.complete`, which needs the block table). `pages`: the
    caller's `split_pages(kv_cache)`, kept (~6 us a call to make again).

    On the CPU the rows and the page sums go through the extension's `write_page_rows`
    (csrc/cpu/page_write.cpp: one pass, rows read through their strides, parallel over rows). It
    replaced two advanced-index writes (plus a mask and the sums' `index_add_`): on a 2-core Zen 4
    (bf16, Hkv 2, D 64, 16-token pages) those took 31 us for one decode token and 107 us for 512
    rows, this takes 3 us and 12 us (24 us with TopK's page sums); on a 2-core Sapphire Rapids the
    advanced-index writes took ~60 us for one token where vLLM's own writer took ~24 us
    (docs/vllm_measurements.md). Elsewhere, `write_pages_indexed` (the same result in PyTorch ops)."""
    if kv_cache.device.type != "cpu":
        write_pages_indexed(kv_cache, key, value, slot_mapping, page_sums, windows)
        return
    k_pages, v_pages = pages if pages is not None else split_pages(kv_cache)
    rows_k, rows_v = key, value
    if key.dtype != k_pages.dtype:  # vLLM hands the model's dtype; a cache of another one converts first
        rows_k, rows_v = key.to(k_pages.dtype), value.to(v_pages.dtype)
    load_extension("cpu_decode").write_page_rows(k_pages, v_pages, rows_k, rows_v, slot_mapping, page_sums)
    if windows is not None and key.shape[0]:
        slots = slot_mapping[:key.shape[0]].long()
        keep = slots >= 0
        windows.add_rows(slots[keep] // k_pages.shape[2], slots[keep] % k_pages.shape[2], key[keep])


def write_pages_indexed(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                        page_sums: torch.Tensor | None = None, windows: "PageWindows | None" = None) -> None:
    """`write_pages` in PyTorch ops (advanced-index writes): any device, and the definition the
    CPU extension's writer is tested against."""
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
    if windows is not None and page.numel():
        windows.add_rows(page, row, key)


def gather_keys(pages: torch.Tensor, table_row: torch.Tensor, lo: int, hi: int,
                scratch: "Scratch | None" = None, slot: int = 0) -> torch.Tensor:
    """Rows `[lo, hi)` of one sequence, `(1, Hkv, hi - lo, D)`, from `pages` `(num_pages, Hkv,
    page_size, D)` through its block-table row: what a later chunk of a chunked prefill attends to.
    One pass, head-major: each (page, kv head) block of `page_size` rows is one slice of the pages
    seen as `(num_pages * Hkv, page_size, D)` (vLLM's K or V view flattens so without a copy), and
    `index_select` takes head 0's pages, then head 1's ..., so the result is `(Hkv, pages * rows,
    D)` as written. `scratch`: the rows go into its buffer `slot` and the result is a view of it,
    valid until that buffer is next used: a fresh tensor per chunk spent more on first touching its
    memory than on the copy (128K float32 keys of Hkv 2, D 64, K and V, 2 threads: 40 ms fresh,
    11 ms into a buffer already touched)."""
    ps, heads, d = pages.shape[2], pages.shape[1], pages.shape[3]
    first, last = lo // ps, -(-hi // ps)
    n = last - first
    try:
        flat = pages.view(pages.shape[0] * heads, ps, d)
    except RuntimeError:  # a layout whose (page, head) blocks do not flatten: index the pages, then the heads
        flat = None
    if flat is None:
        rows = pages.permute(1, 0, 2, 3)[:, table_row[first:last].long()]  # (Hkv, n, ps, D), contiguous
    else:
        idx = (table_row[first:last].long()[None, :] * heads + torch.arange(heads)[:, None]).reshape(-1)
        if scratch is not None:
            out = scratch.get(slot, heads * n * ps * d, pages.dtype, pages.device)
            rows = torch.index_select(flat, 0, idx, out=out[:heads * n * ps * d].view(heads * n, ps, d))
        else:
            rows = torch.index_select(flat, 0, idx)
    return rows.reshape(heads, n * ps, d)[None, :, lo - first * ps:hi - first * ps]


class Scratch:
    """Buffers reused from call to call (`gather_keys`' `scratch`): `get(i, numel, dtype)` is buffer
    i, at least `numel` elements, grown by a quarter more when it must grow. Held until the owner
    goes (the vLLM backend keeps one per process, shared by the layers, which run one after the
    other: 1.25x the longest chunk's K and V of one layer)."""

    def __init__(self):
        self._bufs = {}

    def get(self, i: int, numel: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        b = self._bufs.get(i)
        if b is None or b.numel() < numel or b.dtype != dtype or (device is not None and b.device != torch.device(device)):
            b = torch.empty(max(numel, numel + numel // 4), dtype=dtype, device=device)
            self._bufs[i] = b
        return b


class PageWindows:
    """InfLLMv2's compressed keys kept beside vLLM's pages, up to date after every step.

    InfLLMv2 scores the mean key of every window of `size` keys at `stride` (fine, and coarse: 4x
    both); the C++ decode selection reads their sums. vLLM's pages belong to no sequence for good
    (prefix caching shares full pages, freed pages are reused), so the sums are kept per page:

    * `chunks` `(num_pages, page_size / c, Hkv, D)` float32: the sum of each run of `c = gcd(sizes,
      strides, page_size)` rows of a page, updated by every write (`add_rows`, from `write_pages`);
      a write at a page's first row restarts the page's chunks;
    * per (size, stride), `sums[(size, stride)]` `(num_pages, ceil(page_size / stride), Hkv, D)`
      float32: window `j` of a sequence (keys `[j * stride, j * stride + size)`) lies in the page
      of its LAST row `e = j * stride + size - 1`, at slot `(e % page_size) // stride`. It is
      written once, when the step that writes row `e` completes it (`complete`: the sum of its
      `size / c` chunks, read through the block table). The page of the last row is the right
      home: vLLM shares a page only between sequences whose whole prefix up to it is equal, so a
      shared page's windows are the same for all of them; a reused page is rewritten from its
      first row, so its windows are written again as they complete.

    A decode step then costs O(1) here (a window completes every `stride` tokens) and the
    selection reads the sums through the block table (`infllmv2_select_pages`,
    csrc/cpu/infllmv2_decode.cpp). A slot whose window is not complete holds stale data: only
    complete windows are read (cache/compressed.py says the same of its own sums)."""

    def __init__(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, windows, device=None):
        self.page_size = page_size
        self.windows = tuple((int(a), int(b)) for a, b in windows)
        self.chunk = math.gcd(page_size, *[x for w in self.windows for x in w])
        self.chunks = torch.zeros(num_pages, page_size // self.chunk, kv_heads, head_dim, device=device)
        self.sums = {w: torch.zeros(num_pages, -(-page_size // w[1]), kv_heads, head_dim, device=device)
                     for w in self.windows}

    @property
    def num_pages(self) -> int:
        return self.chunks.shape[0]

    def add_rows(self, page: torch.Tensor, row: torch.Tensor, key: torch.Tensor) -> None:
        """Keys `(T, Hkv, D)` just stored at rows `row` of pages `page` (long `(T,)`)."""
        nch = self.chunks.shape[1]
        self.chunks[page[row == 0]] = 0  # a page written from its first row holds new chunks
        flat = self.chunks.view(-1, *self.chunks.shape[2:])  # (pages * nch, Hkv, D)
        flat.index_add_(0, page * nch + row // self.chunk, key.to(flat.dtype))

    def complete(self, block_table: torch.Tensor, spans) -> None:
        """Rows `[lo, hi)` of sequence `b` (row `b` of `block_table`) were written this step, for
        each `(b, lo, hi)` of `spans`: every window whose last row is among them is summed from its
        chunks and stored. Host arithmetic only where no window completes (most decode steps)."""
        ps, c = self.page_size, self.chunk
        flat = self.chunks.view(-1, *self.chunks.shape[2:])
        for (size, stride), sums in self.sums.items():
            seqs, starts = [], []
            for b, lo, hi in spans:
                j0 = max(0, -((size - 1 - lo) // stride))  # first window ending at or after row lo
                j1 = (hi - size) // stride  # last window ending before row hi
                if hi >= size and j1 >= j0:
                    seqs.append(torch.full((j1 - j0 + 1,), b, dtype=torch.long))
                    starts.append(torch.arange(j0, j1 + 1) * stride)
            if not seqs:
                continue
            seq, start = torch.cat(seqs), torch.cat(starts)
            rows = start[:, None] + torch.arange(0, size, c)  # (J, size / c): each chunk's first row
            chunk_at = block_table[seq[:, None], rows // ps].long() * (ps // c) + rows % ps // c
            end = start + size - 1
            dst = block_table[seq, end // ps].long() * sums.shape[1] + end % ps // stride
            sums.view(-1, *sums.shape[2:])[dst] = flat[chunk_at.to(flat.device)].sum(1)

    def over(self, page_table: torch.Tensor) -> "PagedWindowSums":
        """The read side for one batch (`KVView.compressed`)."""
        return PagedWindowSums(self, page_table)


class PagedWindowSums:
    """InfLLMv2's compressed keys of a batch's sequences (the `compressed` of a `KVView`): the
    per-page window sums of `PageWindows` and the batch's block table. The CPU decode selection
    reads them in place (`by_page`, `page_table`, `page_size`); `sums` gathers one sequence-major
    copy `(B, Hkv, ceil(max_len / stride) + 1, D)` as `cache/compressed.py` keeps them (the
    PyTorch selection's input: float64 is not kept here, so that path serves checks only)."""

    def __init__(self, windows: PageWindows, page_table: torch.Tensor):
        self.windows, self.page_table, self.page_size = windows, page_table, windows.page_size

    @property
    def dtype(self) -> torch.dtype:
        """The sums' dtype (float32): the C++ decode selection reads float32 sums
        (`backends/cpu/infllmv2.native_over_cache`)."""
        return self.windows.chunks.dtype

    def by_page(self, size: int, stride: int) -> torch.Tensor:
        """`(num_pages, slots, Hkv, D)`: window `j` in the page of its last row (`PageWindows`)."""
        if (size, stride) not in self.windows.sums:
            raise ValueError(f"windows of {size} keys at stride {stride} are not kept (kept: "
                             f"{list(self.windows.sums)})")
        return self.windows.sums[(size, stride)]

    def sums(self, size: int, stride: int, view) -> torch.Tensor:
        paged = self.by_page(size, stride)
        ps, slots = self.page_size, paged.shape[1]
        b, width = self.page_table.shape
        n = -(-view.max_len // stride)
        end = torch.arange(n) * stride + size - 1
        inside = end // ps < width  # a window ending past the table is not complete
        page = self.page_table[:, (end // ps).clamp(max=width - 1)].long().clamp(0, paged.shape[0] - 1)
        rows = paged.view(-1, *paged.shape[2:])[page * slots + end % ps // stride]  # (B, n, Hkv, D)
        out = rows.new_zeros(b, paged.shape[2], n + 1, paged.shape[3])
        out[:, :, :n] = (rows * inside[None, :, None, None]).permute(0, 2, 1, 3)
        return out


class PagesCache:
    """The few requests of a batch that decode, as a cache `attention_with_cache` reads: vLLM's
    pages, the requests' block-table rows and lengths (`kv_view()`, no copy of K/V).

    Args:
        kv_cache: the layer's `(num_pages, Hkv, page_size, 2 * D)` tensor.
        block_table: int32 `(B, W)`; seq_lens: int32 `(B,)`; host_lengths: the same as host ints.
        page_sums: `(num_pages, Hkv, D)` float32 sums of each page's keys (TopK), else None.
        windows: InfLLMv2's window sums kept beside the pages (`PageWindows`), else None.
        pages: `split_pages(kv_cache)` when the caller keeps it (the backend: once per cache tensor).
    """

    def __init__(self, kv_cache, block_table, seq_lens, host_lengths, *, page_sums=None, windows=None, pages=None):
        self.k_pages, self.v_pages = pages if pages is not None else split_pages(kv_cache)
        self.block_table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
        self.seq_lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)
        self.host_lengths = tuple(int(n) for n in host_lengths)
        self.page_sums = page_sums
        self.windows = windows

    def kv_view(self) -> KVView:
        page_size = self.k_pages.shape[2]
        sums = self.page_sums  # (pages, Hkv, D): read through the block table, as the keys are
        compressed = None if self.windows is None else self.windows.over(self.block_table)
        return KVView(kind="paged", k=self.k_pages, v=self.v_pages, page_table=self.block_table, page_size=page_size,
                      lengths=self.seq_lens, host_lengths=self.host_lengths, block_sums=sums, compressed=compressed,
                      pool_block_size=page_size if sums is not None else None, sums_by_page=sums is not None,
                      max_len=self.block_table.shape[1] * page_size, value_dtype=self.k_pages.dtype)
