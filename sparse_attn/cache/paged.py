"""`PagedKVCache`: K/V in a pool of fixed-size pages, a page table per sequence (vLLM, FlashInfer).

Pages are allocated on the host (the caller's scheduler knows how many tokens each sequence
appends), so appends never read the device. Page `num_pages` is a trash page: padding rows of
ragged appends land there, and page-table entries of pages that were never allocated or were
released point to it, so every gather is in bounds.
"""
from __future__ import annotations

import torch

from ..patterns import SlidingWindow
from . import huge_pages
from .base import CacheBase, check_positive_int
from .released import add_span


class PagedKVCache(CacheBase):
    """Paged KV cache for a batch of sequences of different lengths.

    Args:
        batch, kv_heads, head_dim: shapes; `v_head_dim` defaults to `head_dim`.
        num_pages: pages in the shared pool.
        page_size: tokens per page.
        max_len: tokens each sequence may hold (page-table width = ceil(max_len / page_size)).
        dtype, device, pool_block_size, kv_dtype: as in :class:`~sparse_attn.cache.KVCache`
            (quantized: `k_scale` / `v_scale` `(num_pages + 1, Hkv, page_size)` float32 beside the pages).

    `k_pages`/`v_pages` are `(num_pages + 1, Hkv, page_size, D)`; `page_table` is int32
    `(B, ceil(max_len / page_size))`. `release_outside(SlidingWindow(...))` returns the pages that no
    future query of the window can see to the pool; `free(b)` empties a sequence.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, *, num_pages: int, page_size: int = 64,
                 max_len: int, v_head_dim: int | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                 pool_block_size: int = 64, kv_dtype=None):
        check_positive_int("num_pages", num_pages)
        check_positive_int("page_size", page_size)
        check_positive_int("max_len", max_len)
        super().__init__(batch, kv_heads, head_dim, v_head_dim=v_head_dim, dtype=dtype, device=device,
                         pool_block_size=pool_block_size, max_len=max_len, kv_dtype=kv_dtype)
        self.num_pages, self.page_size = num_pages, page_size
        # (on Linux CPUs in transparent huge pages: huge_pages.py)
        sdt = self._storage_dtype()
        self.k_pages = huge_pages.zeros(num_pages + 1, kv_heads, page_size, self.head_dim, dtype=sdt,
                                        device=self.device)
        self.v_pages = huge_pages.zeros(num_pages + 1, kv_heads, page_size, self.v_head_dim, dtype=sdt,
                                        device=self.device)
        self.k_scale = self.v_scale = None
        if self.kv_dtype is not None:  # one float32 scale per row, beside the pages
            self.k_scale = torch.ones(num_pages + 1, kv_heads, page_size, device=self.device)
            self.v_scale = torch.ones(num_pages + 1, kv_heads, page_size, device=self.device)
        width = -(-max_len // page_size)
        self._host_table = [[num_pages] * width for _ in range(batch)]
        self.page_table = torch.full((batch, width), num_pages, dtype=torch.int32, device=self.device)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first

    @property
    def free_pages(self) -> int:
        return len(self._free)

    # ---------------------------------------------------------------------------------- appends
    def append(self, k: torch.Tensor, v: torch.Tensor, num_new=None) -> None:
        t, counts, new = self._check_append(k, v, num_new)
        if t == 0:
            return
        ps = self.page_size
        need = sum(max(0, -(-n // ps) - -(-o // ps)) for o, n in zip(self.host_lengths, new))
        if need > len(self._free):
            raise ValueError(f"append needs {need} new pages but only {len(self._free)} of {self.num_pages} are free; "
                             f"release pages (release_outside / free) or build the cache with more num_pages")
        changed = False
        for b, (old, n) in enumerate(zip(self.host_lengths, new)):
            for slot in range(-(-old // ps), -(-n // ps)):
                self._host_table[b][slot] = self._free.pop()
                changed = True
        if changed:
            self.page_table.copy_(torch.tensor(self._host_table, dtype=torch.int32), non_blocking=True)
        pos, valid = self._positions(t, counts)
        slot = torch.clamp(pos // ps, max=self.page_table.shape[1] - 1)
        page = torch.gather(self.page_table.long(), 1, slot)
        page = torch.where(valid, page, torch.full_like(page, self.num_pages))
        off = pos % ps
        k, v, ks, vs, keys = self._encode(k, v)
        self.k_pages[page, :, off] = k.permute(0, 2, 1, 3)  # (B, T) index dims first, then Hkv, D
        self.v_pages[page, :, off] = v.permute(0, 2, 1, 3)
        if ks is not None:
            self.k_scale[page, :, off] = ks.permute(0, 2, 1)
            self.v_scale[page, :, off] = vs.permute(0, 2, 1)
        self._add_block_sums(keys, pos, valid)
        self._commit_lengths(new)

    # ---------------------------------------------------------------------------------- release
    def release_outside(self, pattern: SlidingWindow) -> int:
        """Return to the pool every page that no query at or after each sequence's current end can
        see under `pattern` (keys `j <= len - 1 - window`, sinks kept). Returns the pages freed."""
        if not isinstance(pattern, SlidingWindow):
            raise TypeError(f"release_outside needs a SlidingWindow pattern, got {type(pattern).__name__}")
        ps, freed = self.page_size, 0
        first_free = -(-pattern.sinks // ps)  # pages holding a sink stay
        for b, n in enumerate(self.host_lengths):
            # the earliest future query sits at position n - 1 (its key may already be appended)
            dead_below = n - pattern.window  # keys j < n - window are invisible from p >= n - 1
            self.released[b] = add_span(self.released[b], first_free * ps, max(first_free, dead_below // ps) * ps)
            for slot in range(first_free, max(first_free, dead_below // ps)):
                if self._host_table[b][slot] != self.num_pages:
                    self._free.append(self._host_table[b][slot])
                    self._host_table[b][slot] = self.num_pages
                    freed += 1
        if freed:
            self.page_table.copy_(torch.tensor(self._host_table, dtype=torch.int32), non_blocking=True)
        return freed

    def free(self, b: int) -> None:
        """Empty sequence `b` and return its pages."""
        check_positive_int("b", b, minimum=0)
        if b >= self.batch:
            raise ValueError(f"b must be < batch={self.batch}, got {b}")
        for slot, page in enumerate(self._host_table[b]):
            if page != self.num_pages:
                self._free.append(page)
                self._host_table[b][slot] = self.num_pages
        self.page_table.copy_(torch.tensor(self._host_table, dtype=torch.int32), non_blocking=True)
        self._block_sums[b].zero_()
        self._compressed.clear(b)
        self.released[b] = []  # nothing of it is left to reach: it restarts empty at position 0
        self.host_lengths[b] = 0
        self.lengths.copy_(torch.tensor(self.host_lengths, dtype=torch.int32), non_blocking=True)

    # ------------------------------------------------------------------------------------ reads
    def _storage(self):
        return "paged", self.k_pages, self.v_pages, self.page_table, self.page_size

    def _scales(self):
        return self.k_scale, self.v_scale

    def __repr__(self):
        return (f"PagedKVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"pages={self.num_pages}x{self.page_size} ({self.free_pages} free), max_len={self.max_len}, "
                f"lengths={self.host_lengths}, dtype={self.dtype}, "
                f"{f'kv_dtype={self.kv_dtype}, ' if self.kv_dtype else ''}device={self.device})")
