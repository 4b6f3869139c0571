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
        dtype, device: of the keys and values appended (and of the queries).
        pool_block_size: block size of the pooled keys kept for `TopK` (match the pattern's).
        kv_dtype: None (store `dtype`), "int8" or "fp8_e4m3": rows quantized on append, one
            float32 scale per token and kv head in `k_scale` / `v_scale` `(B, Hkv, max_len + 1)`
            (`sparse_attn/cache/quant.py`; attention reads the dequantized rows).

    `append(k, v, num_new=None)` appends `k`, `v` `(B, Hkv, T, D)`: all `T` tokens to every sequence,
    or the first `num_new[b]` tokens to sequence `b` (a host list: ragged appends). Sequence `b`
    then holds `lengths[b]` tokens, and a query block attends end-aligned to that length.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, *, v_head_dim: int | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu", pool_block_size: int = 64, kv_dtype=None):
        check_positive_int("max_len", max_len)
        super().__init__(batch, kv_heads, head_dim, v_head_dim=v_head_dim, dtype=dtype, device=device,
                         pool_block_size=pool_block_size, max_len=max_len, kv_dtype=kv_dtype)
        # one spare row past max_len receives the padding rows of ragged appends
        # (on Linux CPUs in transparent huge pages: huge_pages.py)
        self.k, self.v, self.k_scale, self.v_scale = self._alloc(max_len)
        self._page_table = torch.arange(batch, dtype=torch.int32, device=self.device)[:, None]

    def append(self, k: torch.Tensor, v: torch.Tensor, num_new=None) -> None:
        t, counts, new = self._check_append(k, v, num_new)
        if t == 0:
            return
        pos, valid = self._positions(t, counts)
        row = torch.where(valid, pos, torch.full_like(pos, self.max_len))  # (B, T)
        b_idx = torch.arange(self.batch, device=self.device)[:, None]
        k, v, ks, vs, keys = self._encode(k, v)
        # advanced indices around a slice: the (B, T) index dims come first, then Hkv, D
        self.k[b_idx, :, row] = k.permute(0, 2, 1, 3)
        self.v[b_idx, :, row] = v.permute(0, 2, 1, 3)
        if ks is not None:
            self.k_scale[b_idx, :, row] = ks.permute(0, 2, 1)
            self.v_scale[b_idx, :, row] = vs.permute(0, 2, 1)
        self._add_block_sums(keys, pos, valid)
        self._commit_lengths(new)

    def reserve(self, max_len: int) -> None:
        """Grow to hold at least `max_len` tokens per sequence: new storage, the held rows and block
        sums copied (a model cache doubles its capacity this way: O(1) amortised per token). The
        cache's tensors change: a plan or view made before reads the old ones."""
        check_positive_int("max_len", max_len)
        if max_len <= self.max_len:
            return
        n = self.max_length
        k, v, ks, vs = self._alloc(max_len)
        k[:, :, :n], v[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
        if ks is not None:
            ks[:, :, :n], vs[:, :, :n] = self.k_scale[:, :, :n], self.v_scale[:, :, :n]
            self.k_scale, self.v_scale = ks, vs
        sums = self._block_sums.new_zeros(self.batch, self.kv_heads, -(-max_len // self.pool_block_size) + 1,
                                          self.head_dim)
        used = self._block_sums.shape[2] - 1  # without the trash slot
        sums[:, :, :used] = self._block_sums[:, :, :used]
        self.k, self.v, self._block_sums, self.max_len = k, v, sums, max_len
        self._compressed.grow(max_len)

    def _alloc(self, max_len: int):
        """Zeroed K, V storage of `max_len + 1` rows per sequence, and the row scales (None unquantized)."""
        sdt, shape = self._storage_dtype(), (self.batch, self.kv_heads, max_len + 1)
        k = huge_pages.zeros(*shape, self.head_dim, dtype=sdt, device=self.device)
        v = huge_pages.zeros(*shape, self.v_head_dim, dtype=sdt, device=self.device)
        if self.kv_dtype is None:
            return k, v, None, None
        return k, v, torch.ones(shape, device=self.device), torch.ones(shape, device=self.device)

    def _scales(self):
        return self.k_scale, self.v_scale

    def _storage(self):
        # sequence b is page b, of max_len + 1 rows
        return "contiguous", self.k, self.v, self._page_table, self.max_len + 1

    def __repr__(self):
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"max_len={self.max_len}, lengths={self.host_lengths}, dtype={self.dtype}, "
                f"{f'kv_dtype={self.kv_dtype}, ' if self.kv_dtype else ''}device={self.device})")
