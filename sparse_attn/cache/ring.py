"""`RingKVCache`: the keys a `SlidingWindow(window, sinks)` layer can still see, in fixed storage.

The first `sinks` tokens keep their slots; every later token `p` goes to slot
`sinks + (p - sinks) % window`, over the token that left the window. After appending token `p` the
filled slots `[0, min(p + 1, sinks + window))` hold exactly the keys query `p` sees, in some order:
softmax does not depend on the order, so a decode step is `Dense(causal=False)` attention over the
filled slots, and the view is a contiguous cache of that length. Memory is `sinks + window` tokens
of K/V at any context length; nothing is reallocated per token. The sequences of the batch advance
together (a model's decode loop); chunks of several tokens read `ordered()`, the kept keys in
position order, and apply the window rule relative to the end.

With `kv_dtype="int8" | "fp8_e4m3"` the slots hold codes and one float32 scale per row
(`k_scale` / `v_scale` `(B, Hkv, sinks + window)`), quantized on append as `KVCache` does
(cache/quant.py): the view says so and the decode kernels read the codes; `ordered()` dequantizes.
"""
from __future__ import annotations

import torch

from ..scheduler.device import check_device
from . import huge_pages
from .base import check_positive_int, storage_bytes
from .quant import check_kv_dtype, dequantize, quantize_rows, storage_dtype
from .view import KVView


class RingKVCache:
    """Ring storage of a sliding window: `k`, `v` `(B, Hkv, sinks + window, D|Dv)`.

    `append(k, v)` adds `T` tokens to every sequence; `kv_view()` is the filled slots as a
    contiguous cache (query rows see all of them: `Dense(causal=False)` for one row);
    `ordered()` the sinks then the last `window` tokens in position order (a fresh tensor).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, *, window: int, sinks: int = 0,
                 v_head_dim: int | None = None, dtype: torch.dtype = torch.float32, device="cpu", kv_dtype=None):
        for name, x, lo in (("batch", batch, 1), ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 1),
                            ("window", window, 1), ("sinks", sinks, 0)):
            check_positive_int(name, x, minimum=lo)
        dv = head_dim if v_head_dim is None else check_positive_int("v_head_dim", v_head_dim)
        self.window, self.sinks = window, sinks
        self.capacity = sinks + window
        self.device = check_device(device)
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.dtype = dtype
        sdt = dtype if kv_dtype is None else storage_dtype(kv_dtype)
        self.k = huge_pages.zeros(batch, kv_heads, self.capacity, head_dim, dtype=sdt, device=self.device)
        self.v = huge_pages.zeros(batch, kv_heads, self.capacity, dv, dtype=sdt, device=self.device)
        self.k_scale = self.v_scale = None
        if kv_dtype is not None:
            self.k_scale = torch.ones(batch, kv_heads, self.capacity, dtype=torch.float32, device=self.device)
            self.v_scale = torch.ones(batch, kv_heads, self.capacity, dtype=torch.float32, device=self.device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)  # filled slots
        self._page_table = torch.arange(batch, dtype=torch.int32, device=self.device)[:, None]
        self.length = 0  # tokens appended (host)

    def _slot(self, p: int) -> int:
        return p if p < self.sinks else self.sinks + (p - self.sinks) % self.window

    def filled(self) -> int:
        return min(self.length, self.capacity)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add `k`, `v` `(B, Hkv, T, D|Dv)`: the tokens that stay visible are written in place."""
        for name, x, like in (("k", k, self.k), ("v", v, self.v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[:2] != like.shape[:2] or x.shape[3] != like.shape[3]:
                raise ValueError(f"{name} must have shape ({like.shape[0]}, {like.shape[1]}, T, {like.shape[3]}), "
                                 f"got {tuple(x.shape)}")
            if x.dtype != self.dtype or x.device != like.device:
                raise TypeError(f"{name} must be {self.dtype} on {like.device}, got {x.dtype} on {x.device}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must append the same number of tokens, got {k.shape[2]} and {v.shape[2]}")
        n0, n1 = self.length, self.length + k.shape[2]
        keep = list(range(n0, min(n1, self.sinks))) + list(range(max(n0, self.sinks, n1 - self.window), n1))
        # runs of consecutive slots (at most three: sinks, ring, ring after wrapping): slice copies
        i = 0
        while i < len(keep):
            j = i + 1
            while j < len(keep) and self._slot(keep[j]) == self._slot(keep[j - 1]) + 1:
                j += 1
            s0, t0 = self._slot(keep[i]), keep[i] - n0
            kr, vr = k[:, :, t0:t0 + j - i], v[:, :, t0:t0 + j - i]
            if self.kv_dtype is not None:  # only the rows that stay visible are quantized
                (kr, ks), (vr, vs) = quantize_rows(kr, self.kv_dtype), quantize_rows(vr, self.kv_dtype)
                self.k_scale[:, :, s0:s0 + j - i].copy_(ks)
                self.v_scale[:, :, s0:s0 + j - i].copy_(vs)
            self.k[:, :, s0:s0 + j - i].copy_(kr)
            self.v[:, :, s0:s0 + j - i].copy_(vr)
            i = j
        before = self.filled()
        self.length = n1
        if self.filled() != before:
            self.lengths.fill_(self.filled())

    def kv_view(self) -> KVView:
        """The filled slots as a contiguous cache (one page of `sinks + window` rows per sequence)."""
        n = self.filled()
        return KVView(kind="contiguous", k=self.k, v=self.v, page_table=self._page_table, page_size=self.capacity,
                      lengths=self.lengths, host_lengths=(n,) * self.k.shape[0], block_sums=None,
                      pool_block_size=None, max_len=self.capacity, quant=self.kv_dtype, k_scale=self.k_scale,
                      v_scale=self.v_scale, value_dtype=self.dtype)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept keys and values in position order `(B, Hkv, n, D|Dv)`: the sinks, then the last
        `window` tokens (n = `filled()`); a fresh tensor."""
        ns = min(self.sinks, self.length)
        rest = range(max(self.sinks, self.length - self.window), self.length)
        idx = torch.tensor(list(range(ns)) + [self._slot(p) for p in rest], dtype=torch.long, device=self.device)
        k, v = self.k.index_select(2, idx), self.v.index_select(2, idx)
        if self.kv_dtype is None:
            return k, v
        return (dequantize(k, self.k_scale.index_select(2, idx)).to(self.dtype),
                dequantize(v, self.v_scale.index_select(2, idx)).to(self.dtype))

    def cached_tokens(self) -> int:
        return self.filled()

    def tensors(self) -> list[torch.Tensor]:
        scales = [] if self.kv_dtype is None else [self.k_scale, self.v_scale]
        return [self.k, self.v, *scales, self.lengths, self._page_table]

    def nbytes(self) -> int:
        return storage_bytes(self.tensors())

    def __repr__(self):
        return (f"RingKVCache(batch={self.k.shape[0]}, kv_heads={self.k.shape[1]}, head_dim={self.k.shape[3]}, "
                f"window={self.window}, sinks={self.sinks}, length={self.length}, dtype={self.dtype}"
                + (f", kv_dtype={self.kv_dtype})" if self.kv_dtype else ")"))
