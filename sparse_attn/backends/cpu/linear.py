"""Chunked linear attention forward on the CPU (csrc/cpu/linear.cpp): prefill and inference.

The same chunked form as `reference.linear_chunked` (sparse_attn/backends/reference/linear.py,
whose docstring derives it), computed per (batch, head) chunk by chunk with everything of a chunk
in per-thread scratch and every product on vec.h's register-blocked micro-kernel; the causal
products visit the lower triangle only. float32 / bfloat16 / float16 inputs, float32 state.

Inference only (`supports_backward = False`): with inputs that require grad the scheduler picks
`reference.linear_chunked`, whose backward is PyTorch autograd. Decode (one token) stays with
`reference.linear_recurrent`.
"""
from __future__ import annotations

import torch

from ..._build import load_extension, unavailable_reason
from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel, roofline_seconds
from ...scheduler.registry import register

#: tokens per chunk. The causal (intra-chunk) products cost ~C (D + Dv) FLOPs per token against
#: the state products' 4 D Dv; smaller chunks make shorter micro-kernel loops and more state
#: read-modify-writes. Measured (1 thread, B = 1, H = 8, D = Dv = 128, S = 16K, Zen 4 with
#: AVX-512, 2026-11-23, THP_MEM_ALLOC_ENABLE=1; ratio to a same-run 2048^3 GEMM, no decay /
#: per-token): C = 16: 0.74 / 0.71, 32: 0.75 / 0.71, 48: 0.72 / 0.68, 64: 0.69 / 0.66, 96: 0.66 /
#: 0.62, 128: 0.61 / 0.57
CHUNK = 32


def _ext():
    return load_extension("cpu_linear")


def linear_forward_cpu(q, k, v, *, decay=None, scale: float, initial_state=None, chunk: int = CHUNK):
    """q `(B, H, S, D)`, k `(B, Hkv, S, D)`, v `(B, Hkv, S, Dv)` with `H % Hkv == 0` (GQA: read in
    place, never expanded), float32 / bfloat16 / float16; decay None, `(H,)` or `(B, H, S)`
    log-decays. Returns `(o (B, H, S, Dv) in q.dtype, final state (B, H, D, Dv) float32)`. No
    autograd."""
    b, h, s, _ = q.shape
    q, k, v = (x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g = None
    if decay is not None:
        g = decay.detach().to(torch.float32)
        g = g[None, :, None].expand(b, h, s) if g.dim() == 1 else g
    st = None if initial_state is None else initial_state.detach().to(torch.float32)
    o, state = _ext().linear_fwd(q.detach(), k.detach(), v.detach(), g, st, float(scale), int(chunk))
    return o.to(q.dtype), state


class CpuLinearChunked(Kernel):
    """Chunked linear attention forward in C++ (csrc/cpu/linear.cpp); no backward."""

    name = "cpu.linear_chunked"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (LinearAttention,)
    supports_backward = False
    phases = ("prefill", "chunked-prefill")  # decode (one token): reference.linear_recurrent
    #: takes k, v with their own Hkv heads (`linear_attention` expands them for other kernels): at
    #: B = 1, H = 32, Hkv = 8, S = 32K the expansion alone cost 0.66 s of a 2.0 s call
    native_gqa = True
    #: of the device table's float32 peak over the FLOPs below: predicts 152 ms for S = 16K, B = 1,
    #: H = 8, D = Dv = 128 on one Zen 4 core, where bench/linear_rate.py measured 120-175 ms
    #: (2026-11-23; the upper end pays ~35 ms of page faults on the fresh 64 MB output). It ranks
    #: first from 2 tokens on: measured 0.2-0.3 ms against the recurrent kernel's 0.8-9 ms at
    #: S = 2-16 (D = 128, H = 8, B = 2) and 0.02-0.03 ms against 0.07-0.76 ms at D = 16, H = 4
    efficiency = 0.7
    overhead_s = 30e-6  # Python, the extension call, one parallel region

    def unavailable(self):
        return unavailable_reason(_ext)

    def cost(self, p):
        tokens = p.batch * p.q_heads * max(p.sq, 1)
        c = min(CHUNK, max(p.sq, 1))
        # state products 4 D Dv per token; the lower triangle of Q K^T and P V, ~(C / 2 + one
        # vector of padding) keys per token
        flops = 2.0 * tokens * ((c / 2 + 8) * (p.head_dim + p.v_head_dim) + 2 * p.head_dim * p.v_head_dim)
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = elem * tokens * (2 * p.head_dim + p.v_head_dim) + 4 * tokens * p.v_head_dim
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=self.efficiency,
                                overhead_s=self.overhead_s, compute_dtype=torch.float32)

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None):
        return linear_forward_cpu(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state)


register(CpuLinearChunked(), op="linear_attention")
