"""Split-KV (flash-decoding) decode over contiguous or paged K/V: csrc/cuda/paged_decode.cu.

The kernel reads, per (sequence, kv head), the visited key blocks once for all the query rows of
the GQA group (G heads x Sq rows), split across CTAs so that a single long sequence fills the
GPU, and merges the splits by log-sum-exp. Its work lists come from
`sparse_attn/layout/decode_blocks.py` (shared with the Triton decode kernel): a contiguous
`(B, Hkv, Sk, D)` tensor is one page per sequence, so `attention(...)` decode and
`attention_with_cache(...)` over a contiguous or paged cache (`CudaCacheDecode`) run the same code.
"""
from __future__ import annotations

import torch

from ..._build import ExtensionBuildError, load_extension, unavailable_reason
from ...layout.decode_blocks import cache_decode_args, tensor_decode_args
from ..decode import MAX_SQ, SplitKVDecodeKernel  # noqa: F401  (MAX_SQ: part of this module's API)


def _ext():
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise ExtensionBuildError("this torch has no usable CUDA device (torch.version.cuda="
                                  f"{torch.version.cuda}, cuda available={torch.cuda.is_available()})")
    return load_extension("cuda")


def cuda_unavailable() -> str | None:
    """Why the CUDA extension cannot run here (None if it can)."""
    return unavailable_reason(_ext)


class CudaSplitKVDecode(SplitKVDecodeKernel):
    """Split-KV decode (CUDA C++): Sq <= 16 query rows per sequence, every GQA group's K/V read
    once, Dense / SlidingWindow / BlockSparse / TopK; forward only (decode is inference)."""

    name = "cuda.splitkv_decode"
    backend = "cuda"
    devices = ("cuda",)
    #: fraction of HBM bandwidth on the visited K/V bytes, as measured: 268 GB/s of the H200's
    #: ~4.2 TB/s copy rate, 0.06, on the first GPU run (docs/perf/2026-12-04-h200-gpu-check-2.md:
    #: decode, Dense, bf16, B 8, Hq 32, Hkv 8, D 128, 128K keys; SDPA read the same bytes at ~1.0).
    #: One warp per key row, scalar loads and a shuffle reduction per row: latency-bound. With
    #: this figure the scheduler gives Dense decode to SDPA on a GPU until the kernel is rebuilt.
    memory_efficiency = 0.06
    overhead_s = 15e-6

    def unavailable(self):
        return cuda_unavailable()

    def forward(self, q, k, v, p, layout):
        args = tensor_decode_args(q, k, v, p.pattern, scale=p.scale, units=p.device.units, softcap=p.softcap)
        return tuple(_ext().paged_decode(*args))


class CudaCacheDecode(CudaSplitKVDecode):
    """`cuda.splitkv_decode` over a contiguous or paged cache (the "attention_with_cache" op)."""

    cache_kinds = ("contiguous", "paged")
    #: int8 / fp8 codes dequantized in registers as each row is loaded (csrc/cuda/paged_decode.cu)
    kv_dtypes = (None, "int8", "fp8_e4m3")

    def forward_cache(self, q, view, p):
        args = cache_decode_args(q, view, p.pattern, scale=p.scale, units=p.device.units, softcap=p.softcap)
        return tuple(_ext().paged_decode(*args))
