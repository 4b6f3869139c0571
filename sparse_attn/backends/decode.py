"""What the GPU split-KV decode kernels (CUDA C++ and Triton) share: their capabilities, their
refusals and their cost model. Their work lists come from `sparse_attn/layout/decode_blocks.py`."""
from __future__ import annotations

import torch

from ..patterns import BlockSparse, Dense, SlidingWindow, TopK
from ..scheduler.cache_problem import kv_elem_bytes
from ..scheduler.kernel import roofline_seconds
from .flash import FlashKernel

#: query rows per sequence served at most; longer query blocks are prefill work
MAX_SQ = 16


def decode_cost(kernel, p) -> float:
    """Roofline of a split-KV decode: the visited K/V bytes once per GQA group, plus TopK selection."""
    elem = kv_elem_bytes(p)  # a quantized cache: 1 byte + the row's scale
    keys = p.pattern.visited_pairs(1, p.sk) if p.sq == 1 else min(p.sk, p.pattern.visited_pairs(p.sq, p.sk))
    nbytes = elem * p.batch * p.kv_heads * keys * (p.head_dim + p.v_head_dim)
    flops = 2.0 * (p.head_dim + p.v_head_dim) * p.visited_pairs()
    t = roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=kernel.memory_efficiency,
                         overhead_s=kernel.overhead_s)
    return t + topk_select_cost(p)


def topk_select_cost(p) -> float:
    """TopK's selection (PyTorch): q . kbar over every block, K pooled; 0 for other patterns."""
    if not isinstance(p.pattern, TopK):
        return 0.0
    nb = -(-p.sk // p.pattern.block_size)
    return roofline_seconds(p, flops=2.0 * p.head_dim * p.sq * nb * p.batch * p.kv_heads,
                            bytes_moved=kv_elem_bytes(p) * p.batch * p.kv_heads * p.sk * p.head_dim, efficiency=0.3,
                            overhead_s=30e-6)


class SplitKVDecodeKernel(FlashKernel):
    """Base of the split-KV decode kernels: Sq <= 16 rows per sequence, Dense / SlidingWindow /
    BlockSparse / TopK, fp16 / bf16 / fp32, D <= 256, softcap (in the kernel) and learned sinks
    (FlashKernel, on (out, lse)); forward only (decode is inference).
    Subclasses set `memory_efficiency`, `overhead_s` and implement `forward`."""

    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (Dense, SlidingWindow, BlockSparse, TopK)
    head_dims = (1, 256)
    supports_backward = False
    supports_softcap = True
    phases = ("decode", "chunked-prefill")
    memory_efficiency = 0.5
    overhead_s = 30e-6

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
