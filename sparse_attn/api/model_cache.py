"""`ModelCache`: one decode cache for a whole model, one entry per layer.

    cache = sa.ModelCache(n_layers)                         # or max_len=..., page_size=...
    o = cache.attend(i, q, k, v, pattern, gate=gate)        # a softmax / WindowLinear layer
    o = cache.linear(i, q, k, v, decay=decay)               # a linear-attention layer

What an entry holds, created at the layer's first call (its shapes, dtype and device):
- `Dense`, `TopK`, `BlockSparse`: a `KVCache` (or a `PagedKVCache` with `page_size=`), tokens
  appended in place; without `max_len` a contiguous cache doubles its capacity when full (O(1)
  amortised per token, never a reallocation per token);
- `SlidingWindow(window, sinks)`: a `RingKVCache` of `sinks + window` tokens (constant memory);
- `WindowLinear`: its `WindowLinearDecoder` (the sinks, the window and the `(M, z)` memory of the
  evicted tokens; constant memory), driven through `from_prefill` / `extend`;
- a linear-attention layer: its `(B, H, D, Dv)` float32 state (float64 for float64 inputs),
  one tensor updated in place.
Every step is planned by the scheduler: `attention` for a layer's first call, `attention_with_cache`
afterwards, `linear_attention(..., initial_state=, return_state=True)` for linear layers.
The sequences of the batch advance together (`length` tokens each).
"""
from __future__ import annotations

import torch

from .window_linear import WindowLinearDecoder
from ..cache import KVCache, PagedKVCache, RingKVCache
from ..cache.base import storage_bytes
from ..cache.quant import check_kv_dtype, dequantize, quantize_rows
from ..patterns import Dense, Pattern, SlidingWindow, WindowLinear
from .cache import attention_with_cache
from .functional import attention
from .delta import delta_rule
from .linear import linear_attention

#: tokens a growing contiguous cache holds at first (it doubles when full)
_FIRST_CAPACITY = 256


def _held(entry) -> list:
    """The tensors an entry pins (entries may also be bare tensors or tuples of them)."""
    if hasattr(entry, "tensors"):
        return list(entry.tensors())
    if isinstance(entry, (tuple, list)):
        return list(entry)
    return [entry]


class ModelCache:
    """Decode state of a model, one entry per layer (see the module docstring).

    Args:
        n_layers: number of layers.
        max_len: tokens a softmax layer's cache holds (None: contiguous caches that grow).
        page_size: give softmax layers a `PagedKVCache` of this page size (needs `max_len`).
        kv_dtype: None, "int8" or "fp8_e4m3": the K/V of every softmax layer (`KVCache`,
            `PagedKVCache`, `RingKVCache`) stored quantized (cache/quant.py); WindowLinear's window
            and the linear layers' states stay in their dtype (they are small and constant).
    """

    def __init__(self, n_layers: int, *, max_len: int | None = None, page_size: int | None = None, kv_dtype=None):
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 0:
            raise ValueError(f"n_layers must be an int >= 0, got {n_layers!r}")
        for name, x in (("max_len", max_len), ("page_size", page_size)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {x!r}")
        if page_size is not None and max_len is None:
            raise ValueError("page_size needs max_len (a paged cache's page table is sized by it)")
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.entries: list = [None] * n_layers
        self.length = 0
        self.max_len, self.page_size = max_len, page_size

    def __len__(self):
        return len(self.entries)

    def nbytes(self) -> int:
        """Bytes the cache pins: the whole storage behind each held tensor, each storage once."""
        return storage_bytes(t for e in self.entries if e is not None for t in _held(e))

    # ------------------------------------------------------------------------- softmax layers
    def attend(self, i: int, q, k, v, pattern: Pattern, *, gate=None, scale=None, backend=None) -> torch.Tensor:
        """Layer `i`'s attention of `q` `(B, Hq, T, D)` over everything before plus `k`, `v`
        `(B, Hkv, T, D|Dv)` (appended): the rows of a full forward. Returns `(B, Hq, T, Dv)`."""
        entry = self.entries[i]
        if isinstance(pattern, WindowLinear):  # the one pattern that summarises what it evicts
            if entry is None:
                self.entries[i] = WindowLinearDecoder.from_prefill(k, v, pattern, gate=gate, scale=scale)
                return attention(q, k, v, pattern, scale=scale, gate=gate, backend=backend)
            entry.gate = gate
            return entry.extend(q, k, v)
        if entry is None:
            self.entries[i] = entry = self._new_kv(k, v, pattern)
            o = attention(q, k, v, pattern, scale=scale, backend=backend)
            entry.append(k, v)
            return o
        if isinstance(entry, RingKVCache):
            return self._ring_step(entry, q, k, v, pattern, scale=scale, backend=backend)
        if isinstance(entry, KVCache) and self.max_len is None:
            need = entry.max_length + k.shape[2]
            if need > entry.max_len:
                entry.reserve(max(2 * entry.max_len, need))
        entry.append(k, v)
        return attention_with_cache(q, entry, pattern, scale=scale, backend=backend)

    def _new_kv(self, k, v, pattern):
        b, hkv, t, d = k.shape
        like = dict(v_head_dim=v.shape[3], dtype=k.dtype, device=k.device, kv_dtype=self.kv_dtype)
        if isinstance(pattern, SlidingWindow):
            return RingKVCache(b, hkv, d, window=pattern.window, sinks=pattern.sinks, **like)
        pool = pattern.pool_block() or 64
        if self.page_size is not None:
            pages = b * -(-self.max_len // self.page_size)
            return PagedKVCache(b, hkv, d, num_pages=pages, page_size=self.page_size, max_len=self.max_len,
                                pool_block_size=pool, **like)
        cap = self.max_len if self.max_len is not None else max(_FIRST_CAPACITY, 2 * t)
        return KVCache(b, hkv, d, cap, pool_block_size=pool, **like)

    @staticmethod
    def _ring_step(ring, q, k, v, pattern, *, scale, backend):
        if q.shape[2] == 1:
            # the filled slots are exactly the keys the new token sees
            ring.append(k, v)
            return attention_with_cache(q, ring, Dense(causal=False), scale=scale, backend=backend)
        # a chunk: the kept keys in order, then the chunk; the window rule is relative to the end
        # and the sinks are the first kept keys, so this sees what the full sequence would
        ko, vo = ring.ordered()
        kc, vc = k, v
        if ring.kv_dtype is not None:  # the chunk's own keys as the ring stores them (the rows decode reads)
            kc, vc = (dequantize(*quantize_rows(x, ring.kv_dtype)).to(x.dtype) for x in (k, v))
        o = attention(q, torch.cat([ko, kc], 2), torch.cat([vo, vc], 2), pattern, scale=scale, backend=backend)
        ring.append(k, v)
        return o

    # -------------------------------------------------------------------------- linear layers
    def linear(self, i: int, q, k, v, *, decay=None, scale=None, backend=None) -> torch.Tensor:
        """Layer `i`'s `linear_attention` continued from its state, which is updated in place."""
        o, new = linear_attention(q, k, v, decay=decay, scale=scale, initial_state=self.entries[i],
                                  return_state=True, backend=backend)
        return self._keep_state(i, o, new)

    def delta(self, i: int, q, k, v, beta, *, decay=None, scale=None, qk_l2norm=False, backend=None) -> torch.Tensor:
        """Layer `i`'s `delta_rule` continued from its `(B, Hv, D, Dv)` state, updated in place."""
        o, new = delta_rule(q, k, v, beta, decay=decay, scale=scale, initial_state=self.entries[i],
                            return_state=True, qk_l2norm=qk_l2norm, backend=backend)
        return self._keep_state(i, o, new)

    def _keep_state(self, i: int, o: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        state = self.entries[i]
        if state is None:
            self.entries[i] = new.clone()  # owns exactly its storage
        else:
            state.copy_(new)
        return o
