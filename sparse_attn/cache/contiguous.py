"""`KVCache`: one contiguous `(B, Hkv, max_len, D)` buffer per tensor, per-sequence lengths."""
from __future__ import annotations

import torch

from . import huge_pages
from .base import CacheBase, check_positive_int


class KVCache(CacheBase):
    """Contiguous KV cache for a batch of sequences of different lengths.

    Args:
        batch, kv_heads, head_dim: shapes; `v_head_dim` defaults to `head_dim`.
        max_len: tokens each sequence may hold.
        dtype, device: of the stored keys and values.
        pool_block_size: block size of the pooled keys kept for `TopK` (match the pattern's).

    `append(k, v, num_new=None)` appends `k`, `v` `(B, Hkv, T, D)`: all `T` tokens to every sequence,
    or the first `num_new[b]` tokens to sequence `b` (a host list: ragged appends). Sequence `b`
    then holds `lengths[b]` tokens, and a query block attends end-aligned to that length.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, *, v_head_dim: int | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu", pool_block_size: int = 64):
        check_positive_int("max_len", max_len)
        super().__init__(batch, kv_heads, head_dim, v_head_dim=v_head_dim, dtype=dtype, device=device,
                         pool_block_size=pool_block_size, max_len=max_len)
        # one spare row past max_len receives the padding rows of ragged appends
        # (on Linux CPUs in transparent huge pages: huge_pages.py)
        self.k = huge_pages.zeros(batch, kv_heads, max_len + 1, self.head_dim, dtype=dtype, device=self.device)
        self.v = huge_pages.zeros(batch, kv_heads, max_len + 1, self.v_head_dim, dtype=dtype, device=self.device)
        self._page_table = torch.arange(batch, dtype=torch.int32, device=self.device)[:, None]

    def append(self, k: torch.Tensor, v: torch.Tensor, num_new=None) -> None:
        t, counts, new = self._check_append(k, v, num_new)
        if t == 0:
            return
        pos, valid = self._positions(t, counts)
        row = torch.where(valid, pos, torch.full_like(pos, self.max_len))  # (B, T)
        b_idx = torch.arange(self.batch, device=self.device)[:, None]
        # advanced indices around a slice: the (B, T) index dims come first, then Hkv, D
        self.k[b_idx, :, row] = k.permute(0, 2, 1, 3)
        self.v[b_idx, :, row] = v.permute(0, 2, 1, 3)
        self._add_block_sums(k, pos, valid)
        self._commit_lengths(new)

    def reserve(self, max_len: int) -> None:
        """Grow to hold at least `max_len` tokens per sequence: new storage, the held rows and block
        sums copied (a model cache doubles its capacity this way: O(1) amortised per token). The
        cache's tensors change: a plan or view made before reads the old ones."""
        check_positive_int("max_len", max_len)
        if max_len <= self.max_len:
            return
        n = self.max_length
        k = huge_pages.zeros(self.batch, self.kv_heads, max_len + 1, self.head_dim, dtype=self.dtype, device=self.device)
        v = huge_pages.zeros(self.batch, self.kv_heads, max_len + 1, self.v_head_dim, dtype=self.dtype,
                             device=self.device)
        k[:, :, :n], v[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
        sums = self._block_sums.new_zeros(self.batch, self.kv_heads, -(-max_len // self.pool_block_size) + 1,
                                          self.head_dim)
        used = self._block_sums.shape[2] - 1  # without the trash slot
        sums[:, :, :used] = self._block_sums[:, :, :used]
        self.k, self.v, self._block_sums, self.max_len = k, v, sums, max_len

    def _storage(self):
        # sequence b is page b, of max_len + 1 rows
        return "contiguous", self.k, self.v, self._page_table, self.max_len + 1

    def __repr__(self):
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"max_len={self.max_len}, lengths={self.host_lengths}, dtype={self.dtype}, device={self.device})")
