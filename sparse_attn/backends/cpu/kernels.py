"""The `cpu` backend's kernels: C++ over the shared BlockLayout (csrc/cpu/)."""
from __future__ import annotations

import torch

from ..._build import ExtensionBuildError, load_extension
from ...layout import build_layout
from ...layout.topk_selection import topk_token_index
from ...patterns import BlockSparse, Dense, SlidingWindow, TopK
from ...scheduler.kernel import Kernel, roofline_seconds

_TILE = 64  # query tile and key block of Dense / SlidingWindow layouts


def _ext():
    return load_extension("cpu")


class CpuBlockSparseForward(Kernel):
    """Flash-attention forward over the visited blocks only, parallel over (batch, kv head, query
    tile), the query heads of a GQA group sharing each K/V block; float32 accumulation."""

    name = "cpu.block_sparse_fwd"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (Dense, SlidingWindow, BlockSparse, TopK)
    head_dims = (1, 256)
    supports_backward = False
    #: fraction of the float32 peak these plain (compiler-vectorised) loops reach: ~35 GFLOP/s of
    #: 192 on the project's 2-core AVX-512 machine (2026-11-23, B=1 Hq=8 Hkv=2 D=128, 2K-4K tokens)
    efficiency = 0.18

    def unavailable(self):
        try:
            _ext()
        except ExtensionBuildError as e:
            return str(e)
        return None

    def cost(self, p):
        flops = 2.0 * (p.head_dim + p.v_head_dim) * p.visited_pairs()
        if isinstance(p.pattern, TopK):
            flops += 2.0 * p.head_dim * p.sq * -(-p.sk // p.pattern.block_size) * p.batch * p.kv_heads
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * p.batch * (p.q_heads * p.sq * (p.head_dim + p.v_head_dim)
                                   + p.kv_heads * p.sk * (p.head_dim + p.v_head_dim))
        # one float32 conversion pass over q, k, v and the output
        nbytes *= 3
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=self.efficiency, overhead_s=30e-6,
                                compute_dtype=torch.float32)  # float32 loops whatever the input dtype

    def run(self, q, k, v, p, *, gate=None):
        pat = p.pattern
        blocked = isinstance(pat, (BlockSparse, TopK))
        token_index = topk_token_index(q, k, pat) if isinstance(pat, TopK) else None
        lay = build_layout(pat, batch=p.batch, kv_heads=p.kv_heads, sq=p.sq, sk=p.sk,
                           q_block=None if blocked else _TILE, k_block=None if blocked else _TILE,
                           device=q.device, token_index=token_index)
        return _ext().block_sparse_fwd(
            q, k, v, lay.full_count, lay.full_index, lay.partial_count, lay.partial_index, lay.token_index,
            p.sq, p.sk, lay.q_block, lay.k_block, lay.causal, -1 if lay.window is None else lay.window,
            lay.sink_tokens, p.scale)
