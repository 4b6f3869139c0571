"""What both caches share: per-sequence lengths (on the device, mirrored on the host), argument
checks, and the running block sums of the keys that TopK selection reads.

The host mirror of the lengths is bookkeeping the caller already owns (it decides how many tokens
each sequence appends), so checks such as "capacity exceeded" never read the device. The device
copy is what kernels consume; a decode step reads no host value that changes between steps except
through it.
"""
from __future__ import annotations

import torch

from ..scheduler.device import check_device
from ..scheduler.problem import FLOAT_DTYPES
from .compressed import CompressedKeySums
from .view import KVView
from .quant import check_kv_dtype, dequantize, quantize_rows, storage_dtype
from .released import check_reach


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class CacheBase:
    """Shared state: shapes, dtype, device, lengths, pooled-key sums, the storage's quantization."""

    def __init__(self, batch, kv_heads, head_dim, *, v_head_dim, dtype, device, pool_block_size, max_len,
                 kv_dtype=None):
        self.batch = check_positive_int("batch", batch)
        self.kv_heads = check_positive_int("kv_heads", kv_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.v_head_dim = check_positive_int("v_head_dim", head_dim if v_head_dim is None else v_head_dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        self.dtype = dtype
        #: None (rows stored in `dtype`) or "int8" / "fp8_e4m3" (quant.py: codes + a float32 scale per
        #: token and kv head); `dtype` stays the dtype of the rows appended and of the queries
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.device = check_device(device)
        self.pool_block_size = check_positive_int("pool_block_size", pool_block_size)
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.host_lengths = [0] * batch
        #: per sequence, the key positions given back to a pool, as disjoint spans (released.py)
        self.released: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
        nb = -(-max_len // self.pool_block_size)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        # running sums of the keys of each block; block `nb` is a trash slot for padding rows
        self._block_sums = torch.zeros(batch, kv_heads, nb + 1, head_dim, dtype=acc, device=self.device)
        #: InfLLMv2's compressed keys, as running window sums, made when a pattern first asks (compressed.py)
        self._compressed = CompressedKeySums(batch, kv_heads, head_dim, max_len, acc, self.device)

    # ---------------------------------------------------------------------------------- appends
    def _check_append(self, k, v, num_new):
        for name, x, d in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[0] != self.batch or x.shape[1] != self.kv_heads or x.shape[3] != d:
                raise ValueError(f"{name} must have shape (batch={self.batch}, kv_heads={self.kv_heads}, T, {d}), "
                                 f"got {tuple(x.shape)}")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} is on {x.device} but the cache is on {self.device}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must append the same number of tokens, got {k.shape[2]} and {v.shape[2]}")
        t = k.shape[2]
        if num_new is None:
            counts = [t] * self.batch
        else:
            if isinstance(num_new, torch.Tensor):
                raise TypeError("num_new must be a list of host ints (one per sequence), not a tensor: the cache "
                                "allocates on the host and must not read the device")
            if not isinstance(num_new, (list, tuple)):
                raise TypeError(f"num_new must be None or a list of {self.batch} ints (one per sequence), "
                                f"got {type(num_new).__name__} {num_new!r}")
            counts = list(num_new)
            if len(counts) != self.batch or any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
                raise TypeError(f"num_new must be a list of {self.batch} ints, got {num_new!r}")
            if any(c < 0 or c > t for c in counts):
                raise ValueError(f"num_new entries must be in [0, T={t}], got {counts}")
        new = [a + c for a, c in zip(self.host_lengths, counts)]
        if max(new, default=0) > self.max_len:
            raise ValueError(f"append would grow a sequence to {max(new)} tokens; this cache holds at most "
                             f"{self.max_len} per sequence")
        return t, counts, new

    def _positions(self, t: int, counts):
        """Device positions `(B, T)` of the new tokens and their validity (rows past num_new[b])."""
        steps = torch.arange(t, device=self.device)
        pos = self.lengths.long()[:, None] + steps[None, :]
        n = torch.tensor(counts, dtype=torch.long).to(self.device, non_blocking=True)
        return pos, steps[None, :] < n[:, None]

    def _add_block_sums(self, k, pos, valid):
        nb_trash = self._block_sums.shape[2] - 1
        blk = torch.where(valid, pos // self.pool_block_size, torch.full_like(pos, nb_trash))
        b_idx = torch.arange(self.batch, device=self.device)[:, None, None]
        h_idx = torch.arange(self.kv_heads, device=self.device)[None, :, None]
        self._block_sums.index_put_((b_idx, h_idx, blk[:, None, :]), k.to(self._block_sums.dtype), accumulate=True)
        self._compressed.add(k, pos, valid)

    def _storage_dtype(self) -> torch.dtype:
        return self.dtype if self.kv_dtype is None else storage_dtype(self.kv_dtype)

    def _encode(self, k, v):
        """What an append stores: `(k, v, k_scale, v_scale, keys for the block sums)`; the scales
        are None and the rows unchanged for an unquantized cache. Quantized, the block sums take
        the dequantized keys (TopK selects over what attention reads)."""
        if self.kv_dtype is None:
            return k, v, None, None, k
        kq, ks = quantize_rows(k, self.kv_dtype)
        vq, vs = quantize_rows(v, self.kv_dtype)
        return kq, vq, ks, vs, dequantize(kq, ks, self._block_sums.dtype)

    def _commit_lengths(self, new):
        self.host_lengths = new
        self.lengths.copy_(torch.tensor(new, dtype=torch.int32), non_blocking=True)

    # ------------------------------------------------------------------------------------ reads
    def check_reach(self, pattern, sq: int) -> None:
        """Raise `ValueError` (naming the pattern and the released range) if the last `sq` queries
        of some sequence may, under `pattern`, read keys this cache released. Host integers only."""
        if any(self.released):
            check_reach(pattern, self.released, self.host_lengths, sq)

    @property
    def max_length(self) -> int:
        """Longest sequence now (host value)."""
        return max(self.host_lengths, default=0)

    def _storage(self) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """`(kind, k pages, v pages, page_table, page_size)` of this layout."""
        raise NotImplementedError

    def kv_view(self) -> KVView:
        """The read view kernels consume (host work only: no copy, no device read)."""
        kind, k, v, table, page_size = self._storage()
        ks, vs = self._scales()
        return KVView(kind=kind, k=k, v=v, page_table=table, page_size=page_size, lengths=self.lengths,
                      host_lengths=tuple(self.host_lengths), block_sums=self._block_sums,
                      pool_block_size=self.pool_block_size, max_len=self.max_len, quant=self.kv_dtype,
                      k_scale=ks, v_scale=vs, value_dtype=self.dtype, compressed=self._compressed)

    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The float32 row scales `(pages, Hkv, page_size)` of K and V (None, None unquantized)."""
        return None, None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (what `nbytes()` counts)."""
        _, k, v, table, _ = self._storage()
        return [k, v, table, self.lengths, self._block_sums, *(s for s in self._scales() if s is not None),
                *self._compressed.tensors()]

    def nbytes(self) -> int:
        """Bytes of storage the cache holds (each storage once)."""
        return storage_bytes(self.tensors())

    def pooled_keys(self, num_blocks: int) -> torch.Tensor:
        """Mean key of blocks `[0, num_blocks)` of each sequence `(B, Hkv, num_blocks, D)` (float32;
        float64 for a float64 cache). A block's mean is over its keys present now; absent blocks give 0."""
        return self.kv_view().pooled_keys(num_blocks)

    def gather(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at positions `[lo, hi)` of every sequence, `(B, Hkv, hi - lo, D|Dv)`
        (dequantized to float32 for a quantized cache). Rows at or past a sequence's length hold
        stale data: callers mask them by `lengths`."""
        return self.kv_view().gather(lo, hi)


def storage_bytes(tensors) -> int:
    """Bytes pinned by `tensors`: the whole storage behind each, each storage once."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())
