"""`KVView`: the one read view of a KV cache that every decode kernel consumes.

A cache is storage (tensors, lengths, page tables, block sums); `cache.kv_view()` describes that
storage in one frozen record, and kernels read the record, never the cache class. Both layouts
are pages: key `j` of sequence `b` is row `j % page_size` of page `page_table[b, j // page_size]`
of `k` / `v` `(pages, Hkv, page_size, D)`. A contiguous cache is one page of `max_len + 1` rows per
sequence (`page_table[b] = [b]`), so a kernel that follows the table serves both; a kernel that has
a faster path for one layout asks `kind`.

A quantized cache (`kv_dtype="int8" | "fp8_e4m3"`, cache/quant.py) says so in `quant` and hands
its float32 row scales `k_scale` / `v_scale` `(pages, Hkv, page_size)`, laid out as the pages; `k` /
`v` then hold the codes, and `dtype` is still the dtype of the queries and of the rows appended. A
kernel declares the storage it reads (`Kernel.kv_dtypes`); `gather` dequantizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("contiguous", "paged")


@dataclass(frozen=True, eq=False)
class KVView:
    """What a cache holds, as a kernel reads it. Host fields never need a device read.

    Attributes:
        kind: "contiguous" or "paged" (a decode kernel declares the kinds it reads).
        k, v: `(pages, Hkv, page_size, D)` / `(pages, Hkv, page_size, Dv)` storage, unit stride on D.
        page_table: int32 `(B, W)` on the cache's device.
        page_size: rows per page (`max_len + 1` for a contiguous cache).
        lengths: int32 `(B,)` on the device: tokens held per sequence (what kernels read).
        host_lengths: the same on the host (what shapes and checks read).
        block_sums: `(B, Hkv, nb + 1, D)` float32 (float64 for a float64 cache) running sums of the
            keys of each `pool_block_size` block (the last slot is a trash slot), or None when the
            storage keeps none.
        pool_block_size: the block of `block_sums` (None with them).
        max_len: tokens a sequence may hold.
        quant: None, or "int8" / "fp8_e4m3": `k` / `v` hold codes, a row's values are its codes
            times its scale.
        k_scale, v_scale: float32 `(pages, Hkv, page_size)` row scales (None unquantized).
        value_dtype: dtype of the rows appended and of the queries (None: `k`'s).
        compressed: the cache's running window sums of its keys (`cache/compressed.py`: InfLLMv2's
            compressed keys), or None when the storage keeps none.
        sums_by_page: `block_sums` is `(pages, Hkv, D)`, one sum per page of `k` (a block is a page:
            `pool_block_size == page_size`), block `n` of sequence `b` at `block_sums[page_table[b,
            n]]` -- sums kept beside pages that sequences share or reuse (vLLM's, integrations/vllm),
            read through the table like the keys, never gathered per step.
    """

    kind: str
    k: torch.Tensor
    v: torch.Tensor
    page_table: torch.Tensor
    page_size: int
    lengths: torch.Tensor
    host_lengths: tuple[int, ...]
    block_sums: torch.Tensor | None
    pool_block_size: int | None
    max_len: int
    quant: str | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    value_dtype: torch.dtype | None = None
    compressed: object | None = None
    sums_by_page: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.sums_by_page and (self.kind != "paged" or self.block_sums is None or self.block_sums.dim() != 3
                                  or self.pool_block_size != self.page_size):
            raise ValueError("sums_by_page needs a paged view whose block_sums are (pages, Hkv, D) and whose "
                             "pool_block_size is its page_size")
        if (self.quant is None) != (self.k_scale is None) or (self.k_scale is None) != (self.v_scale is None):
            raise ValueError("a quantized view needs k_scale and v_scale, an unquantized one neither")

    @property
    def batch(self) -> int:
        return len(self.host_lengths)

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def v_head_dim(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the queries and of the rows appended (not the storage's when quantized)."""
        return self.value_dtype if self.value_dtype is not None else self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def max_length(self) -> int:
        """Longest sequence now (host value)."""
        return max(self.host_lengths, default=0)

    def pooled_keys(self, num_blocks: int) -> torch.Tensor:
        """Mean key of blocks `[0, num_blocks)` of each sequence `(B, Hkv, num_blocks, D)` (float32;
        float64 for a float64 cache): a block's mean over its keys present now; absent blocks give 0."""
        if self.block_sums is None:
            raise ValueError("this cache keeps no block sums of its keys (pool_block_size=None)")
        bs = self.pool_block_size
        start = torch.arange(num_blocks, device=self.device) * bs
        count = torch.clamp(self.lengths.long()[:, None] - start[None, :], min=0, max=bs)  # (B, N)
        if self.sums_by_page:  # each block's page, through the table (a table entry past a length may be stale)
            slot = torch.clamp(torch.arange(num_blocks, device=self.device), max=self.page_table.shape[1] - 1)
            sums = self.block_sums[self.page_table.long()[:, slot]].permute(0, 2, 1, 3)  # (B, Hkv, N, D)
            sums = sums * (count > 0)[:, None, :, None].to(sums.dtype)
        else:
            sums = self.block_sums[:, :, :num_blocks]
        return sums / torch.clamp(count, min=1)[:, None, :, None].to(sums.dtype)

    def window_sums(self, size: int, stride: int) -> torch.Tensor:
        """Running sums of the keys of every `size`-token window at `stride`, `(B, Hkv, W + 1, D)`
        (window `j` starts at `j * stride`; float32, float64 for a float64 cache; the last slot is
        trash): kept by the cache from the first call that asks (cache/compressed.py). A window
        holds the keys present now; only complete ones mean a compressed key."""
        if self.compressed is None:
            raise ValueError("this cache keeps no compressed keys (InfLLMv2 needs a KVCache or PagedKVCache)")
        return self.compressed.sums(size, stride, self)

    def gather(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at positions `[lo, hi)` of every sequence, `(B, Hkv, hi - lo, D|Dv)`;
        a quantized cache's rows dequantized (float32; float64 for a float64 cache). Rows at or
        past a sequence's length hold stale data: callers mask them by `lengths`."""
        if self.kind == "contiguous":  # page b is sequence b: a slice, no copy
            k, v = self.k[:, :, lo:hi], self.v[:, :, lo:hi]
            if self.quant is None:
                return k, v
            return self._dequant(k, self.k_scale[:, :, lo:hi]), self._dequant(v, self.v_scale[:, :, lo:hi])
        pos = torch.arange(lo, hi, device=self.device)
        slot = torch.clamp(pos // self.page_size, max=self.page_table.shape[1] - 1)
        page = self.page_table.long()[:, slot]  # (B, n)
        off = (pos % self.page_size)[None, :].expand_as(page)
        k = self.k[page, :, off].permute(0, 2, 1, 3)  # (B, n, Hkv, D) -> (B, Hkv, n, D)
        v = self.v[page, :, off].permute(0, 2, 1, 3)
        if self.quant is None:
            return k, v
        ks = self.k_scale[page, :, off].permute(0, 2, 1)  # (B, n, Hkv) -> (B, Hkv, n)
        vs = self.v_scale[page, :, off].permute(0, 2, 1)
        return self._dequant(k, ks), self._dequant(v, vs)

    def _dequant(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if self.dtype == torch.float64 else torch.float32
        return codes.to(dt) * scale.to(dt)[..., None]

    def describe(self) -> str:
        lens = self.host_lengths
        span = f"{min(lens)}..{max(lens)}" if lens and min(lens) != max(lens) else str(max(lens, default=0))
        pages = f", page_size={self.page_size}" if self.kind == "paged" else ""
        quant = f"{self.quant} " if self.quant else ""
        return f"{quant}{self.kind} cache (lengths {span}{pages})"
