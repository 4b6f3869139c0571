"""Split-KV (flash-decoding) decode in Triton, over contiguous or paged K/V.

Same work lists and semantics as the CUDA kernel (`sparse_attn/layout/decode_blocks.py`,
csrc/cuda/paged_decode.cuh): one program per (split, sequence x kv head, group of query rows)
loads the group's query rows (the G heads of the GQA group times the Sq rows) once, walks its
share of the visited key blocks, gathering each block's keys through the page table, with an
online softmax in float32; the splits' partial results are merged by log-sum-exp in PyTorch.
Blocks are converted to float32 as they are loaded and both products run in float32 (TF32 on
tensor cores for bfloat16 inputs, whose values TF32 holds exactly; IEEE float32 otherwise): decode
is bound by reading K/V, not by arithmetic, and Triton's interpreter does not compute bfloat16 dot
products correctly (seen with Triton 3.9: garbage results).
Runs on CUDA tensors, and on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`), which
is how CI tests it.

A quantized cache (int8 / fp8_e4m3 codes + a float32 scale per row, cache/quant.py) is read as it
sits: `_load_codes` turns a tile of codes into float32 in registers (fp8 from its bits, so the
interpreter and every GPU read it alike), the K scales multiply the scores and the V scales the
probabilities (after the softmax's sums), so the products see the codes only.
"""
from __future__ import annotations

import dataclasses

import torch

from ...layout.decode_blocks import DecodeArgs, cache_decode_args, tensor_decode_args
from ...patterns import InfLLMv2
from ...scheduler.kernel import roofline_seconds
from .runtime import TritonKernelMixin, interpreting  # noqa: F401  (interpreting: part of this module's API)
from ..decode import MAX_SQ, SplitKVDecodeKernel  # noqa: F401  (MAX_SQ: part of this module's API)
from ..decode import topk_select_cost as _topk_select_cost

try:  # Triton is optional: without it the kernel registers and says why it cannot run
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the install
    triton, tl, _IMPORT_ERROR = None, None, e

def triton_unavailable() -> str | None:
    """Why this module's kernel cannot run here (None if Triton imported)."""
    return TritonSplitKVDecode().unavailable()


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (int(n) - 1).bit_length()))


#: QUANT of the kernel: 0 rows in the queries' dtype, 1 int8 codes, 2 fp8 e4m3fn codes (as bytes)
_QUANT = {None: 0, "int8": 1, "fp8_e4m3": 2}


if triton is not None:

    @triton.jit
    def _load_codes(ptr, mask, QUANT: tl.constexpr):
        """A tile of K or V as float32: plain rows converted, int8 codes as integers, fp8 e4m3fn
        codes decoded from their bits (exponent rebiased 7 -> 127; subnormals m * 2^-9 exactly,
        with no float32 denormal in between, so a flush-to-zero GPU decodes them too)."""
        if QUANT == 2:
            w = tl.load(ptr, mask=mask, other=0).to(tl.int32) & 0xFF
            e = (w >> 3) & 0xF
            m = w & 0x7
            normal = ((e + 120) << 23) | (m << 20)
            mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
            return tl.where((w & 0x80) != 0, -mag, mag)
        else:
            return tl.load(ptr, mask=mask, other=0).to(tl.float32)

    @triton.jit
    def _split_kernel(Q, K, V, PT, LEN, CNT, IDX, RMASK, PO, PL, KS, VS,
                      s_qb, s_qh, s_qs, s_kp, s_kh, s_kt, s_vp, s_vh, s_vt, s_pt, s_idx, s_rm, s_sp, s_sh,
                      HQ, HKV, SQ, D, DV, PAGE, KEYB, NSPLITS, WINDOW, SINKS, scale, cap,
                      HAS_LIST: tl.constexpr, HAS_RMASK: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, QUANT: tl.constexpr,
                      SOFTCAP: tl.constexpr, PREC: tl.constexpr):
        split = tl.program_id(0)
        bh = tl.program_id(1)
        rg = tl.program_id(2)
        b = bh // HKV
        h = bh % HKV
        group = HQ // HKV
        rows = rg * BLOCK_R + tl.arange(0, BLOCK_R)
        rvalid = rows < group * SQ
        g = rows // SQ
        t = rows % SQ
        length = tl.load(LEN + b)
        qpos = length - SQ + t
        dd = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + b * s_qb + (h * group + g)[:, None] * s_qh + t[:, None] * s_qs + dd[None, :],
                    mask=rvalid[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        if HAS_LIST:
            nblocks = tl.load(CNT + bh)
        else:
            nblocks = (length + KEYB - 1) // KEYB
        per = (nblocks + NSPLITS - 1) // NSPLITS
        lo = split * per
        hi = tl.minimum(nblocks, lo + per)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        lsum = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        nn = tl.arange(0, BLOCK_N)
        for bi in range(lo, hi):
            if HAS_LIST:
                blk = tl.load(IDX + bh * s_idx + bi)
            else:
                blk = bi
            j = blk * KEYB + nn
            jvalid = (nn < KEYB) & (j < length)
            page = tl.load(PT + b * s_pt + j // PAGE, mask=jvalid, other=0)
            off = j % PAGE
            k = _load_codes(K + page[:, None] * s_kp + h * s_kh + off[:, None] * s_kt + dd[None, :],
                            jvalid[:, None] & (dd[None, :] < D), QUANT)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (R, N)
            if QUANT != 0:  # q . (s_k code) = s_k (q . code)
                s = s * tl.load(KS + page * s_sp + h * s_sh + off, mask=jvalid, other=0.0)[None, :]
            s = tl.where(tl.abs(s) < float("inf"), s, float("nan"))  # non-finite q / k: NaN, not a masked -inf
            if SOFTCAP:  # cap * tanh(s / cap), natural-log units here
                e = tl.exp(-2.0 * (tl.abs(s) / cap))
                tc = (1.0 - e) / (1.0 + e)
                s = cap * tl.where(s < 0, -tc, tc)
            vis = rvalid[:, None] & jvalid[None, :]
            if CAUSAL:
                vis = vis & (j[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                vis = vis & (((qpos[:, None] - j[None, :]) < WINDOW) | (j[None, :] < SINKS))
            if HAS_RMASK:
                rm = tl.load(RMASK + (bh * SQ + t) * s_rm + blk, mask=rvalid, other=0)
                vis = vis & (rm != 0)[:, None]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)  # 0 while m is -inf
            p = tl.exp(s - m_safe[:, None])  # 0 on hidden pairs
            lsum = lsum * alpha + tl.sum(p, 1)
            vt = _load_codes(V + page[:, None] * s_vp + h * s_vh + off[:, None] * s_vt + dv[None, :],
                             jvalid[:, None] & (dv[None, :] < DV), QUANT)
            if QUANT != 0:  # p (s_v code) = (p s_v) code, after the sums took p
                p = p * tl.load(VS + page * s_sp + h * s_sh + off, mask=jvalid, other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=PREC)
            m = m_new
        seen = (lsum > 0) | (lsum != lsum)  # a NaN sum (non-finite input seen) stays NaN, never 0
        out = acc / tl.where(seen, lsum, 1.0)[:, None]
        prow = (b * HQ + h * group + g) * SQ + t
        slot = prow * NSPLITS + split
        tl.store(PO + slot[:, None] * DV + dv[None, :], tl.where(seen[:, None], out, 0.0),
                 mask=rvalid[:, None] & (dv[None, :] < DV))
        tl.store(PL + slot, tl.where(seen, m + tl.log(tl.where(seen, lsum, 1.0)), float("-inf")), mask=rvalid)


def run_decode(a: DecodeArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on work lists from `decode_blocks`: returns (out in q's dtype, lse float32),
    `lse = +inf` (and zeros) for a row that sees no key."""
    q = a.q
    b, hq, sq, d = q.shape
    hkv, dv_ = a.k.shape[1], a.v.shape[3]
    group = hq // hkv
    splits = a.splits
    part = torch.empty(b, hq, sq, splits, dv_, dtype=torch.float32, device=q.device)
    plse = torch.empty(b, hq, sq, splits, dtype=torch.float32, device=q.device)
    if b * hq * sq == 0:
        return q.new_zeros(b, hq, sq, dv_), torch.full((b, hq, sq), float("inf"), device=q.device)
    block_r = _pow2(min(group * sq, 64))
    grid = (splits, b * hkv, -(-group * sq // block_r))
    dummy = a.lengths  # stands for absent optional tensors (never read: their flags are off)
    cnt = a.count if a.count is not None else dummy
    idx = a.index if a.index is not None else dummy
    rm = a.row_mask if a.row_mask is not None else dummy
    quant = _QUANT[a.quant]
    k, v = a.k, a.v
    if quant == 2:  # fp8 codes as bytes: decoded from their bits (_load_codes)
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    ks = a.k_scale if quant else dummy
    vs = a.v_scale if quant else dummy
    if quant and (ks.stride(2) != 1 or ks.stride() != vs.stride()):
        raise ValueError("k_scale / v_scale must share strides, unit stride along the rows")
    _split_kernel[grid](
        q, k, v, a.page_table, a.lengths, cnt, idx, rm, part, plse, ks, vs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), a.page_table.stride(0),
        a.index.stride(1) if a.index is not None else 0, a.row_mask.stride(2) if a.row_mask is not None else 0,
        ks.stride(0) if quant else 0, ks.stride(1) if quant else 0,
        hq, hkv, sq, d, dv_, k.shape[2], a.key_block, splits, a.window, a.sinks, a.scale,
        a.softcap if a.softcap > 0 else 1.0,
        HAS_LIST=a.count is not None, HAS_RMASK=a.row_mask is not None, CAUSAL=a.causal,
        HAS_WINDOW=a.window > 0, BLOCK_R=block_r, BLOCK_N=_pow2(a.key_block), BLOCK_D=_pow2(d),
        BLOCK_DV=_pow2(dv_), QUANT=quant, SOFTCAP=a.softcap > 0,
        # TF32 products are exact for bfloat16 queries and rows (8-bit mantissas; int8 / fp8 codes too);
        # float16 / float32 keep IEEE float32 (TF32 missed float32's 1e-3 by 1.0-1.3x on the first GPU run)
        PREC="tf32" if q.dtype == torch.bfloat16 else "ieee",
        # fp8's bit decoding holds integer tiles beside the float ones: with 4 warps it spilled 8 bytes at
        # D=128 with Triton 3.6 (bench/gpu_static.py, sm_80 and sm_90)
        num_warps=8 if quant == 2 and _pow2(d) > 64 else 4)
    # merge the splits by log-sum-exp
    mx = plse.amax(dim=-1, keepdim=True)
    mx_safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = torch.exp(plse - mx_safe)  # 0 for empty splits
    wsum = w.sum(dim=-1, keepdim=True)
    seen = (wsum > 0) | torch.isnan(wsum)
    out = (w[..., None] * part).sum(dim=-2) / torch.where(seen, wsum, torch.ones_like(wsum))
    lse = torch.where(seen, mx_safe + torch.log(torch.where(seen, wsum, torch.ones_like(wsum))),
                      torch.full_like(wsum, float("inf")))[..., 0]
    return out.to(q.dtype), lse


def _units(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the merge is exercised


def _infllmv2_picks(q, view, pattern):
    from .infllmv2_select import infllmv2_picks_over_cache_triton  # imports triton
    return infllmv2_picks_over_cache_triton(q, view, pattern)


def decode_over_cache(q, view, pattern, *, scale: float, softcap=None):
    """Attention over a cache's read view (`KVView`): `(out (B, Hq, Sq, Dv) in q's dtype, lse float32)`.
    InfLLMv2 selects with the Triton kernels of `infllmv2_select.py` over the cache's window sums."""
    return run_decode(cache_decode_args(q, view, pattern, scale=scale, units=_units(q.device), softcap=softcap,
                                        infllmv2_picks=_infllmv2_picks))


class TritonSplitKVDecode(TritonKernelMixin, SplitKVDecodeKernel):
    """Split-KV decode in Triton: Sq <= 16 rows per sequence, each GQA group's K/V read once,
    Dense / SlidingWindow / BlockSparse / TopK; forward only (decode is inference)."""

    name = "triton.splitkv_decode"
    backend = "triton"
    #: estimate until measured on a GPU (none was lent when this kernel was written)
    memory_efficiency = 0.5
    overhead_s = 30e-6  # launch + the PyTorch merge

    def import_error(self):
        return None if _IMPORT_ERROR is None else f"{type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}"

    def cost(self, p):
        t = super().cost(p)
        if p.device.type != "cuda":
            t += 1000.0  # the interpreter: only when backend="triton" is asked for
        return t

    def forward(self, q, k, v, p, layout):
        return run_decode(tensor_decode_args(q, k, v, p.pattern, scale=p.scale, units=_units(q.device),
                                             softcap=p.softcap))


class TritonCacheDecode(TritonSplitKVDecode):
    """`triton.splitkv_decode` over a contiguous or paged cache (the "attention_with_cache" op);
    also InfLLMv2, selected by the Triton kernels of `infllmv2_select.py` from the cache's window
    sums (O(blocks) per step), then run as its TopK view."""

    patterns = TritonSplitKVDecode.patterns + (InfLLMv2,)
    cache_kinds = ("contiguous", "paged")
    kv_dtypes = (None, "int8", "fp8_e4m3")

    def cost(self, p):
        if not isinstance(p.pattern, InfLLMv2):
            return super().cost(p)
        # the attention as its TopK view's (that view selects nothing itself here), plus the scoring
        # of every visible window sum by every query head (the log-sum-exp pass, then the fine one)
        pat = p.pattern
        view = dataclasses.replace(p, pattern=pat.attention_view())
        t = super().cost(view) - _topk_select_cost(view)
        windows = p.sk / pat.kernel_stride * (1.25 if pat.normalizer == "coarse" else 2.0)
        flops = (2.0 * p.head_dim + 4.0) * p.sq * windows * p.batch * p.q_heads
        return t + roofline_seconds(p, flops=flops, bytes_moved=4.0 * p.batch * p.kv_heads * windows * p.head_dim,
                                    efficiency=0.3, compute_dtype=torch.float32, overhead_s=2 * self.overhead_s)

    def forward_cache(self, q, view, p):
        return decode_over_cache(q, view, p.pattern, scale=p.scale, softcap=p.softcap)
