"""Attention of queries against a KV cache (decode, chunked prefill, speculative decode).

Sequence `b` holds `lengths[b]` tokens; its `Sq` query rows sit at the END of them (positions
`lengths[b] - Sq + t`, the contract's alignment, per sequence). This is the portable path in plain
PyTorch: keys are read chunk by chunk (the cache's `gather`, which for a paged cache follows the
page table) with an online softmax, so memory is `B x Hq x Sq x chunk`, never `Sq x Sk`, and the
visibility of each (query, key) pair is computed on the device from the lengths: no host read
of device data. `TopK` selects blocks from the pooled keys the cache keeps: O(blocks) per step.
"""
from __future__ import annotations

import torch

from ..layout.topk_selection import rank_scores
from ..patterns import BlockSparse, Dense, SlidingWindow, TopK
from ..scheduler.problem import check_scale
from .base import CacheBase

#: elements of one chunk's score matrix
_CHUNK_ELEMS = 1 << 22
SUPPORTED = (Dense, SlidingWindow, BlockSparse, TopK)


def _check(q, cache, pattern):
    if not isinstance(cache, CacheBase):
        raise TypeError(f"cache must be a KVCache or PagedKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not isinstance(pattern, SUPPORTED):
        raise TypeError(f"pattern must be one of {[p.__name__ for p in SUPPORTED]} for attention over a cache, "
                        f"got {type(pattern).__name__}")
    if q.dim() != 4 or q.shape[0] != cache.batch or q.shape[3] != cache.head_dim:
        raise ValueError(f"q must have shape (B={cache.batch}, Hq, Sq, D={cache.head_dim}), got {tuple(q.shape)}")
    if q.shape[1] % cache.kv_heads:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of the cache's kv_heads ({cache.kv_heads})")
    if q.dtype != cache.dtype:
        raise TypeError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.device}")
    short = [b for b, n in enumerate(cache.host_lengths) if n < q.shape[2]]
    if short:
        raise ValueError(f"sequences {short} hold fewer tokens than q has rows ({q.shape[2]}): append the "
                         f"queries' own keys to the cache first (lengths {cache.host_lengths})")
    cache.check_reach(pattern, q.shape[2])  # never read what release_outside / free gave back
    if isinstance(pattern, (TopK,)) and pattern.block_size != cache.pool_block_size:
        raise ValueError(f"TopK.block_size ({pattern.block_size}) must equal the cache's pool_block_size "
                         f"({cache.pool_block_size})")
    if isinstance(pattern, BlockSparse):
        nb = -(-cache.max_length // pattern.block_size)
        lay = pattern.layout
        if lay.shape[0] not in (1, cache.batch) or lay.shape[1] not in (1, cache.kv_heads) or lay.shape[2] < nb \
                or lay.shape[3] < nb:
            raise ValueError(f"BlockSparse.layout must have shape (B or 1, Hkv or 1, >= {nb}, >= {nb}) for this "
                             f"cache, got {tuple(lay.shape)}")


def _topk_selected(q, cache, pattern, qpos, nb):
    """Bool `(B, Hkv, Sq, nb)`: the blocks each query token selects (forced + top-k)."""
    b, hq, sq, d = q.shape
    hkv = cache.kv_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kbar = cache.pooled_keys(nb)  # (B, Hkv, nb, D)
    qbar = q.to(acc).view(b, hkv, hq // hkv, sq, d).mean(dim=2)
    blocks = torch.arange(nb, device=q.device)
    pb = (qpos // pattern.block_size)[:, None, :, None]  # (B, 1, Sq, 1)
    forced = (blocks <= pb) & ((blocks < pattern.sink_blocks) | (blocks > pb - pattern.local_blocks))
    cand = (blocks >= pattern.sink_blocks) & (blocks <= pb - pattern.local_blocks)
    width = min(pattern.topk, nb)
    if width == 0:
        return forced.expand(b, hkv, sq, nb)
    scores = rank_scores(torch.matmul(qbar, kbar.transpose(-1, -2))).masked_fill(~cand, float("-inf"))
    val, idx = torch.topk(scores, width, dim=-1)
    chosen = torch.zeros(b, hkv, sq, nb + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(torch.isneginf(val), torch.full_like(idx, nb), idx), True)
    return chosen[..., :nb] | forced


def row_blocks(q, cache, pattern, qpos, nb, key_block):
    """Bool `(B, Hkv, Sq, nb)`: key blocks each query row may visit (before the token rule), or
    None for Dense (every block below the sequence's length). Built on the device."""
    b, sq = qpos.shape
    hkv = cache.kv_heads
    blocks = torch.arange(nb, device=q.device)
    if isinstance(pattern, Dense):
        return None
    if isinstance(pattern, TopK):
        return _topk_selected(q, cache, pattern, qpos, nb)
    if isinstance(pattern, SlidingWindow):
        first = torch.clamp(qpos - pattern.window + 1, min=0) // key_block  # (B, Sq)
        last = qpos // key_block
        rows = (blocks >= first[..., None]) & (blocks <= last[..., None])
        rows = rows | ((blocks * key_block < pattern.sinks) & (blocks <= last[..., None]))
        return rows[:, None].expand(b, hkv, sq, nb)
    if isinstance(pattern, BlockSparse):
        lay = pattern.layout.to(q.device)[:, :, :, :nb]
        lay = lay.expand(b, hkv, lay.shape[2], nb)
        qb = (qpos // key_block)[:, None, :, None].expand(b, hkv, sq, nb)
        return torch.gather(lay, 2, qb)
    raise TypeError(f"unsupported pattern {type(pattern).__name__}")


def _visible(pattern, qpos, kpos, lengths, selected, b_idx):
    """Bool `(B, 1|Hkv, Sq, n)` visibility of keys `kpos` (n,) for queries `qpos` (B, Sq)."""
    p = qpos[:, None, :, None]
    j = kpos[None, None, None, :]
    ok = j < lengths.long()[:, None, None, None]
    if pattern.causal:
        ok = ok & (j <= p)
    if isinstance(pattern, SlidingWindow):
        ok = ok & ((p - j < pattern.window) | (j < pattern.sinks))
    elif isinstance(pattern, BlockSparse):
        bs = pattern.block_size
        lay = pattern.layout.to(q_device(qpos))
        rows = lay[b_idx if lay.shape[0] > 1 else torch.zeros_like(b_idx)]  # (B, H', NB, NB)
        qb = (qpos // bs)[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[3])
        rows = torch.gather(rows, 2, qb)  # (B, H', Sq, NB)
        ok = ok & rows.index_select(3, kpos // bs)
    elif isinstance(pattern, TopK):
        ok = ok & selected.index_select(3, kpos // pattern.block_size)
    return ok


def q_device(x):
    return x.device


def cache_backend(q: torch.Tensor, cache: CacheBase, pattern=Dense(), *, backend=None) -> tuple[str, str]:
    """Which implementation `attention_with_cache` runs for these arguments, and why:
    `(backend, reason)`. Order of preference: the CUDA kernel, the Triton kernel (on CUDA
    tensors; on CPU tensors only when asked for, in the interpreter), the CPU C++ kernel (CPU
    caches), the PyTorch path."""
    if backend not in (None, "reference", "cuda", "triton", "cpu"):
        raise ValueError(f"backend must be None, 'reference', 'cuda', 'triton' or 'cpu' for attention over a "
                         f"cache, got {backend!r}")
    if backend == "reference":
        return "reference", "requested"
    from ..backends.cpu.decode import MAX_ROWS as CPU_MAX_ROWS
    from ..backends.cuda.paged_decode import cuda_unavailable
    from ..backends.triton.decode import MAX_SQ, interpreting, triton_unavailable
    common = []
    if q.shape[2] > MAX_SQ:
        common.append(f"Sq={q.shape[2]} > {MAX_SQ}")
    if q.dtype == torch.float64:
        common.append("float64")
    if max(cache.head_dim, cache.v_head_dim) > 256:
        common.append("head dim > 256")
    why = {}
    # the interpreter runs Triton on CPU tensors, but only when asked for (it is a test vehicle)
    triton_devices = ("cuda", "cpu") if interpreting() and backend == "triton" else ("cuda",)
    for name, missing, devices in (("cuda", cuda_unavailable, ("cuda",)),
                                   ("triton", triton_unavailable, triton_devices)):
        if backend not in (None, name):
            continue
        r = list(common)
        if cache.device.type not in devices:
            r.append(f"cache is on {cache.device.type}")
        elif missing():
            r.append(missing())
        if not r:
            return name, "split-KV decode kernel (csrc/cuda)" if name == "cuda" else "split-KV decode kernel (Triton)"
        why[name] = r
    if backend in (None, "cpu"):
        r = []
        if q.shape[2] > CPU_MAX_ROWS:
            r.append(f"Sq={q.shape[2]} > {CPU_MAX_ROWS}")
        if q.dtype == torch.float64:
            r.append("float64")
        if cache.device.type != "cpu":
            r.append(f"cache is on {cache.device.type}")
        if q.requires_grad and torch.is_grad_enabled():
            r.append("q requires grad (the kernel is inference only)")
        if not r:
            from ..backends.cpu.decode import CpuDecode
            missing = CpuDecode().unavailable()
            if missing:
                r.append(missing)
        if not r:
            return "cpu", "split-KV decode kernel (csrc/cpu/decode.cpp)"
        why["cpu"] = r
    text = "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items())
    if backend is not None:
        raise ValueError(f"backend={backend!r} cannot run this cache attention: {text}")
    return "reference", f"chunked PyTorch path ({text})"


def attention_with_cache(q: torch.Tensor, cache: CacheBase, pattern=Dense(), *, scale=None,
                         backend=None) -> torch.Tensor:
    """Attention of `q` `(B, Hq, Sq, D)` over the keys and values held in `cache`.

    Sequence `b`'s query rows are end-aligned to its own length (append their keys first). Returns
    `(B, Hq, Sq, Dv)` in q's dtype; rows with no visible key give zeros. Dense, SlidingWindow,
    BlockSparse (layout indexed by absolute positions) and TopK (selected from the cache's pooled
    keys: the same selection as `attention` on the full sequence). Differentiable in q only through
    plain autograd; meant for inference.

    `backend`: None runs a split-KV decode kernel where one can (Sq <= 16, not float64; a CUDA
    cache with D <= 256: the CUDA C++ kernel, else the Triton one; a CPU cache: the C++ kernel of
    csrc/cpu/decode.cpp) and the chunked PyTorch path otherwise; "reference" | "cuda" | "triton" |
    "cpu" forces one. `cache_backend(...)` says which and why.
    """
    _check(q, cache, pattern)
    # integers beyond the longest sequence mean what its length means; TopK keeps the pooling block
    pattern = pattern.clamped(cache.max_length, keep_block_size=True)
    b, hq, sq, d = q.shape
    hkv, dv = cache.kv_heads, cache.v_head_dim
    g = hq // hkv
    sc = check_scale(scale, d)
    if sq == 0:
        return q.new_zeros(b, hq, 0, dv)
    chosen = cache_backend(q, cache, pattern, backend=backend)[0]
    if chosen == "cuda":
        from ..backends.cuda.paged_decode import decode_over_cache
        return decode_over_cache(q, cache, pattern, scale=sc)
    if chosen == "triton":
        from ..backends.triton.decode import decode_over_cache
        return decode_over_cache(q, cache, pattern, scale=sc)
    if chosen == "cpu":
        from ..backends.cpu.decode import decode_over_cache
        return decode_over_cache(q, cache, pattern, scale=sc)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    lengths = cache.lengths
    qpos = lengths.long()[:, None] - sq + torch.arange(sq, device=dev)[None, :]  # (B, Sq)
    b_idx = torch.arange(b, device=dev)
    sk = cache.max_length
    selected = None
    if isinstance(pattern, TopK):
        selected = _topk_selected(q, cache, pattern, qpos, -(-sk // pattern.block_size))
    # keys any query can reach: the window range and the sinks below it when windowed
    lo = 0
    if isinstance(pattern, SlidingWindow) and pattern.sinks == 0:
        lo = max(0, min(cache.host_lengths) - sq - pattern.window + 1)
    qa = q.to(acc).view(b, hkv, g, sq, d)
    m = torch.full((b, hkv, g, sq, 1), float("-inf"), dtype=acc, device=dev)
    l = torch.zeros((b, hkv, g, sq, 1), dtype=acc, device=dev)
    o = torch.zeros((b, hkv, g, sq, dv), dtype=acc, device=dev)
    step = max(64, _CHUNK_ELEMS // max(1, b * hq * sq))
    for c0 in range(lo, sk, step):
        c1 = min(sk, c0 + step)
        kc, vc = cache.gather(c0, c1)
        kpos = torch.arange(c0, c1, device=dev)
        vis = _visible(pattern, qpos, kpos, lengths, selected, b_idx)[:, :, None]  # (B, 1|Hkv, 1, Sq, n)
        s = torch.matmul(qa, kc.to(acc)[:, :, None].transpose(-1, -2)) * sc
        # a non-finite score (infinite or NaN q / k) is NaN, never a masked -inf (contract, "Bad input")
        s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("nan"))).masked_fill(~vis, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s - m_safe)
        alpha = torch.exp(torch.where(torch.isfinite(m), m, m_safe) - m_safe)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        o = o * alpha + torch.matmul(p, vc.to(acc)[:, :, None])
        m = m_new
    # rows that saw no key output 0; a NaN `l` (a non-finite input the row sees) stays NaN
    out = torch.where(l == 0, torch.zeros_like(o), o / torch.where(l == 0, torch.ones_like(l), l))
    return out.view(b, hq, sq, dv).to(q.dtype)
