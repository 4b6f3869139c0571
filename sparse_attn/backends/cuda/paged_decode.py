"""Split-KV (flash-decoding) decode over contiguous or paged K/V: csrc/cuda/paged_decode.cu.

The kernel reads, per (sequence, kv head), the visited key blocks once for all the query rows of
the GQA group (G heads x Sq rows), split across CTAs so that a single long sequence fills the
GPU, and merges the splits by log-sum-exp. Its work lists come from
`sparse_attn/layout/decode_blocks.py` (shared with the Triton decode kernel): a contiguous
`(B, Hkv, Sk, D)` tensor is one page per sequence, so `attention(...)` decode and
`attention_with_cache(...)` over a `PagedKVCache` run the same code.
"""
from __future__ import annotations

import torch

from ..._build import ExtensionBuildError, load_extension
from ...layout.decode_blocks import cache_decode_args, tensor_decode_args
from ...patterns import BlockSparse, Dense, SlidingWindow, TopK
from ...scheduler.kernel import roofline_seconds
from ..flash import FlashKernel

#: query rows per sequence served at most; longer query blocks are prefill work
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


def decode_cost(kernel, p) -> float:
    """Roofline of a split-KV decode: the visited K/V bytes once per GQA group, plus TopK selection."""
    elem = torch.finfo(p.dtype).bits // 8
    keys = p.pattern.visited_pairs(1, p.sk) if p.sq == 1 else min(p.sk, p.pattern.visited_pairs(p.sq, p.sk))
    nbytes = elem * p.batch * p.kv_heads * keys * (p.head_dim + p.v_head_dim)
    flops = 2.0 * (p.head_dim + p.v_head_dim) * p.visited_pairs()
    t = roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=kernel.memory_efficiency,
                         overhead_s=kernel.overhead_s)
    if isinstance(p.pattern, TopK):  # selection (PyTorch): q . kbar over every block
        nb = -(-p.sk // p.pattern.block_size)
        t += roofline_seconds(p, flops=2.0 * p.head_dim * p.sq * nb * p.batch * p.kv_heads,
                              bytes_moved=elem * p.batch * p.kv_heads * p.sk * p.head_dim, efficiency=0.3,
                              overhead_s=30e-6)
    return t


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
        return decode_cost(self, p)

    def prepare(self, q, k, p):
        return None  # the work lists need v too: built in forward

    def forward(self, q, k, v, p, layout):
        args = tensor_decode_args(q, k, v, p.pattern, scale=p.scale, units=p.device.units)
        return tuple(_ext().paged_decode(*args))


def decode_over_cache(q, cache, pattern, *, scale: float):
    units = torch.cuda.get_device_properties(q.device).multi_processor_count
    out, _ = _ext().paged_decode(*cache_decode_args(q, cache, pattern, scale=scale, units=units))
    return out
