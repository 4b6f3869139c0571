"""`ShardedKVCache`: a long decode context stored across the ranks of a process group.

Rank `r` owns the positions `[r * span, (r + 1) * span)` (`span = ceil(max_len / world)` rounded up
to the pooling block, so TopK blocks never straddle ranks) and keeps them in an ordinary
:class:`~sparse_attn.KVCache` of `span` tokens: memory per rank is `max_len / world`. Every rank
calls `append` with the same new keys and values (the replicated activations of the step); each
keeps only the positions it owns. A decode step (`attention_with_cache(q, cache, pattern)` or
`cache.attend(q, pattern)`) runs on every rank: attention of the step's queries over the local keys
at their absolute positions, then one all-gather of each rank's `(out, lse)` and a log-sum-exp merge
(what an all-reduce of `(max, sum, out)` computes, in one collective). TopK first all-gathers the
scores of each rank's blocks (`Sq x blocks` numbers, not keys) and selects globally, so the
selection is the single-process one. InfLLMv2 likewise: each rank keeps running sums of its keys
per `c`-key chunk (`c = gcd(kernel_size, kernel_stride)`, made on first use, then kept by every
append), the ranks all-gather them (`ceil(length / c)` rows of `D` numbers per kv head, never
keys), and every rank rebuilds the compressed keys and selects as a single process would.
"""
from __future__ import annotations

import math

import torch

from ..cache.base import check_positive_int
from ..cache.contiguous import KVCache
from ..layout.infllmv2_selection import num_windows, token_index_from_compressed
from ..layout.topk_selection import group_mean_queries, top_blocks
from ..patterns import SOFTMAX_PATTERNS, InfLLMv2, TopK
from ..scheduler.problem import check_pattern, check_scale
from .segment import KeySet, segment_forward
from .sharding import group_info, intersect
from .attention import windows_from_chunks
from .transport import all_gather_padded


class ShardedKVCache:
    """Each rank's part of a `(B, Hkv, max_len, D)` context (all sequences of the batch share one
    length here: appends are not ragged). Same constructor arguments as `KVCache` (`kv_dtype`
    included: each rank quantizes the rows it owns), plus `group`."""

    is_sharded = True

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, *, group=None,
                 v_head_dim: int | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                 pool_block_size: int = 64, kv_dtype=None):
        check_positive_int("max_len", max_len)
        check_positive_int("pool_block_size", pool_block_size)
        self.group = group
        self.world, self.rank = group_info(group)
        bs = pool_block_size
        self.span = -(-(-(-max_len // self.world)) // bs) * bs
        self.max_len = max_len
        self.start = self.rank * self.span
        self.local = KVCache(batch, kv_heads, head_dim, self.span, v_head_dim=v_head_dim, dtype=dtype,
                             device=device, pool_block_size=bs, kv_dtype=kv_dtype)
        self.length = 0
        self._chunks: dict[int, torch.Tensor] = {}  # c -> running sums of this rank's keys per c-key chunk

    batch = property(lambda self: self.local.batch)
    kv_heads = property(lambda self: self.local.kv_heads)
    head_dim = property(lambda self: self.local.head_dim)
    v_head_dim = property(lambda self: self.local.v_head_dim)
    dtype = property(lambda self: self.local.dtype)
    kv_dtype = property(lambda self: self.local.kv_dtype)
    device = property(lambda self: self.local.device)

    @property
    def local_range(self) -> tuple[int, int]:
        """Absolute positions `[lo, hi)` this rank holds now."""
        return self.start, self.start + self.local.max_length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append `T` tokens `(B, Hkv, T, D)` at positions `[length, length + T)`; call on every rank
        with the same tensors: each stores the positions it owns."""
        for name, x, d in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[:2] != (self.batch, self.kv_heads) or x.shape[3] != d \
                    or x.shape[2] != k.shape[2]:
                raise ValueError(f"{name} must have shape (batch={self.batch}, kv_heads={self.kv_heads}, T, {d}) "
                                 f"with the same T for k and v, got {tuple(x.shape)}")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")
        lo, hi = self.length, self.length + k.shape[2]
        if hi > self.max_len:
            raise ValueError(f"append would grow the context to {hi} tokens; this cache holds at most {self.max_len}")
        own = intersect([(lo, hi)], [(self.start, self.start + self.span)])
        if own:
            a, b = own[0]
            self.local.append(k[:, :, a - lo:b - lo], v[:, :, a - lo:b - lo])
            for c, sums in self._chunks.items():
                self._add_chunks(sums, c, a - self.start, b - self.start)
        self.length = hi

    def _add_chunks(self, sums: torch.Tensor, c: int, lo: int, hi: int) -> None:
        """Add the keys of local rows `[lo, hi)` (dequantized for a quantized cache) to their chunks."""
        keys, _ = self.local.gather(lo, hi)
        idx = (self.start + torch.arange(lo, hi, device=sums.device)) // c - self.start // c
        sums.index_add_(2, idx, keys.to(sums.dtype))

    def _chunk_sums(self, c: int) -> torch.Tensor:
        """This rank's running key sums per `c`-key chunk `(B, Hkv, n, D)` (chunk `start // c + i` at
        `i`; float32, float64 for a float64 cache): made from the held keys the first time `c` is
        asked for (O(local keys), once), then kept by `append` (O(1) per token)."""
        if c not in self._chunks:
            acc = torch.float64 if self.dtype == torch.float64 else torch.float32
            n = -(-(self.start + self.span) // c) - self.start // c
            sums = torch.zeros(self.batch, self.kv_heads, n, self.head_dim, dtype=acc, device=self.device)
            if self.local.max_length:
                self._add_chunks(sums, c, 0, self.local.max_length)
            self._chunks[c] = sums
        return self._chunks[c]

    def _select_infllmv2(self, q, pattern: InfLLMv2) -> torch.Tensor:
        """InfLLMv2's picks for the step's rows (end-aligned to the context) from the compressed keys of
        the whole context, rebuilt on every rank from the all-gathered chunk sums (a chunk cut by a
        shard boundary arrives as two partial sums, added)."""
        ks, st = pattern.kernel_size, pattern.kernel_stride
        c = math.gcd(ks, st)
        spans = [(r * self.span, min((r + 1) * self.span, self.length)) for r in range(self.world)]
        sizes = [-(-hi // c) - lo // c if hi > lo else 0 for lo, hi in spans]
        mine = self._chunk_sums(c)
        parts = all_gather_padded(mine[:, :, :sizes[self.rank]], sizes, self.group, dim=2, kind="stats")
        chunks = mine.new_zeros(self.batch, self.kv_heads, -(-self.length // c), self.head_dim)
        for (lo, _), part in zip(spans, parts):
            chunks[:, :, lo // c:lo // c + part.shape[2]] += part
        kc = windows_from_chunks(chunks, c, ks, st, num_windows(self.length, ks, st))
        kc2 = None
        if pattern.normalizer == "coarse":
            kc2 = windows_from_chunks(chunks, c, 4 * ks, 4 * st, num_windows(self.length, 4 * ks, 4 * st))
        return token_index_from_compressed(q.detach(), kc, kc2, None, self.length, pattern)

    def _select(self, q, pattern: TopK, qpos0: int):
        """TopK's per-token selection over the global blocks from the all-gathered block scores."""
        bs = pattern.block_size
        b, hq, sq, _ = q.shape
        nb = -(-self.length // bs)
        nb_rank = self.span // bs
        n_local = -(-self.local.max_length // bs)
        kbar = self.local.pooled_keys(n_local)
        acc = kbar.dtype
        qbar = group_mean_queries(q, self.kv_heads, acc)
        mine = torch.zeros(b, self.kv_heads, sq, nb_rank, dtype=acc, device=q.device)
        mine[..., :n_local] = torch.matmul(qbar, kbar.transpose(-1, -2))
        parts = all_gather_padded(mine, [nb_rank] * self.world, self.group, dim=3, kind="stats")
        scores = torch.cat(parts, dim=3)[..., :nb]
        blocks = torch.arange(nb, device=q.device)
        pb = torch.arange(qpos0, qpos0 + sq, device=q.device) // bs
        cand = (blocks[None, :] >= pattern.sink_blocks) & (blocks[None, :] <= pb[:, None] - pattern.local_blocks)
        width = min(pattern.topk, nb)
        out = torch.full((b, self.kv_heads, sq, pattern.topk), -1, dtype=torch.int32, device=q.device)
        if width == 0:
            return out
        out[..., :width] = top_blocks(scores, cand, width)
        return out

    def attend(self, q: torch.Tensor, pattern=None, *, scale=None) -> torch.Tensor:
        """Attention of `q` `(B, Hq, Sq, D)` (end-aligned to the context: its keys appended first)
        over the whole sharded context. Collective. Returns `(B, Hq, Sq, Dv)` in q's dtype."""
        from ..patterns import Dense

        pattern = Dense() if pattern is None else pattern
        if not isinstance(pattern, SOFTMAX_PATTERNS + (InfLLMv2,)):
            raise TypeError(f"pattern must be one of Dense, SlidingWindow, BlockSparse, TopK, InfLLMv2; got "
                            f"{type(pattern).__name__}")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[0] != self.batch \
                or q.shape[3] != self.head_dim or q.shape[1] % self.kv_heads:
            raise ValueError(f"q must have shape (batch={self.batch}, Hq multiple of {self.kv_heads}, Sq, "
                             f"{self.head_dim}), got {tuple(getattr(q, 'shape', ()))}")
        b, hq, sq, d = q.shape
        if sq > self.length:
            raise ValueError(f"q has {sq} rows but the context holds {self.length} tokens: append the step's keys "
                             f"first (queries are end-aligned)")
        if isinstance(pattern, TopK) and pattern.block_size != self.local.pool_block_size:
            raise ValueError(f"TopK.block_size={pattern.block_size} must equal the cache's pool_block_size="
                             f"{self.local.pool_block_size}")
        check_pattern(pattern, q_heads=hq, kv_heads=self.kv_heads, batch=b, sq=sq, sk=self.length, gate=None,
                      device=q.device)
        sc = check_scale(scale, d)
        qpos0 = self.length - sq
        if isinstance(pattern, InfLLMv2):  # Dense below dense_len (the whole context's length)
            pattern = pattern.clamped(self.length)
        token_index = None
        if isinstance(pattern, InfLLMv2):  # then its TopK view with the picks
            token_index, pattern = self._select_infllmv2(q, pattern), pattern.attention_view()
        elif isinstance(pattern, TopK):
            token_index = self._select(q, pattern, qpos0)
        lo, hi = self.local_range
        kk, vv = (x.to(self.dtype) for x in self.local.gather(0, hi - lo))  # a quantized cache's: dequantized
        out, lse = segment_forward(q, [(qpos0, self.length)], kk, vv, KeySet([(lo, hi)] if hi > lo else []),
                                   pattern, total=self.length, scale=sc, token_index=token_index)
        pack = torch.cat([out, lse[..., None]], dim=-1)
        parts = torch.stack(all_gather_padded(pack, [sq] * self.world, self.group, dim=2, kind="stats"))
        outs, lses = parts[..., :-1], parts[..., -1]
        m = lses.amax(dim=0)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(lses - m)  # 0 for ranks that saw nothing
        den = w.sum(dim=0)
        num = (outs * w[..., None]).sum(dim=0)
        res = torch.where(den[..., None] > 0, num / torch.where(den > 0, den, torch.ones_like(den))[..., None],
                          torch.zeros_like(num))
        return res.to(q.dtype)

    def __repr__(self):
        return (f"ShardedKVCache(rank {self.rank}/{self.world}, positions [{self.start}, {self.start + self.span}), "
                f"length={self.length}, local={self.local!r})")
