"""Chunked linear attention in Triton: launchers, the autograd Function and the scheduler's kernel.

The kernels are in linear_kernels.py (read its docstring for the math). Here: the chunk-local
cumulative decays, the float32 buffers, the sums over Dv tiles, and d(decay) from the per-token
`dL/dB_t` by a reverse cumulative sum (plus `<dS_final, S_final>`, which every decay reaches).

GPU note: one program per (batch * head, 64-column tile of Dv) walks the whole sequence, so small
`B * H` leaves most SMs idle; it is a correct, float32-state baseline, not yet a tuned kernel.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ...patterns.linear import LinearAttention
from ...scheduler.kernel import Kernel, roofline_seconds
from ...scheduler.registry import register
from .runtime import TritonKernelMixin, on_gpu

try:
    import triton

    from . import linear_kernels as _k
    _IMPORT_ERROR = None
except Exception as exc:  # no Triton, or one too old for these kernels
    triton = None
    _k = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _meta(q, d, dv, backward=False):
    bd = max(16, triton.next_power_of_2(d))
    bv = max(16, min(64, triton.next_power_of_2(dv)))
    if on_gpu(q):
        c = 64 if bd <= 64 else 16
        if bd > 64:  # 64-column Dv tiles and 32-token chunks spilled at D=128 (bench/gpu_static.py)
            bv = min(bv, 16 if backward else 32)
        # tf32 products only for bfloat16 inputs (exact in tf32; the float32 intermediates' tf32
        # rounding, ~5e-4, is far inside bfloat16's bound); float32 and float16 inputs keep
        # float32-exact products: d(decay) under strong decay is a small difference of such products
        prec = "tf32" if q.dtype == torch.bfloat16 else "ieee"
    else:  # the interpreter: small chunks keep the tests' odd lengths multi-chunk
        c, prec = 32, "ieee"
    return c, bd, bv, prec


#: one software-pipeline stage: prefetching the next chunk's float32 tiles cost registers and
#: shared memory, and spilled at D=128 (bench/gpu_static.py)
_STAGES = 1


def _warps(bd: int) -> int:
    """8 warps above D=64: with 4, the float32 (D, 64) state and the chunk's float32 q / k / v
    spilled 104-1080 bytes per thread at D=128 (bench/gpu_static.py, sm_80 and sm_90)."""
    return 8 if bd > 64 else 4


def _dkv_passes(q, bd: int):
    """(DO_DV, DO_DK) per launch of the reverse sweep: one pass, or two (dv, then dk) on the GPU at
    D > 64, where one program holding both spilled on sm_80 (bench/gpu_static.py). The second pass
    re-reads the chunk and recomputes the running state gradient: more work, never timed on a GPU."""
    if bd > 64 and on_gpu(q):
        return ((True, False), (False, True))
    return ((True, True),)


def _chunk_cumsum(g, c):
    """Per-token log-decays `(BH, S)` float32 -> cumulative sums restarted at every chunk start."""
    bh, s = g.shape
    n = -(-s // c)
    gp = F.pad(g, (0, n * c - s)).reshape(bh, n, c)
    return torch.cumsum(gp, dim=-1).reshape(bh, n * c)[:, :s].contiguous()


class _TritonLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale):
        b, h, s, d = q.shape
        dv = v.shape[-1]
        c, bd, bv, prec = _meta(q, d, dv)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bc = None if g is None else _chunk_cumsum(g.reshape(b * h, s).float(), c)
        s0c = None if s0 is None else s0.float().contiguous()
        o = torch.empty(b, h, s, dv, dtype=q.dtype, device=q.device)
        sf = torch.empty(b, h, d, dv, dtype=torch.float32, device=q.device)
        nv = triton.cdiv(dv, bv)
        _k.linear_fwd_kernel[(b * h, nv)](
            q, k, v, bc if bc is not None else q, s0c if s0c is not None else sf, o, sf, scale, s, d, dv,
            HAS_G=bc is not None, HAS_S0=s0c is not None, C=c, BD=bd, BV=bv, PREC=prec, num_warps=_warps(bd),
            num_stages=_STAGES)
        ctx.save_for_backward(q, k, v, bc, s0c, sf)
        ctx.scale = scale
        ctx.s0_dtype = None if s0 is None else s0.dtype
        return o, sf

    @staticmethod
    def backward(ctx, do, dsf):
        q, k, v, bc, s0c, sf = ctx.saved_tensors
        b, h, s, d = q.shape
        dv = v.shape[-1]
        c, bd, bv, prec = _meta(q, d, dv, backward=True)
        nv = triton.cdiv(dv, bv)
        nbh = b * h
        dev = q.device
        do = torch.zeros(b, h, s, dv, dtype=q.dtype, device=dev) if do is None else do.contiguous()
        dsfc = None if dsf is None else dsf.float().contiguous()
        has_g = bc is not None
        dq_p = torch.empty(nv, b, h, s, d, dtype=torch.float32, device=dev)
        dk_p = torch.empty(nv, b, h, s, d, dtype=torch.float32, device=dev)
        dv_ = torch.empty(b, h, s, dv, dtype=torch.float32, device=dev)
        ds0 = torch.empty(b, h, d, dv, dtype=torch.float32, device=dev)
        dbq = torch.empty(nv, b, h, s, dtype=torch.float32, device=dev) if has_g else dq_p
        dbk = torch.empty(nv, b, h, s, dtype=torch.float32, device=dev) if has_g else dk_p
        bcp = bc if has_g else q
        _k.linear_bwd_dq_kernel[(nbh, nv)](
            q, k, v, bcp, s0c if s0c is not None else ds0, do, dq_p, dbq, ctx.scale, s, d, dv, nbh,
            HAS_G=has_g, HAS_S0=s0c is not None, C=c, BD=bd, BV=bv, PREC=prec, num_warps=_warps(bd),
            num_stages=_STAGES)
        for do_dv, do_dk in _dkv_passes(q, bd):
            _k.linear_bwd_dkv_kernel[(nbh, nv)](
                q, k, v, bcp, do, dsfc if dsfc is not None else ds0, dk_p, dv_, dbk, ds0, ctx.scale, s, d, dv,
                nbh, HAS_G=has_g, HAS_DSF=dsfc is not None, C=c, BD=bd, BV=bv, PREC=prec, DO_DV=do_dv,
                DO_DK=do_dk, num_warps=_warps(bd), num_stages=_STAGES)
        dq = dq_p.sum(0).to(q.dtype)
        dk = dk_p.sum(0).to(k.dtype)
        dg = None
        if has_g and ctx.needs_input_grad[3]:
            db = dbq.sum(0) - dbk.sum(0)  # dL/dB_t, B the cumulative log-decay
            dg = torch.flip(torch.cumsum(torch.flip(db, [-1]), -1), [-1])
            if dsfc is not None:
                dg = dg + (dsfc * sf).sum(dim=(-1, -2))[..., None]
        ds0_out = ds0.to(ctx.s0_dtype) if ctx.s0_dtype is not None else None
        return dq, dk, dv_.to(v.dtype), dg, ds0_out, None


def triton_linear_attention(q, k, v, *, decay=None, scale: float, initial_state=None):
    """q/k `(B, H, S, D)`, v `(B, H, S, Dv)` (k/v expanded to H heads) -> (o in q.dtype, state float32)."""
    b, h, s, d = q.shape
    dv = v.shape[-1]
    if s == 0 or b == 0 or h == 0:
        st = (initial_state.float() if initial_state is not None
              else torch.zeros(b, h, d, dv, dtype=torch.float32, device=q.device))
        return q.new_zeros(b, h, s, dv), st
    g = None
    if decay is not None:
        g = decay.float()[None, :, None].expand(b, h, s) if decay.dim() == 1 else decay.float()
    return _TritonLinear.apply(q, k, v, g, initial_state, float(scale))


class TritonLinear(TritonKernelMixin, Kernel):
    """Chunked linear attention forward + backward in Triton (state in float32 registers)."""

    name = "triton.linear_chunked"
    backend = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (LinearAttention,)
    #: every head dim to 256 compiles for sm_80 / sm_90 (bench/gpu_static.py; above 128 a spill is allowed)
    head_dims = (1, 256)
    supports_backward = True

    def import_error(self):
        return _IMPORT_ERROR

    def cost(self, p):
        if p.device.type == "cpu":  # the interpreter: correct but very slow; only when asked for
            return 1000.0 + 1e-6 * p.sq * p.batch * p.q_heads
        c = 64 if p.head_dim <= 64 else 32
        tokens = p.batch * p.q_heads * max(p.sq, 1)
        flops = 2.0 * tokens * (c * (p.head_dim + p.v_head_dim) + 2 * p.head_dim * p.v_head_dim)
        nbytes = torch.finfo(p.dtype).bits // 8 * tokens * (2 * p.head_dim + 2 * p.v_head_dim)
        # one program per (batch * head, Dv tile): the SMs it can fill bound its efficiency
        programs = p.batch * p.q_heads * -(-p.v_head_dim // 64)
        eff = 0.3 * min(1.0, programs / max(p.device.units, 1))
        return roofline_seconds(p, flops=flops * (3.5 if p.requires_grad else 1.0), bytes_moved=nbytes,
                                efficiency=max(eff, 0.01), overhead_s=15e-6 * (3 if p.requires_grad else 1))

    def run(self, q, k, v, p, *, gate=None, decay=None, initial_state=None):
        return triton_linear_attention(q, k, v, decay=decay, scale=p.scale, initial_state=initial_state)


register(TritonLinear(), op="linear_attention")

# the fused WindowLinear forward registers itself (an "attention" kernel)
from . import linear_window  # noqa: E402,F401
