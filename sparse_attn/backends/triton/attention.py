"""Block-sparse flash attention (forward and backward) in Triton over the shared BlockLayout.

`TritonBlockSparse` serves Dense, SlidingWindow, BlockSparse, TopK and InfLLMv2 (its selection in
`infllmv2_select.py`, then its TopK view) on CUDA GPUs, and on CPU tensors when Triton's
interpreter is on (`TRITON_INTERPRET=1`, how the tests run without a GPU).
The kernels live in `flash_fwd.py` / `flash_bwd.py`, the tile table in `tiles.py`; design notes
in docs/backends/triton.md. Nothing here imports Triton at module import: a missing or broken
Triton makes `unavailable()` say why, and the kernel is never chosen.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ...layout import build_layout
from ...layout.topk_selection import topk_token_index
from ...patterns import BlockSparse, Dense, InfLLMv2, SlidingWindow, TopK
from ...scheduler.kernel import roofline_seconds
from ...scheduler.registry import register
from ..flash import FlashKernel
from ..flash_varlen import VarlenFlash
from .runtime import TritonKernelMixin
from .tiles import dense_q_block, tile_config


@functools.lru_cache(maxsize=1)
def _triton_modules():
    """(flash_fwd, flash_bwd), imported on first use; raises ImportError with the reason."""
    from . import flash_bwd, flash_fwd  # noqa: F401  (imports triton)
    return flash_fwd, flash_bwd


@functools.lru_cache(maxsize=1)
def _triton_varlen():
    from . import flash_varlen  # noqa: F401  (imports triton)
    return flash_varlen


def _triton_select():
    from .topk_select import topk_token_index_triton
    return topk_token_index_triton


def _triton_infllmv2_select():
    from .infllmv2_select import infllmv2_token_index_triton
    return infllmv2_token_index_triton


@functools.lru_cache(maxsize=16)  # Dense / SlidingWindow / TopK-forced layouts: host integers only
def _static_layout(pattern, sq: int, sk: int, q_block: int | None, k_block: int | None, device: torch.device):
    return build_layout(pattern, batch=1, kv_heads=1, sq=sq, sk=sk, q_block=q_block, k_block=k_block,
                        device=device)


def triton_layout(q, k, pattern, cfg):
    """The BlockLayout the Triton kernels run: the pattern's blocks for BlockSparse / TopK (with
    TopK's per-token selection, computed without grad and without host synchronisation), InfLLMv2's
    TopK view with its own selection (for a sparse call: the plan's pattern is Dense otherwise), the
    generation's tile for Dense / SlidingWindow."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if isinstance(pattern, BlockSparse):
        return build_layout(pattern, batch=b, kv_heads=hkv, sq=sq, sk=sk, device=q.device)
    if isinstance(pattern, InfLLMv2):
        lay = _static_layout(pattern.attention_view(), sq, sk, None, None, q.device)
        if sq > 0 and b > 0:
            # the Triton selection on the GPU and in the interpreter alike (small test sizes run it
            # in well under a second there)
            with torch.no_grad():
                lay = dataclasses.replace(lay, token_index=_triton_infllmv2_select()(q.detach(), k.detach(), pattern))
        return lay
    if isinstance(pattern, TopK):
        lay = _static_layout(pattern, sq, sk, None, None, q.device)
        if sq > 0 and b > 0 and pattern.topk > 0:
            # on the GPU the Triton selection (running top-k, no Sq x blocks scores); under the
            # interpreter the PyTorch one (same result, much faster there)
            select = _triton_select() if q.device.type == "cuda" else topk_token_index
            with torch.no_grad():
                lay = dataclasses.replace(lay, token_index=select(q.detach(), k.detach(), pattern))
        return lay
    return _static_layout(pattern, sq, sk, dense_q_block(cfg, hq // max(hkv, 1)), cfg.k_block, q.device)


def varlen_layout(pattern, *, nseq: int, kv_heads: int, sk: int, group: int, cfg, device):
    """The one layout of a packed varlen call: built for `sk x sk` (`sk >= max Sk_i`, absolute
    tiles from 0), batch `nseq` for a per-sequence BlockSparse layout (its top-left corners)."""
    if isinstance(pattern, BlockSparse):
        nb = -(-sk // pattern.block_size)
        lay = pattern.layout[:, :, :nb, :nb]
        return build_layout(BlockSparse(lay, block_size=pattern.block_size), batch=nseq, kv_heads=kv_heads,
                            sq=sk, sk=sk, device=device)
    return _static_layout(pattern, sk, sk, dense_q_block(cfg, group), cfg.k_block, device)


class TritonBlockSparse(TritonKernelMixin, VarlenFlash, FlashKernel):
    """Flash attention over the layout's visited blocks: one program per (query sub-tile, batch,
    kv head, chunk of its GQA heads) so each K/V chunk is loaded once for the heads it holds; TopK's
    per-token blocks in a second, group-centric kernel (one program per token and kv head, the
    group's heads as rows) that continues the tile part's online softmax. Backward: dq over the
    same lists, dk/dv per key block over the transposed lists and the tokens that selected it.
    float32 accumulation; float32 inputs use TF32 matrix products on GPUs (contract: 1e-3)."""

    name = "triton.block_sparse"
    backend = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (Dense, SlidingWindow, BlockSparse, TopK, InfLLMv2)
    #: FlashAttention's range; every multiple of 8 compiles for sm_80 / sm_90 (bench/gpu_static.py)
    head_dims = (32, 256)
    supports_backward = True
    supports_softcap = True
    #: fraction of the tensor-core peak reached over the visited pairs (not measured yet: the
    #: usual Triton flash-attention-2 forward reaches 0.35-0.45 of an H100's / A100's bf16 peak)
    efficiency = 0.35
    #: TopK's per-token part: rows are the G heads padded to 16, so at most G/16 of the matrix
    #: units do useful work; it is memory bound (each selected block read once per token and group)
    token_memory_efficiency = 0.5
    #: launches of one forward (tile + token kernels, the layout build and the selection's torch ops)
    overhead_s = 30e-6
    interpreter_penalty_s = 1000.0

    def import_error(self):
        try:
            _triton_modules()
            _triton_varlen()
        except Exception as e:  # ImportError, or a Triton that fails while compiling the module
            return f"{type(e).__name__}: {e}"
        return None

    def extra_reasons(self, p):
        if p.varlen and isinstance(p.pattern, (TopK, InfLLMv2)):
            return ["packed varlen: the per-token selection is per sequence (not implemented packed)"]
        return []

    def cost(self, p):
        pat = p.pattern
        g = p.group if p.kv_heads else 1
        elem = torch.finfo(p.dtype).bits // 8
        per_pair = 2.0 * (p.head_dim + p.v_head_dim)
        factor = 3.5 if p.requires_grad else 1.0  # backward ~2.5x the forward
        cfg = tile_config(p.device.type, p.device.generation, p.head_dim, torch.finfo(p.dtype).bits // 8)
        select = token_s = 0.0
        if isinstance(pat, InfLLMv2):
            select = self.infllmv2_select_cost(p)
            pat = pat.attention_view()
        if isinstance(pat, TopK):
            forced = TopK(0, block_size=pat.block_size, sink_blocks=pat.sink_blocks, local_blocks=pat.local_blocks)
            tile_pairs = forced.visited_pairs(p.sq, p.sk) * p.batch * p.q_heads
            token_pairs = max(0.0, p.visited_pairs() - tile_pairs)
            rows = max(1, min(p.sq, pat.block_size))
            # per token and kv head: read each selected block's K and V once
            token_bytes = token_pairs / max(g, 1) * elem * (p.head_dim + p.v_head_dim)
            token_s = factor * roofline_seconds(p, flops=per_pair * token_pairs * max(16, g) / max(g, 1),
                                                bytes_moved=token_bytes, efficiency=self.token_memory_efficiency)
            # the selection: pooling in PyTorch, then the Triton scorer (float32 IEEE products plus
            # `topk` merge rounds of ~10 operations per score)
            scores = float(p.sq * -(-p.sk // pat.block_size) * p.batch * p.kv_heads)
            select = select or roofline_seconds(p, flops=scores * (2.0 * p.head_dim + 10.0 * pat.topk),
                                      bytes_moved=(elem + 4.0) * p.batch * p.kv_heads * (p.sk + p.sq) * p.head_dim,
                                      efficiency=0.3, compute_dtype=torch.float32) + 50e-6
        else:
            tile_pairs = p.visited_pairs()
            rows = pat.block_size if isinstance(pat, BlockSparse) else dense_q_block(cfg, g)
            rows = max(1, min(p.sq, rows))
        # one program holds `rows` query positions of `hpb` heads and reads each key once for them
        hpb = max(1, min(g, cfg.rows // min(rows, cfg.rows)))
        keys_read = tile_pairs / (rows * hpb)
        nbytes = elem * (keys_read * (p.head_dim + p.v_head_dim)
                         + 2 * p.batch * p.q_heads * p.sq * (p.head_dim + p.v_head_dim))
        tile_s = factor * roofline_seconds(p, flops=per_pair * tile_pairs, bytes_moved=nbytes,
                                           efficiency=self.efficiency)
        launches = 4 if p.requires_grad else 2
        total = tile_s + token_s + select + self.overhead_s * launches
        if p.device.type != "cuda":  # the interpreter: correct, but never the automatic choice
            total += self.interpreter_penalty_s
        return total

    def infllmv2_select_cost(self, p) -> float:
        """InfLLMv2's selection (infllmv2_select.py): every head's q . kc over the fine kernels a
        row can see (twice for "exact": its log-sum-exp pass is over them too; the coarse pass adds
        1/4), float32 IEEE products plus an exp per score, and per (row, kv head) a running top-k of
        ~8 operations per slot per block; K read once to compress it."""
        pat = p.pattern
        elem = torch.finfo(p.dtype).bits // 8
        seen = min(p.sq, p.sk) / 2 + (p.sk - p.sq) if p.sq <= p.sk else p.sk  # mean keys a row can see
        kernels = max(1.0, seen / pat.kernel_stride) * (1.25 if pat.normalizer == "coarse" else 2.0)
        blocks = max(1.0, seen / pat.block_size)
        rows = p.sq * p.batch
        flops = (2.0 * p.head_dim + 4.0) * kernels * rows * p.q_heads + 8.0 * blocks * rows * p.kv_heads * min(
            pat.topk, blocks)
        nbytes = elem * p.batch * p.kv_heads * p.sk * p.head_dim + 4.0 * rows * p.q_heads * p.head_dim
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=0.3, compute_dtype=torch.float32) \
            + 2 * self.overhead_s

    def _cfg(self, q):
        from ...scheduler.device import device_info
        info = device_info(q.device)
        return tile_config(info.type, info.generation, max(q.shape[-1], 16), q.element_size())

    def prepare(self, q, k, p):
        return triton_layout(q.detach(), k.detach(), p.pattern, self._cfg(q))

    def forward(self, q, k, v, p, layout):
        fwd, _ = _triton_modules()
        return fwd.flash_forward(q, k, v, layout, scale=p.scale, cfg=self._cfg(q), softcap=p.softcap)

    def backward(self, q, k, v, out, lse, dout, p, layout):
        _, bwd = _triton_modules()
        return bwd.flash_backward(q, k, v, out, lse, dout, layout, scale=p.scale, cfg=self._cfg(q),
                                  softcap=p.softcap)

    # packed varlen (backends/flash_varlen.py): q (Tq, Hq, D), k / v (Tk, Hkv, *), one launch per kernel
    def prepare_varlen(self, q, k, p):
        return varlen_layout(p.pattern, nseq=p.batch, kv_heads=k.shape[1], sk=p.sk, group=p.group,
                             cfg=self._cfg(q), device=q.device)

    def forward_varlen(self, q, k, v, cu_q, cu_k, p, layout):
        return _triton_varlen().flash_forward_varlen(q, k, v, cu_q, cu_k, layout, scale=p.scale, cfg=self._cfg(q),
                                                     max_seqlen_q=p.sq, softcap=p.softcap)

    def backward_varlen(self, q, k, v, out, lse, dout, cu_q, cu_k, p, layout):
        return _triton_varlen().flash_backward_varlen(q, k, v, out, lse, dout, cu_q, cu_k, layout, scale=p.scale,
                                                      cfg=self._cfg(q), max_seqlen_q=p.sq, max_seqlen_k=p.sk,
                                                      softcap=p.softcap,
                                                      all_tiles=isinstance(p.pattern, Dense) and not p.pattern.causal)


register(TritonBlockSparse())
