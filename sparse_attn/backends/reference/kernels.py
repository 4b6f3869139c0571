"""The reference backend's kernels, as the scheduler sees them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns import SOFTMAX_PATTERNS, BlockSparse, Dense, TopK, WindowLinear
from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel, roofline_seconds
from ...scheduler.problem import Problem
from .linear import linear_attention_chunked
from .softmax import acc_dtype, chunk_rows, softmax_attention
from .window_linear import window_linear_attention

_CHUNK_OVERHEAD_S = 40e-6  # Python + launch cost of one chunk


def _pairs_touched(p: Problem) -> float:
    """(query, key) pairs the chunked reference computes scores for, per (batch, head)."""
    pat = p.pattern
    lo, hi = pat.key_range(p.sk - 1, p.sk, p.sk)
    if lo > 0:  # windowed: each chunk covers its window plus its own rows
        rows = chunk_rows(pat, batch_heads=p.batch * p.q_heads, sq=p.sq, sk=p.sk)
        return p.sq * (hi - lo + pat.sink_tokens(p.sk) + rows)
    return Dense(causal=pat.causal).visited_pairs(p.sq, p.sk)


class ReferenceChunked(Kernel):
    """Every softmax pattern and WindowLinear, chunked over queries, checkpointed for autograd."""

    name = "reference.chunked"
    backend = "reference"
    patterns = SOFTMAX_PATTERNS + (WindowLinear,)
    supports_backward = True

    def cost(self, p):
        pairs = _pairs_touched(p) * p.batch * p.q_heads
        flops = 2.0 * (p.head_dim + p.v_head_dim) * pairs * (4.5 if p.requires_grad else 1.0)
        if isinstance(p.pattern, TopK):  # selection: q . kbar over every block
            flops += 2.0 * p.head_dim * p.sq * -(-p.sk // p.pattern.block_size) * p.batch * p.kv_heads
        if isinstance(p.pattern, WindowLinear):  # the linear memory
            flops += 4.0 * p.head_dim * p.v_head_dim * (p.sq + p.sk) * p.batch * p.q_heads
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * (p.q_heads * p.sq * (p.head_dim + p.v_head_dim)
                                   + p.kv_heads * p.sk * (p.head_dim + p.v_head_dim))
        rows = chunk_rows(p.pattern, batch_heads=p.batch * p.q_heads, sq=p.sq, sk=p.sk)
        chunks = -(-max(p.sq, 1) // rows)
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=0.25,
                                overhead_s=chunks * _CHUNK_OVERHEAD_S * (3 if p.requires_grad else 1),
                                compute_dtype=acc_dtype(p.dtype))  # upcasts to float32 / float64

    def run(self, q, k, v, p, *, gate=None):
        if isinstance(p.pattern, WindowLinear):
            return window_linear_attention(q, k, v, p.pattern, scale=p.scale, gate=gate)
        return softmax_attention(q, k, v, p.pattern, scale=p.scale)


class TorchSDPA(Kernel):
    """`torch.nn.functional.scaled_dot_product_attention`, for inputs where the pattern IS dense.

    A sparse pattern degrades to dense causal attention on short inputs (TopK with fewer blocks
    than it selects, a window longer than the keys); then the fused dense kernel computes
    exactly the contract's result, faster than any sparse kernel.
    """

    name = "reference.sdpa"
    backend = "reference"
    patterns = SOFTMAX_PATTERNS
    supports_backward = True

    def extra_reasons(self, p):
        why = []
        pat = p.pattern
        if isinstance(pat, BlockSparse):
            why.append("BlockSparse layouts are data: density unknown without a device sync")
        elif not (isinstance(pat, Dense) and not pat.causal) and not pat.is_dense_causal_for(p.sq, p.sk):
            why.append("pattern is sparse at this length (not equal to dense causal)")
        elif pat.causal and 1 < p.sq < p.sk:
            why.append("SDPA's is_causal is top-left aligned for Sq < Sk; a lower-right mask would be "
                       "materialised (Sq x Sk)")
        if p.is_empty or p.sk == 0:
            why.append("empty input")
        return why

    def cost(self, p):
        flops = 2.0 * (p.head_dim + p.v_head_dim) * Dense(causal=p.pattern.causal).visited_pairs(p.sq, p.sk)
        flops *= p.batch * p.q_heads * (3.5 if p.requires_grad else 1.0)
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * p.kv_heads * p.sk * (p.head_dim + p.v_head_dim)
        if p.device.type == "cpu":
            # PyTorch's CPU attention runs float32 arithmetic whatever the dtype (no bf16 dot
            # products): ~0.6 of the float32 GEMM rate measured by the bench, for every dtype
            return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=0.6, overhead_s=20e-6,
                                    compute_dtype=acc_dtype(p.dtype))
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=0.5, overhead_s=20e-6)

    def run(self, q, k, v, p, *, gate=None):
        causal = p.pattern.causal and p.sq > 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=p.scale,
                                              enable_gqa=p.q_heads != p.kv_heads)


class ReferenceLinear(Kernel):
    """Chunked linear attention in plain PyTorch (matrix products inside a chunk, recurrence across)."""

    name = "reference.linear_chunked"
    backend = "reference"
    patterns = (LinearAttention,)
    supports_backward = True

    def cost(self, p):
        chunk = 64
        flops = 2.0 * p.batch * p.q_heads * p.sq * (chunk * (p.head_dim + p.v_head_dim) + 3 * p.head_dim * p.v_head_dim)
        return roofline_seconds(p, flops=flops * (3.5 if p.requires_grad else 1.0), bytes_moved=0.0,
                                efficiency=0.25, overhead_s=-(-p.sq // chunk) * _CHUNK_OVERHEAD_S,
                                compute_dtype=acc_dtype(p.dtype))

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None):
        return linear_attention_chunked(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state)
