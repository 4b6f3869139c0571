"""The `cpu` backend's kernels: C++ over the shared BlockLayout (csrc/cpu/), built just in time.

Nothing here compiles at import: the extension is loaded on the first `unavailable()` (the
scheduler asks it when it plans a call) or `run()`, and the outcome, success or the build error,
is cached for the process by the loader.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..._build import load_extension, unavailable_reason
from ...layout import build_layout
from ...layout.infllmv2_selection import infllmv2_token_index
from .infllmv2 import infllmv2_select_cpu
from .infllmv2 import selection_reason
from ...layout.topk_selection import pooled_keys
from ...patterns import BlockSparse, Dense, InfLLMv2, SlidingWindow, TopK
from ...scheduler.kernel import roofline_seconds
from ..flash import FlashKernel
from ..flash_varlen import VarlenFlash

#: key block of Dense / SlidingWindow layouts (BlockSparse / TopK use their block_size)
K_BLOCK = 64
#: query rows of one task = G * q_block; ~256 keeps the micro-kernels busy while the tile's
#: float32 Q, S and O stay in the 2 MiB L2 (measured, B=1 Hq=8 D=128 S=4096: G=1 128 rows
#: 158 GFLOP/s vs 64 rows 140; G=4 64 rows 181-184, 32 rows 175)
TARGET_ROWS = 256


def dense_q_block(group: int) -> int:
    """Query tile of Dense / SlidingWindow layouts for a GQA group of `group` heads: 64 or 128."""
    return 128 if group * 64 < TARGET_ROWS else 64


#: key block of a Dense float32 forward at head dims <= 64: at D = 64 a score costs 128 FMAs,
#: so the per-block work (the row max and sum bookkeeping, the rescale of O, the micro-kernels'
#: prologues) weighs twice what it does at D = 128. Measured (2026-12-02, 2-core Zen 4, one
#: thread, CPU time, causal 4096 x 4096, Hq 4, Hkv 2, load 3-8): k_block 64 115.0 / 114.3 ms,
#: 128 110.2 / 108.8 ms, 256 106.6 ms (one run); 128 keeps the score scratch (192 x 128 floats)
#: small. Forward only: a layout that the backward also reads (training) keeps K_BLOCK.
K_BLOCK_SMALL_F32 = 128
#: ... from this many keys on. Below it the diagonal's larger masked share costs more than the
#: blocks save: the vLLM plugin's first chunk of n tokens (Hq 4, Hkv 2, D 64, 2 Zen 4 threads,
#: 2026-12-07, medians of 3 alternating rounds) took 1.23 / 1.17 / 1.12 / 1.07 / 0.98-1.09 x the
#: time of 64-key blocks at n = 64 / 100 / 256 / 512 / 1024 (1.27 / 1.22 / 1.16 / 1.07 on one
#: thread), 1.01 at 4096 x 4096, 1.00 at 4096 x 8192, 0.96 at 4096 x 16384.
K_BLOCK_SMALL_F32_MIN_KEYS = 4096
#: key block of a Dense bfloat16 forward on AMX tiles (csrc/cpu/gemm_amx.h): the tiles make the
#: products cheap, so the per-block row work weighs more. Measured (2026-12-05, 2-core Sapphire
#: Rapids VM, 2 threads, Sq 4096, Hq 4, Hkv 2, D 64, best of 3, one process): Sk 4096 k_block 64
#: 22.9 ms, 128 18.4, 256 21.8; Sk 32768: 271.2, 198.9, 210.4 ms.
K_BLOCK_AMX = 128


def amx_forward() -> bool:
    """Whether the loaded build's bfloat16 forward multiplies on AMX tiles now (built, granted by
    Linux, not switched off with SPARSE_ATTN_CPU_AMX=0 / `set_amx(False)`)."""
    try:
        ext = _ext()
        return bool(getattr(ext, "amx_built", False)) and bool(ext.amx_enabled())
    except Exception:  # noqa: BLE001 - unavailable: the scheduler lists the reason elsewhere
        return False


def dense_k_block(p) -> int | None:
    """The key block `prepare` asks for (None: cpu_layout's default, K_BLOCK)."""
    if not isinstance(p.pattern, Dense) or p.requires_grad:  # a layout the backward reads keeps K_BLOCK
        return None
    if (p.head_dim <= 64 and p.v_head_dim <= 64 and p.dtype == torch.float32
            and p.sk >= K_BLOCK_SMALL_F32_MIN_KEYS):
        return K_BLOCK_SMALL_F32
    if p.dtype == torch.bfloat16 and p.head_dim <= 128 and p.v_head_dim <= 128 and amx_forward():
        return K_BLOCK_AMX
    return None


def _ext():
    return load_extension("cpu")


@functools.lru_cache(maxsize=8)  # a dense layout is O((S / 64)^2) ints: a few shapes only
def _static_layout(pattern, sq: int, sk: int, q_block: int | None, k_block: int | None):
    """Layouts of Dense / SlidingWindow / TopK's forced blocks depend on host integers only (shape
    (1, 1, M, W)): built once per (pattern, lengths, tiles), e.g. once for all the layers of a model."""
    return build_layout(pattern, batch=1, kv_heads=1, sq=sq, sk=sk, q_block=q_block, k_block=k_block,
                        device="cpu")


def _tiles(pattern, hq: int, hkv: int, q_block, k_block):
    """The (q_block, k_block) a layout of `pattern` is built with: Dense / SlidingWindow default to
    `dense_q_block` of the GQA group and K_BLOCK; the block patterns keep their own (None)."""
    if not isinstance(pattern, (BlockSparse, TopK, InfLLMv2)):
        return q_block or dense_q_block(hq // max(hkv, 1)), k_block or K_BLOCK
    return q_block, k_block


def cpu_layout(q, k, pattern, *, q_block: int | None = None, k_block: int | None = None):
    """The BlockLayout the C++ kernel runs for `pattern` (with TopK's per-token selection)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    q_block, k_block = _tiles(pattern, hq, hkv, q_block, k_block)
    if isinstance(pattern, BlockSparse):  # data: not cached
        return build_layout(pattern, batch=b, kv_heads=hkv, sq=sq, sk=sk, q_block=q_block, k_block=k_block,
                            device=q.device)
    if isinstance(pattern, InfLLMv2):  # its forced blocks are its TopK view's; the selection is its own
        lay = _static_layout(pattern.attention_view(), sq, sk, q_block, k_block)
        if sq > 0 and b > 0:
            with torch.no_grad():
                lay = dataclasses.replace(lay, token_index=infllmv2_select(q, k, pattern))
        return lay
    lay = _static_layout(pattern, sq, sk, q_block, k_block)
    if isinstance(pattern, TopK) and sq > 0 and b > 0:
        with torch.no_grad():
            lay = dataclasses.replace(lay, token_index=topk_select(q, k, pattern))
    return lay


def topk_select(q, k, pattern: TopK, kbar=None):
    """TopK's per-token selection (int32 `(B, Hkv, Sq, topk)`, ascending, -1 padded) by the C++
    kernel (csrc/cpu/topk_select.cpp): block means pooled in PyTorch (K read once in its dtype,
    float32 sums), or `kbar` `(B, Hkv, nblocks, D)` float32 when the caller has them; scores and
    the running top-k in C++, chunk by chunk of queries (never Sq x nblocks at once)."""
    b, _, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bs = pattern.block_size
    nb = -(-sk // bs)
    if kbar is None:
        kbar = pooled_keys(k, bs, torch.float32)
    w = _ext().vector_width
    kbar_t = kbar.new_zeros(b, hkv, d, -(-nb // w) * w)
    kbar_t[..., :nb] = kbar.transpose(-1, -2)
    return _ext().topk_select(q, kbar_t, hkv, sk, nb, bs, pattern.topk, pattern.sink_blocks, pattern.local_blocks)


def infllmv2_select(q, k, pattern: InfLLMv2):
    """InfLLMv2's per-token picks (int32 `(B, Hkv, Sq, topk)`, ascending, -1 padded): the C++
    selection (backends/cpu/infllmv2.py) for float32 / bfloat16 / float16, the PyTorch one for
    float64 (the kernel scores in float32; float64 inputs keep the reference's float64 selection)."""
    if q.dtype == torch.float64:
        return infllmv2_token_index(q, k, pattern)
    return infllmv2_select_cpu(q, k, pattern)


def block_sparse_forward(q, k, v, pattern, *, scale: float, q_block: int | None = None, k_block: int | None = None):
    """Run the C++ kernel on `pattern` (Dense, SlidingWindow, BlockSparse, TopK) for CPU tensors:
    the layout (and TopK's per-token selection) is built in PyTorch, then the extension runs.
    Returns the output only. Raises `ExtensionBuildError` if the extension cannot be built."""
    lay = cpu_layout(q, k, pattern, q_block=q_block, k_block=k_block)
    return block_sparse_forward_layout(q, k, v, lay, scale=scale)


def _rule(lay):
    return (lay.sq, lay.sk, lay.q_block, lay.k_block, lay.causal, -1 if lay.window is None else lay.window,
            lay.sink_tokens)


def block_sparse_forward_layout(q, k, v, lay, *, scale: float, return_lse: bool = False, softcap=None, out=None):
    """The C++ kernel on an explicit :class:`~sparse_attn.layout.BlockLayout` (any layout: the
    kernel visits exactly the blocks it lists, with its token rule on the partial ones).
    Returns `out`, or `(out, lse)` with `lse` float32 `(B, Hq, Sq)` (+inf: no visible key).
    `softcap` (float > 0 or None) caps the scores (contract). `out`: a `(B, Hq, Sq, Dv)` tensor of
    q's dtype with a contiguous last dim (any other strides), written in place."""
    out, lse = _ext().block_sparse_fwd(
        q, k, v, lay.full_count, lay.full_index, lay.partial_count, lay.partial_index, lay.token_index,
        *_rule(lay), float(scale), float(softcap or 0.0), out, return_lse)
    return (out, lse) if return_lse else out


class PreparedForward:
    """`cpu.block_sparse`'s forward for one inference problem whose layout depends on the shapes
    only (Dense, SlidingWindow), with the layout, token rule, scale and softcap filled in once:
    `run(q, k, v, out)` calls the binding, which checks the call (ranks, shapes against the
    layout's lengths, dtypes, CPU tensors, `out`'s shape, dtype and contiguous last dim, `out`
    apart from q, k and v, no stride-0 dim) and writes the rows into `out`: no Python validation,
    no layout lookup. Made by `CpuBlockSparse.prepared_forward` (through `Plan.prepared`) for a
    serving loop that runs one request shape through every layer (integrations/vllm); `Plan.run`
    keeps the full validation. Keeps no call's tensors.

    The tensors are the plan's `(1, H, S, D)` ones, or the same rows token-major, `(S, H, D)`, as a
    server holds them (q, k, v and out all 3-D): the binding reads them through their strides, so
    the caller makes no views. No lse is computed."""

    def __init__(self, lay, *, scale: float, softcap):
        self._args = (lay.full_count, lay.full_index, lay.partial_count, lay.partial_index, lay.token_index,
                      *_rule(lay), float(scale), float(softcap or 0.0))
        self._fwd = _ext().block_sparse_fwd

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        self._fwd(q, k, v, *self._args, out, False)


def block_sparse_backward_layout(q, k, v, out, lse, dout, lay, *, scale: float, mode: int = 0, softcap=None):
    """The C++ backward over `lay` (the forward's layout). Returns (dq, dk, dv) in the inputs' dtypes.

    Two schedules (csrc/cpu/block_sparse_bwd.cpp), chosen by `mode`: 0 (auto: fused when the
    batch x kv-head tasks keep every thread busy, else two-pass), 1 two-pass (dq per query tile
    over its blocks, then dk/dv per key block over the query tiles of `lay.transpose()` and, for
    TopK, the tokens that selected the block, `BlockLayout.transpose_tokens`; 7 products), 2 fused
    (one task per (batch, kv head) walks its key blocks as the dk/dv pass does and adds dq into a
    float32 accumulator of its query rows; 5 products). The scheduler's path passes 0; the
    others exist so tests can run each schedule."""
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (auto), 1 (two-pass) or 2 (fused), got {mode!r}")
    tfc, tfi, tpc, tpi = lay.transpose()
    tokens, offsets = lay.transpose_tokens() or (None, None)
    ti = lay.token_index
    return _ext().block_sparse_bwd(
        q, k, v, out, lse, dout, lay.full_count, lay.full_index, lay.partial_count, lay.partial_index,
        tfc, tfi, tpc, tpi, ti, tokens, offsets, *_rule(lay), float(scale), mode, float(softcap or 0.0))


def cpu_varlen_layout(pattern, *, nseq: int, kv_heads: int, group: int, sk: int):
    """The one layout of a packed varlen call (`sk x sk`, `sk >= max Sk_i`, absolute tiles from
    0): a BlockSparse layout's top-left corners (batch nseq or 1), else the cached static one."""
    if isinstance(pattern, BlockSparse):
        nb = -(-sk // pattern.block_size)
        return build_layout(BlockSparse(pattern.layout[:, :, :nb, :nb], block_size=pattern.block_size),
                            batch=nseq, kv_heads=kv_heads, sq=sk, sk=sk, device="cpu")
    return _static_layout(pattern, sk, sk, dense_q_block(group), K_BLOCK)


class CpuBlockSparse(VarlenFlash, FlashKernel):
    """Flash attention over the layout's visited blocks only, parallel over (batch, kv head,
    query tile) with dynamic scheduling, the G query heads of a GQA group sharing each K/V block
    (converted to float32 once per tile, or, for bfloat16 on AVX-512 BF16, pair-packed for
    vdpbf16ps products); TopK's per-token blocks are visited block by block for all the tokens of
    a tile that selected them, and TopK's selection runs in C++ too. Backward
    (csrc/cpu/block_sparse_bwd.cpp): fused, one task per (batch, kv head) walking its key blocks
    over the transposed layout for dk/dv and adding dq into a per-task accumulator, when those
    tasks keep every thread busy; else two passes (dq per query tile, dk/dv per key block).
    float32 accumulation."""

    name = "cpu.block_sparse"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (Dense, SlidingWindow, BlockSparse, TopK, InfLLMv2)
    head_dims = (1, 256)
    supports_backward = True
    supports_softcap = True
    #: fraction of the device's float32 peak reached over the visited pairs: 170-185 GFLOP/s of
    #: the nominal 192 (2 cores x 96) for dense causal, 130-140 for SlidingWindow(256) (whose
    #: partial blocks also compute masked pairs), 135-150 for 10%-dense BlockSparse; B=1 Hq=8
    #: Hkv=2 D=128, S=1K-4K, float32 and bfloat16 alike (2026-11-23, the project's 2-core
    #: AVX-512 EPYC; SDPA, modelled at 0.6, measured 0.65-0.75)
    efficiency = 0.8
    #: per CPU generation (DeviceInfo.generation) where it differs. avx2: on the 2-core Zen 3 EPYC
    #: (no AVX-512) with the 6 x 2 micro tile, dense causal prefill B=1 Hq=32 Hkv=8 D=128 S=4096
    #: ran at SDPA's speed: S=4096 bf16 1.03x / fp32 1.11x SDPA's speed in CPU time, S=8192 bf16
    #: 0.94-1.05x / fp32 0.95x (machine shared with 5 other jobs, 2026-11-23), so about SDPA's
    #: modelled 0.6, a little above it: the scheduler prefers this kernel from where its
    #: per-call overhead stops mattering
    efficiency_by_generation = {"avx2": 0.65}
    #: bfloat16 inputs where the build has vdpbf16ps products (AVX-512 BF16, `_ext().bf16_dot`):
    #: fraction of the device's bf16 peak (DeviceInfo.peak_tflops_lowp, 2.2x the float32 one).
    #: Dense causal B=1 Hq=32 Hkv=8 D=128 S=4096, one core: 139 GFLOP/s of the nominal 211
    #: (the micro-kernel alone: ~215; the rest is the float32 softmax and the packing), SDPA
    #: 71 (2026-11-23, 2-core Zen 4 EPYC)
    bf16_dot_efficiency = 0.6
    #: the same peak's fraction where the forward multiplies on AMX tiles (csrc/cpu/gemm_amx.h;
    #: the backward keeps vdpbf16ps): Dense causal Sq 4096 Hq 4 Hkv 2 D 64, 2 threads of a
    #: Sapphire Rapids VM (2026-12-05): Sk 4096 8.6 GFLOP in 18.4 ms (1.1 of the nominal 422),
    #: Sk 32768 129 GFLOP in ~200 ms (1.5); the vdpbf16ps path took 2.6-2.9x as long
    amx_efficiency = 1.1
    #: training: the backward's time over the forward's. Two-pass schedule (dq pass: Q.K^T,
    #: dO.V^T, dS.K; dk/dv pass: K.Q^T, V.dO^T, P^T.dO, dS^T.Q = 7 products against the forward's
    #: 2, plus per-pair conversions of Q and dO): 2.8-3.9x (dense causal fp32 B=1 Hq=32 Hkv=8
    #: D=128 S=2048, avx2, shared machine, 2026-11-23). The fused schedule (5 products), taken when
    #: the batch x kv-head tasks keep every thread busy: ~2.6x (same case, one Zen 4 core).
    #: SDPA's CPU backward: fp32 ~3.2x its forward, bf16 ~30x.
    backward_factor = 3.5
    backward_factor_fused = 2.6
    #: TopK's per-token blocks run at `efficiency * G / (G + 1)`: each (block, tile) pair converts
    #: the block for the rows of the tokens that selected it, few on random inputs at long
    #: lengths (measured S=16K TopK(16) random: G=4 ~0.6, G=1 ~0.3 of the peak).
    #: The selection (C++, csrc/cpu/topk_select.cpp): q.kbar over the candidate blocks with the
    #: float32 micro-kernel plus a running top-k, counted over every block (~half are candidates
    #: under the causal rule): S=32768 TopK(16) B=1 Hq=32 Hkv=8 D=128 bf16, 34 GFLOP counted in
    #: 0.25 s on 2 threads = 0.7 of the float32 peak (the PyTorch selection it replaced: 14 s).
    #: Pooling reads K once in its dtype (memory term, at the nominal bandwidth).
    select_efficiency = 0.6
    #: InfLLMv2's selection (C++, csrc/cpu/infllmv2_select.cpp): the float32 micro-kernel over the
    #: fine and coarse kernels each row can see, an exp2 per fine score (docs/infllmv2.md measures it)
    infllmv2_select_efficiency = 0.4
    #: decode and short rows: every visited K/V block is converted to float32 scratch; measured
    #: ~12-14 GB/s of those float32 bytes (dense decode, 16K keys) = 0.35 of the 35 GB/s nominal
    memory_efficiency = 0.35
    #: the extension call + the layout build (Python, ~160 us the first time; cached per shape for
    #: Dense, SlidingWindow and TopK's forced blocks, so repeated shapes pay ~40 us: `plan().run`
    #: of 8 bf16 tokens measured 39 us, 8 float32 tokens 50 us, Hq 4 Hkv 2 D 64, 2 threads,
    #: 2026-12-06, where torch's SDPA through reference.sdpa took 58 / 82 us); TopK adds its
    #: selection's PyTorch calls (~250 us at decode)
    overhead_s = 45e-6
    #: calls of at most `step_rows` query rows after earlier keys (Sq < Sk: decode steps, a few
    #: speculative rows): their key length grows every step, so each builds its layout anew,
    #: uncached; cpu.decode (at most 16 rows) competes for them
    step_overhead_s = 100e-6
    step_rows = 16
    topk_overhead_s = 250e-6

    def unavailable(self):
        return unavailable_reason(_ext)

    def preload(self, pattern):
        return self.unavailable() or selection_reason(pattern)

    def extra_reasons(self, p):
        why = super().extra_reasons(p)
        if p.varlen and isinstance(p.pattern, (TopK, InfLLMv2)):
            why.append("packed varlen: the per-token selection is per sequence (not implemented packed)")
        missing = selection_reason(p.pattern)  # InfLLMv2's selection is a second extension
        if missing:
            why.append(missing)
        return why

    def path_note(self, p) -> str:
        """Which products the forward multiplies with (shown by `explain()`)."""
        if p.dtype != torch.bfloat16:
            return ""
        if amx_forward():
            return ("cpu.block_sparse: bfloat16 products on AMX tiles in the forward (csrc/cpu/gemm_amx.h; "
                    "SPARSE_ATTN_CPU_AMX=0 turns them off), vdpbf16ps in the backward")
        if self.bf16_dot():
            return "cpu.block_sparse: bfloat16 dot products (vdpbf16ps / bfdot)"
        return "cpu.block_sparse: bfloat16 converted to float32, float32 products"

    def bf16_dot(self) -> bool:
        """Whether the loaded build multiplies bfloat16 with vdpbf16ps (else it converts to float32)."""
        try:
            return bool(getattr(_ext(), "bf16_dot", False))
        except Exception:
            return False

    def cost(self, p):
        pat = p.pattern
        per_pair = 2.0 * (p.head_dim + p.v_head_dim)
        fp32 = dict(bytes_moved=0.0, compute_dtype=torch.float32)
        lowp = p.dtype == torch.bfloat16 and self.bf16_dot()
        # the attention products: bf16 dot products, or float32 loops whatever the dtype
        prod = dict(bytes_moved=0.0, compute_dtype=torch.bfloat16 if lowp else torch.float32)
        elem = torch.finfo(p.dtype).bits // 8
        g = p.group if p.kv_heads else 1
        select = 0.0
        if isinstance(pat, InfLLMv2):
            # every head's q . kc over the fine and coarse kernels (1.25 Sk / stride), then the view
            kernels = 1.25 * p.sk / pat.kernel_stride
            select = roofline_seconds(p, flops=2.0 * p.head_dim * p.sq * kernels * p.batch * p.q_heads,
                                      efficiency=self.infllmv2_select_efficiency, **fp32) + self.topk_overhead_s
            pat = pat.attention_view()
        if isinstance(pat, TopK):
            # forced (sink + local) blocks run as tiles, the top-k blocks token by token
            forced = TopK(0, block_size=pat.block_size, sink_blocks=pat.sink_blocks, local_blocks=pat.local_blocks)
            tile_pairs = forced.visited_pairs(p.sq, p.sk) * p.batch * p.q_heads
            token_pairs = max(0.0, p.visited_pairs() - tile_pairs)
            q_block = pat.block_size
            # the selection: q . kbar over every block (counted), after pooling K (read once)
            select = max(
                roofline_seconds(p, flops=2.0 * p.head_dim * p.sq * -(-p.sk // pat.block_size) * p.batch * p.kv_heads,
                                 efficiency=self.select_efficiency, **fp32),
                roofline_seconds(p, flops=0.0, bytes_moved=elem * p.batch * p.kv_heads * p.sk * p.head_dim,
                                 efficiency=1.0)) + self.topk_overhead_s if not select else select
        else:
            tile_pairs, token_pairs = p.visited_pairs(), 0.0
            q_block = pat.block_size if isinstance(pat, BlockSparse) else dense_q_block(g)
        eff = ((self.amx_efficiency if not p.requires_grad and amx_forward() else self.bf16_dot_efficiency) if lowp
               else self.efficiency_by_generation.get(p.device.generation, self.efficiency))
        compute = (roofline_seconds(p, flops=per_pair * tile_pairs, efficiency=eff, **prod)
                   + roofline_seconds(p, flops=per_pair * token_pairs, efficiency=eff * g / (g + 1), **prod))
        # bytes: every tile reads (and converts to float32) the keys its rows visit, once per GQA group
        rows = max(1, min(p.sq, q_block))
        keys_read = pat.visited_pairs(p.sq, p.sk) / rows * p.batch * p.kv_heads
        nbytes = (4 * keys_read * (p.head_dim + p.v_head_dim)
                  + elem * p.batch * p.q_heads * p.sq * (p.head_dim + p.v_head_dim))
        memory = roofline_seconds(p, flops=0.0, bytes_moved=nbytes, efficiency=self.memory_efficiency)
        bwd = 0.0
        if p.requires_grad:  # the C++ rule (fused_pays in block_sparse_bwd.cpp)
            tasks, threads = p.batch * p.kv_heads, max(1, torch.get_num_threads())
            fused = tasks >= threads and tasks >= 0.8 * (-(-tasks // threads) * threads)
            bwd = self.backward_factor_fused if fused else self.backward_factor
        work = max(compute, memory) * (1.0 + bwd)
        step = p.sq <= self.step_rows and p.sq < p.sk
        return work + select + (self.step_overhead_s if step else self.overhead_s)

    def prepare(self, q, k, p):
        return cpu_layout(q.detach(), k.detach(), p.pattern, k_block=dense_k_block(p))

    def forward(self, q, k, v, p, layout):
        return block_sparse_forward_layout(q, k, v, layout, scale=p.scale, return_lse=True, softcap=p.softcap)

    #: `Plan.run(out=)` writes the kernel's rows into `out` (e.g. vLLM's output rows): no result
    #: tensor, no copy; with learned sinks (applied after the kernel) or a strided last dim, a copy
    writes_out = True

    def run_into(self, q, k, v, p, out, *, gate=None, sink_logits=None):
        if sink_logits is not None or (out.stride(-1) != 1 and out.shape[-1] > 1):
            return super().run_into(q, k, v, p, out, gate=gate, sink_logits=sink_logits)
        block_sparse_forward_layout(q, k, v, self.prepare(q, k, p), scale=p.scale, softcap=p.softcap, out=out)
        return out

    def prepared_forward(self, p):
        """A `PreparedForward` for the problem `p`, or None where a call needs more than the
        binding's (a selection: TopK, InfLLMv2; BlockSparse's layout is the caller's data; learned
        sinks, applied after the kernel; autograd; packed varlen)."""
        if (not isinstance(p.pattern, (Dense, SlidingWindow)) or p.sinks or p.requires_grad or p.varlen
                or p.is_empty):
            return None
        lay = _static_layout(p.pattern, p.sq, p.sk, *_tiles(p.pattern, p.q_heads, p.kv_heads, None, dense_k_block(p)))
        return PreparedForward(lay, scale=p.scale, softcap=p.softcap)

    def backward(self, q, k, v, out, lse, dout, p, layout):
        return block_sparse_backward_layout(q, k, v, out, lse, dout, layout, scale=p.scale, softcap=p.softcap)

    # packed varlen (backends/flash_varlen.py): one C++ call over all sequences, threads over
    # (sequence, kv head, query tile) tasks; needs Sq_i <= Sk_i (attention_varlen checks it)
    varlen_sq_above_sk = False


    def prepare_varlen(self, q, k, p):
        return cpu_varlen_layout(p.pattern, nseq=p.batch, kv_heads=k.shape[1], group=p.group, sk=p.sk)

    def forward_varlen(self, q, k, v, cu_q, cu_k, p, layout):
        return _ext().block_sparse_fwd_varlen(
            q, k, v, cu_q, cu_k, layout.full_count, layout.full_index, layout.partial_count, layout.partial_index,
            layout.sk, layout.q_block, layout.k_block, layout.causal, -1 if layout.window is None else layout.window,
            layout.sink_tokens, float(p.scale), float(p.softcap or 0.0))

    def backward_varlen(self, q, k, v, out, lse, dout, cu_q, cu_k, p, layout, mode: int = 0):
        tfc, tfi, tpc, tpi = layout.transpose()
        return _ext().block_sparse_bwd_varlen(
            q, k, v, out, lse, dout, cu_q, cu_k, layout.full_count, layout.full_index, layout.partial_count,
            layout.partial_index, tfc, tfi, tpc, tpi, layout.sk, layout.q_block, layout.k_block, layout.causal,
            -1 if layout.window is None else layout.window, layout.sink_tokens, float(p.scale), mode,
            float(p.softcap or 0.0))
