"""The reference backend's kernels, as the scheduler sees them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...patterns import SOFTMAX_PATTERNS, BlockSparse, Dense, InfLLMv2, TopK, WindowLinear
from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel, roofline_seconds
from ...scheduler.problem import Problem
from .linear import linear_attention_chunked
from ..flash import FlashKernel
from ..sinks import apply_sinks
from .softmax import acc_dtype, chunk_rows, softmax_backward, softmax_forward, topk_index_for
from .window_linear import window_linear_attention

_CHUNK_OVERHEAD_S = 40e-6  # Python + launch cost of one chunk
#: the chunked loop's setup (the checks, positions, masks, the float32 accumulators): measured
#: 180-250 us a call at 2-32 tokens on 2 Zen 4 threads (Hq 4, Hkv 2, D 64, float32 and bfloat16,
#: 2026-12-07), where the cost had counted 40 and chose this loop over cpu.block_sparse (17-34 us)
#: for float32 calls of up to 16 tokens: a vLLM prompt of 16 tokens took ~200 us a layer
_SETUP_S = 150e-6


def _pairs_touched(p: Problem) -> float:
    """(query, key) pairs the chunked reference computes scores for, per (batch, head)."""
    pat = p.pattern
    lo, hi = pat.key_range(p.sk - 1, p.sk, p.sk)
    if lo > 0:  # windowed: each chunk covers its window plus its own rows
        rows = chunk_rows(pat, batch_heads=p.batch * p.q_heads, sq=p.sq, sk=p.sk)
        return p.sq * (hi - lo + pat.sink_tokens(p.sk) + rows)
    return Dense(causal=pat.causal).visited_pairs(p.sq, p.sk)


def _attended(pattern):
    """The pattern the attention runs once the selection is made (InfLLMv2: its TopK view)."""
    return pattern.attention_view() if isinstance(pattern, InfLLMv2) else pattern


class ReferenceChunked(FlashKernel):
    """Every softmax pattern and WindowLinear, chunked over queries, checkpointed for autograd.

    For the softmax patterns it is a :class:`FlashKernel` (forward -> (out, lse), backward from
    lse); its "layout" is TopK's per-token selection (None for the other patterns). WindowLinear
    runs its own composite (window_linear.py), differentiated by autograd."""

    name = "reference.chunked"
    backend = "reference"
    patterns = SOFTMAX_PATTERNS + (WindowLinear, InfLLMv2)
    supports_backward = True
    supports_softcap = True

    def cost(self, p):
        pairs = _pairs_touched(p) * p.batch * p.q_heads
        flops = 2.0 * (p.head_dim + p.v_head_dim) * pairs * (4.5 if p.requires_grad else 1.0)
        if isinstance(p.pattern, TopK):  # selection: q . kbar over every block
            flops += 2.0 * p.head_dim * p.sq * -(-p.sk // p.pattern.block_size) * p.batch * p.kv_heads
        if isinstance(p.pattern, InfLLMv2):  # selection: every head's q . kc over the fine and coarse kernels
            kernels = 1.25 * p.sk / p.pattern.kernel_stride
            flops += 2.0 * p.head_dim * p.sq * kernels * p.batch * p.q_heads
        if isinstance(p.pattern, WindowLinear):  # the linear memory
            flops += 4.0 * p.head_dim * p.v_head_dim * (p.sq + p.sk) * p.batch * p.q_heads
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * (p.q_heads * p.sq * (p.head_dim + p.v_head_dim)
                                   + p.kv_heads * p.sk * (p.head_dim + p.v_head_dim))
        rows = chunk_rows(p.pattern, batch_heads=p.batch * p.q_heads, sq=p.sq, sk=p.sk)
        chunks = -(-max(p.sq, 1) // rows)
        overhead = _SETUP_S + chunks * _CHUNK_OVERHEAD_S * (3 if p.requires_grad else 1)
        t = roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=0.25, overhead_s=overhead,
                             compute_dtype=acc_dtype(p.dtype))  # upcasts to float32 / float64
        if p.device.type == "cpu":
            # What dominates few-row calls (decode): K and V are upcast to float32, and each chunk's
            # matmul broadcasts its keys over the G heads of the group, i.e. copies them once per
            # query head, into fresh memory (page faults) every call. Measured ~2 GB/s of those
            # bytes on the 2-core CPU: TopK decode 30-170 ms for 2K-8K keys (B=1 Hq=32 Hkv=8 D=128,
            # bf16) where the roofline above says 2-8 ms. TopK's pooling reads K once more.
            acc_elem = torch.finfo(acc_dtype(p.dtype)).bits // 8
            per_head = p.head_dim + p.v_head_dim
            copies = acc_elem * p.batch * p.q_heads * (_pairs_touched(p) / rows) * per_head
            if acc_elem != elem:
                copies += acc_elem * p.batch * p.kv_heads * p.sk * per_head
            if isinstance(p.pattern, (TopK, InfLLMv2)):
                copies += elem * p.batch * p.kv_heads * p.sk * p.head_dim
            t = max(t, copies / (p.device.bandwidth_gbs * 1e9 * 0.06) + overhead)
        return t

    def prepare(self, q, k, p):
        return topk_index_for(q, k, p.pattern)

    def forward(self, q, k, v, p, layout):
        out, lse = softmax_forward(q, k, v, _attended(p.pattern), scale=p.scale, token_index=layout,
                                   softcap=p.softcap)
        return out.to(q.dtype), lse

    def forward_sinks(self, q, k, v, p, layout, sink_logits=None):
        # the sinks' rescaling on the float32 output, before the one rounding to q's dtype
        out, lse = softmax_forward(q, k, v, _attended(p.pattern), scale=p.scale, token_index=layout,
                                   softcap=p.softcap)
        if sink_logits is not None:
            out, lse = apply_sinks(out, lse, sink_logits)
        return out.to(q.dtype), lse

    def backward(self, q, k, v, out, lse, dout, p, layout):
        return softmax_backward(q, k, v, lse, dout, _attended(p.pattern), scale=p.scale, token_index=layout,
                                softcap=p.softcap)

    def run(self, q, k, v, p, *, gate=None, sink_logits=None):
        if isinstance(p.pattern, WindowLinear):
            return window_linear_attention(q, k, v, p.pattern, scale=p.scale, gate=gate)
        return super().run(q, k, v, p, sink_logits=sink_logits)


class TorchSDPA(Kernel):
    """`torch.nn.functional.scaled_dot_product_attention`, for inputs where the pattern IS dense.

    A sparse pattern degrades to dense causal attention on short inputs (TopK with fewer blocks
    than it selects, a window longer than the keys); then the fused dense kernel computes
    exactly the contract's result, faster than any sparse kernel.
    """

    name = "reference.sdpa"
    backend = "reference"
    patterns = SOFTMAX_PATTERNS + (InfLLMv2,)
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
        flops *= p.batch * p.q_heads
        if p.requires_grad:
            # forward + backward over the forward. CPU: measured fwd+bwd / fwd = 4.6 in float32
            # (bench train/dense S=1024: 79 vs 17 ms) and ~30 in bfloat16 (S=2048: its half-precision
            # backward has no fast path), on the 2-core AVX2 EPYC, 2026-11-23
            if p.device.type != "cpu":
                flops *= 3.5
            else:
                flops *= 4.6 if p.dtype in (torch.float32, torch.float64) else 30.0
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * p.kv_heads * p.sk * (p.head_dim + p.v_head_dim)
        if p.device.type == "cpu":
            # PyTorch's CPU attention runs float32 arithmetic whatever the dtype (no bf16 dot
            # products): ~0.6 of the float32 GEMM rate measured by the bench, for every dtype.
            # Its few-row (decode) path reads K/V far below the machine's bandwidth: measured
            # ~1.2 GB/s of K+V bytes for bfloat16 / float16 and 3-17 GB/s for float32 (2-core EPYC,
            # B=1 Hq=32 Hkv=8 D=128, 2K-128K keys): 0.035 and ~0.23 of the nominal 35 GB/s
            # Fixed: the call, the finiteness sums and the result's copy: `plan().run` of 8 tokens
            # measured 58 us (bf16) / 82 us (float32), Hq 4 Hkv 2 D 64, 2 threads, 2026-12-06
            read = 0.23 if p.dtype in (torch.float32, torch.float64) else 0.035
            compute = roofline_seconds(p, flops=flops, bytes_moved=0.0, efficiency=0.6,
                                       compute_dtype=acc_dtype(p.dtype))
            return max(compute, nbytes / (p.device.bandwidth_gbs * 1e9 * read)) + 60e-6
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=0.5, overhead_s=20e-6)

    def run(self, q, k, v, p, *, gate=None, sink_logits=None):  # no sinks, no softcap: declared
        causal = p.pattern.causal and p.sq > 1
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=p.scale,
                                             enable_gqa=p.q_heads != p.kv_heads)
        return _nan_rows_seeing_nonfinite(out, q, k, v, causal=p.pattern.causal)


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Whether each row (last dim) of `x` is all finite: its min and max are (NaN propagates through
    both, +-inf lands in one). One read of `x`, no temporary of its size: `isfinite(x).all(-1)`
    made a bool copy of K and V first (3.2x slower on the CPU at 32K keys; at 128K keys x B 8 a 1 GB
    temporary on a GPU, where this pass now follows SDPA's Dense decode)."""
    if x.shape[-1] == 0:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x, dim=-1)
    return torch.isfinite(lo) & torch.isfinite(hi)


def _nan_rows_seeing_nonfinite(out, q, k, v, *, causal: bool):
    """SDPA drops a key whose score is -inf (an infinite q or k), so a row that sees a non-finite
    input could come out finite and wrong; the contract wants it NaN. One O(S x D) pass flags the
    rows (own query non-finite, or a non-finite key / value at or before them) and sets them NaN.
    On the CPU a sum of each input first: all three finite means every element is (a NaN or an
    infinity makes its sum non-finite; a finite sum that overflows only sends the call down the
    exact pass), so the common call costs three reductions, not the pass's ~10 ops (~250 us of a
    128-token bf16 call on 2 cores, 3.5x SDPA's own time). On a GPU the pass runs always: reading
    the sums back would synchronise."""
    if q.device.type == "cpu" and all(bool(torch.isfinite(t.sum())) for t in (q, k, v)):
        return out
    q_bad = ~_finite_rows(q)  # (B, Hq, Sq)
    kv_bad = ~(_finite_rows(k) & _finite_rows(v))  # (B, Hkv, Sk)
    sq, sk = q.shape[2], k.shape[2]
    if causal:  # any bad key at j <= p, p = Sk - Sq + t
        seen = torch.cummax(kv_bad.to(torch.uint8), dim=-1).values.bool()[..., sk - sq:] if sk else kv_bad
    else:
        seen = kv_bad.any(dim=-1, keepdim=True).expand(*kv_bad.shape[:2], sq)
    g = q.shape[1] // k.shape[1] if k.shape[1] else 1
    bad = q_bad | seen.repeat_interleave(g, dim=1)
    return torch.where(bad[..., None], torch.full_like(out, float("nan")), out)


class ReferenceLinear(Kernel):
    """Chunked linear attention in plain PyTorch: batched matrix products over all chunks at once
    inside a chunk, a short sequential scan of the (D, Dv) states across chunks."""

    name = "reference.linear_chunked"
    backend = "reference"
    patterns = (LinearAttention,)
    supports_backward = True

    @staticmethod
    def chunk_for(p):
        """Chunk length per device: intra-chunk FLOPs grow with it, the matrix products get larger.
        CPU: 64 beat 128 by 1.05-1.2x at D=128, S=16K (/work/notes/linear_bench.py, 1 thread).
        GPU: 128 (larger products for the tensor cores; not measured yet)."""
        return 128 if p.device.type == "cuda" else 64

    def cost(self, p):
        from .linear import linear_chunked_cost  # the cost model lives beside the implementation

        return linear_chunked_cost(p, self.chunk_for(p))

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None):
        return linear_attention_chunked(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state,
                                        chunk=self.chunk_for(p))
