"""Split-KV (flash-decoding) decode over contiguous or paged K/V: csrc/cuda/paged_decode.cu.

The kernel reads, per (sequence, kv head), the visited key blocks once for all the query rows of
the GQA group (G heads x Sq rows), split across CTAs so that a single long sequence fills the
GPU, and merges the splits by log-sum-exp. A contiguous `(B, Hkv, Sk, D)` tensor is the special
case of one page per sequence (page size Sk), so `attention(...)` decode and
`attention_with_cache(...)` over a `PagedKVCache` run the same code.

What is visited is a per-(sequence, kv head) list of key blocks, built here on the device from the
pattern (no host synchronisation): all blocks (Dense), the window's blocks and the sinks'
(SlidingWindow), the union of the rows' layout rows (BlockSparse), the forced and selected blocks
(TopK). Rows that differ inside the union (Sq > 1) get a per-row block mask; the token rule
(causal, window, sinks) is applied per key.
"""
from __future__ import annotations

import torch

from ..._build import ExtensionBuildError, load_extension
from ...layout.block_layout import compact, index_to_bool
from ...layout.topk_selection import topk_token_index
from ...patterns import BlockSparse, Dense, SlidingWindow, TopK
from ..flash import FlashKernel
from ...scheduler.kernel import roofline_seconds

#: key block of Dense / SlidingWindow (BlockSparse and TopK use their block_size)
KEY_BLOCK = 64
#: query rows (G * Sq) served by this kernel at most; longer query blocks are prefill work
MAX_ROWS = 64
MAX_SQ = 16


def _ext():
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise ExtensionBuildError("this torch has no usable CUDA device (torch.version.cuda="
                                  f"{torch.version.cuda}, cuda available={torch.cuda.is_available()})")
    return load_extension("cuda")


def cuda_unavailable() -> str | None:
    """Why the CUDA extension cannot run here (None if it can)."""
    try:
        _ext()
    except ExtensionBuildError as e:
        return str(e)
    return None


def num_splits(units: int, batch: int, kv_heads: int, row_groups: int, visited_blocks: int) -> int:
    """Splits of each (sequence, kv head)'s key blocks: enough CTAs for ~2 waves over the SMs, and
    at least 2 key blocks per split so a split's fixed cost stays small (host integers only)."""
    ctas = max(1, batch * kv_heads * row_groups)
    want = -(-2 * units // ctas)
    return int(max(1, min(want, max(1, visited_blocks // 2), 256)))


def visited_blocks(q, k, pattern, key_block: int):
    """(count int32 (B, Hkv), index int32 (B, Hkv, W), row mask uint8 (B, Hkv, Sq, N) or None)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dev = q.device
    nb = -(-sk // key_block)
    if isinstance(pattern, Dense):
        return None, None, None
    rows_qb = torch.arange(sk - sq, sk, device=dev) // key_block  # (Sq,)
    blocks = torch.arange(nb, device=dev)
    row_mask = None
    if isinstance(pattern, SlidingWindow):
        lo = max(0, sk - sq - pattern.window + 1) // key_block
        vis = (blocks >= lo) | (blocks * key_block < pattern.sinks)
        grid = vis[None, None].expand(b, hkv, nb)
    elif isinstance(pattern, BlockSparse):
        lay = pattern.layout.to(dev)[:, :, :, :nb]
        rows = lay.index_select(2, rows_qb).expand(b, hkv, sq, nb)  # (B, Hkv, Sq, N)
        grid = rows.any(dim=2)
        row_mask = rows if sq > 1 else None
    elif isinstance(pattern, TopK):
        sel = index_to_bool(topk_token_index(q, k, pattern), nb)  # (B, Hkv, Sq, N)
        rows = sel | pattern.forced_block_mask(rows_qb, blocks)[None, None]
        grid = rows.any(dim=2)
        row_mask = rows if sq > 1 else None
    else:
        raise TypeError(f"unsupported pattern {type(pattern).__name__}")
    count, index = compact(grid, nb)
    if row_mask is not None:
        row_mask = row_mask.to(torch.uint8).contiguous()
    return count.contiguous(), index.contiguous(), row_mask


class CudaSplitKVDecode(FlashKernel):
    """Split-KV decode (CUDA C++): Sq <= 16 query rows per sequence, every GQA group's K/V read
    once, Dense / SlidingWindow / BlockSparse / TopK; forward only (decode is inference)."""

    name = "cuda.splitkv_decode"
    backend = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (Dense, SlidingWindow, BlockSparse, TopK)
    head_dims = (1, 256)
    supports_backward = False
    phases = ("decode", "chunked-prefill")
    #: fraction of HBM bandwidth on the visited K/V bytes: an estimate until measured on a GPU
    #: (none was lent when this kernel was written); docs/perf/ holds what was measured
    memory_efficiency = 0.6
    overhead_s = 15e-6

    def unavailable(self):
        return cuda_unavailable()

    def extra_reasons(self, p):
        why = []
        if p.sq > MAX_SQ:
            why.append(f"Sq={p.sq} > {MAX_SQ}: a prefill shape, not decode")
        if p.sk == 0 or p.is_empty:
            why.append("empty input")
        return why

    def cost(self, p):
        elem = torch.finfo(p.dtype).bits // 8
        keys = p.pattern.visited_pairs(1, p.sk) if p.sq == 1 else min(p.sk, p.pattern.visited_pairs(p.sq, p.sk))
        nbytes = elem * p.batch * p.kv_heads * keys * (p.head_dim + p.v_head_dim)
        flops = 2.0 * (p.head_dim + p.v_head_dim) * p.visited_pairs()
        t = roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=self.memory_efficiency,
                             overhead_s=self.overhead_s)
        if isinstance(p.pattern, TopK):  # selection (PyTorch): q . kbar over every block
            nb = -(-p.sk // p.pattern.block_size)
            t += roofline_seconds(p, flops=2.0 * p.head_dim * p.sq * nb * p.batch * p.kv_heads,
                                  bytes_moved=elem * p.batch * p.kv_heads * p.sk * p.head_dim, efficiency=0.3,
                                  overhead_s=30e-6)
        return t

    def prepare(self, q, k, p):
        pat = p.pattern
        key_block = pat.block_size if isinstance(pat, (BlockSparse, TopK)) else KEY_BLOCK
        count, index, row_mask = visited_blocks(q, k, pat, key_block)
        nb = -(-p.sk // key_block)
        rows = p.group * p.sq
        visited = nb if count is None else min(nb, -(-int(pat.visited_pairs(1, p.sk)) // key_block) + 1)
        splits = num_splits(p.device.units, p.batch, p.kv_heads, -(-rows // 8), visited)
        return dict(key_block=key_block, count=count, index=index, row_mask=row_mask, splits=splits)

    def forward(self, q, k, v, p, layout):
        return tuple(_ext().paged_decode(*tensor_kernel_args(q, k, v, p, layout)))


def tensor_kernel_args(q, k, v, p, layout) -> tuple:
    """The arguments of the extension's `paged_decode` for `attention(q, k, v)`: contiguous K/V as
    one page per sequence (page size Sk, page b = sequence b), every sequence Sk long."""
    pat = p.pattern
    b, sk = q.shape[0], k.shape[2]
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    page_table = torch.arange(b, dtype=torch.int32, device=q.device)[:, None]
    lengths = torch.full((b,), sk, dtype=torch.int32, device=q.device)
    window = pat.window if isinstance(pat, SlidingWindow) else 0
    sinks = pat.sinks if isinstance(pat, SlidingWindow) else 0
    return (q.contiguous(), k, v, page_table, lengths, layout["count"], layout["index"], layout["row_mask"],
            layout["key_block"], bool(pat.causal), window, sinks, float(p.scale), layout["splits"])


def block_lists(rows: torch.Tensor | None, sq: int):
    """Per-row visitable blocks `(B, Hkv, Sq, N)` -> the kernel's (count, index, row mask)."""
    if rows is None:
        return None, None, None
    grid = rows.any(dim=2)
    count, index = compact(grid, grid.shape[-1])
    row_mask = rows.to(torch.uint8).contiguous() if sq > 1 else None
    return count.contiguous(), index.contiguous(), row_mask


def cache_kernel_args(q, cache, pattern, *, scale: float, units: int) -> tuple:
    """The arguments of the extension's `paged_decode` for attention over a `KVCache` (one page per
    sequence) or a `PagedKVCache` with per-sequence lengths; `units` = the GPU's SM count."""
    from ...cache.attend import row_blocks
    from ...cache.paged import PagedKVCache

    b, hq, sq, _ = q.shape
    key_block = pattern.block_size if isinstance(pattern, (BlockSparse, TopK)) else KEY_BLOCK
    nb = -(-cache.max_length // key_block)
    qpos = cache.lengths.long()[:, None] - sq + torch.arange(sq, device=q.device)[None, :]
    count, index, row_mask = block_lists(row_blocks(q, cache, pattern, qpos, nb, key_block), sq)
    if isinstance(cache, PagedKVCache):
        k, v, table = cache.k_pages, cache.v_pages, cache.page_table
    else:  # contiguous: sequence b is page b (of max_len + 1 rows)
        k, v = cache.k, cache.v
        table = torch.arange(b, dtype=torch.int32, device=q.device)[:, None]
    splits = num_splits(units, b, cache.kv_heads, -(-(hq // cache.kv_heads) * sq // 8), nb)
    window = pattern.window if isinstance(pattern, SlidingWindow) else 0
    sinks = pattern.sinks if isinstance(pattern, SlidingWindow) else 0
    return (q.contiguous(), k, v, table, cache.lengths, count, index, row_mask, key_block, bool(pattern.causal),
            window, sinks, float(scale), splits)


def decode_over_cache(q, cache, pattern, *, scale: float):
    units = torch.cuda.get_device_properties(q.device).multi_processor_count
    out, _ = _ext().paged_decode(*cache_kernel_args(q, cache, pattern, scale=scale, units=units))
    return out
