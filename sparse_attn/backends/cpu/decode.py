"""Split-KV decode on the CPU (csrc/cpu/decode.cpp): the few-query-row forward (Sq <= 16).

Decode reads every visited K/V byte to produce one row per query head, so it is memory-bound and
its speed is the bandwidth at which K/V are read. The kernel splits the visited keys of each
(batch, kv head) across the threads ("flash-decoding"); each split serves all the rows of the GQA
group (G heads x Sq tokens) from one read of its K/V, in the inputs' dtype (converted in
registers), and the splits are merged by log-sum-exp. What a row visits comes straight from the
pattern: the token rule (causal / window / sinks) and, for BlockSparse, the user's layout (read in
place) or, for TopK, the per-token selection (the contract's PyTorch selection,
`topk_token_index_pooled`, over keys pooled by the extension).
No `BlockLayout` is built: there is nothing to tile with one query row.

Over a KV cache (`CpuCacheDecode`, registered for `attention_with_cache`) the same kernel takes
the cache's read view: each sequence's length (rows end-aligned to it) and, for a paged cache,
the page table; TopK is then selected from the cache's block means (O(blocks), `layout/`).

Inference only (`supports_backward = False`); phases decode and chunked-prefill.
"""
from __future__ import annotations

import dataclasses

import torch

from ..._build import load_extension, unavailable_reason
from ...layout.decode_blocks import selection_over_cache
from ...layout.infllmv2_selection import infllmv2_index_over_cache
from ...layout.topk_selection import topk_token_index_pooled
from ...patterns import BlockSparse, Dense, InfLLMv2, SlidingWindow, TopK
from ...scheduler.cache_problem import CACHE_OP, kv_elem_bytes
from ...scheduler.kernel import roofline_seconds
from ...scheduler.problem import dense_reach
from ...scheduler.registry import register
from ..flash import FlashKernel
from .infllmv2 import infllmv2_picks_over_cache_cpu, native_over_cache
from .infllmv2 import pages_unavailable, selection_reason

#: most query rows (tokens) one call serves: the kernel's row masks are 16-bit and its scratch
#: (G * Sq rows x (D + 64) floats) is sized for a handful of tokens; longer chunks are prefill
MAX_ROWS = 16


def _ext():
    return load_extension("cpu_decode")


def decode_prepare(q: torch.Tensor, k: torch.Tensor, pattern):
    """What the kernel needs beyond q, k, v: TopK's per-token selection (int32 `(B, Hkv, Sq, topk)`),
    else None. On the device, no host synchronisation, no autograd."""
    if pattern.pool_block() is not None and q.shape[0] > 0 and q.shape[2] > 0:
        with torch.no_grad():
            # pooling all of K is the selection's whole cost at decode: done by the extension
            # (K read once in its dtype, float32 sums, all threads); the rest as the contract's
            # PyTorch selection does it
            kbar = _ext().pool_keys(k.detach(), pattern.block_size)
            return topk_token_index_pooled(q.detach(), kbar, k.shape[2], pattern)
    return None


def _decode_fwd(q, k, v, pattern, *, scale: float, token_index, lengths=None, page_table=None, page_size=0,
                softcap=None, k_scale=None, v_scale=None, prefetch: int = -1):
    """The one call of the extension: `decode_fwd(DecodeArgs)` -> `(out, lse)`
    (csrc/cpu/decode_binding.cpp says what each field means). `lengths` / `page_table`: a cache's
    (rows end-aligned to each sequence's length; K/V as pages), else None. `k_scale` / `v_scale`:
    a quantized cache's row scales (k, v then hold its int8 / fp8 codes). `prefetch`: -1 as the
    reuse clock says, 0 / 1 forced off / on (tests, A/B runs; never the arithmetic)."""
    ext = _ext()
    args = ext.DecodeArgs()
    args.q, args.k, args.v, args.scale = q, k, v, float(scale)
    args.softcap = float(softcap or 0.0)
    causal, window, sinks = pattern.token_rule()
    args.causal, args.window, args.sinks = causal, window if window else -1, sinks if window else 0
    if isinstance(pattern, BlockSparse):  # the C++ kernel reads the user's layout in place
        args.block, args.layout = pattern.block_size, pattern.layout
    elif pattern.pool_block() is not None:  # TopK: forced blocks in C++, the selection as token_index
        if token_index is None:  # empty input
            token_index = torch.empty(q.shape[0], k.shape[1], q.shape[2], 0, dtype=torch.int32)
        args.block, args.token_index = pattern.block_size, token_index
        args.sink_blocks, args.local_blocks = pattern.sink_blocks, pattern.local_blocks
    args.lengths, args.page_table, args.page_size = lengths, page_table, page_size
    args.k_scale, args.v_scale = k_scale, v_scale
    args.prefetch = prefetch
    return ext.decode_fwd(args)


def decode_forward(q, k, v, pattern, *, scale: float, token_index: torch.Tensor | None = None, softcap=None):
    """The split-KV kernel for `Sq <= 16` query rows: returns `(out (B, Hq, Sq, Dv) in q's dtype,
    lse float32 (B, Hq, Sq))`, lse = +inf (and out = 0) for rows that see no key. `token_index`
    (TopK only) defaults to the contract's selection. Raises `ExtensionBuildError` if the
    extension cannot be built."""
    if q.shape[2] > MAX_ROWS:
        raise ValueError(f"q has {q.shape[2]} query rows; the decode kernel serves at most {MAX_ROWS}")
    # the kernel reads K/V rows with vector loads: the head dim must be contiguous (cheap to ask,
    # true for every KV-cache layout; a transposed view is copied)
    if k.shape[-1] > 1 and k.stride(-1) != 1:
        k = k.contiguous()
    if v.shape[-1] > 1 and v.stride(-1) != 1:
        v = v.contiguous()
    if token_index is None and pattern.pool_block() is not None:
        token_index = decode_prepare(q, k, pattern)
    return _decode_fwd(q, k, v, pattern, scale=scale, token_index=token_index, softcap=softcap)


def _native_topk(view, pattern) -> bool:
    """TopK over a cache whose block sums are float32 (a float64 cache's stay on the PyTorch path of
    layout.topk_selection, which is the definition the C++ selection is tested against)."""
    return (isinstance(pattern, TopK) and view.block_sums is not None and view.block_sums.dtype == torch.float32
            and view.pool_block_size == pattern.block_size)


def decode_over_cache(q: torch.Tensor, view, pattern, *, scale: float, softcap=None):
    """Attention over a CPU cache's read view (`KVView`) with the split-KV kernel: each sequence's
    rows end-aligned to its own length (`view.lengths`), K/V read in place (a contiguous cache as
    strided rows, a paged one through its page table), TopK selected from the cache's block means
    (`layout.topk_selection.topk_index_over_cache`; C++ for float32 sums), InfLLMv2 from its window
    sums (C++ for float32 sums, csrc/cpu/infllmv2_decode.cpp; then run as its TopK view, as
    `layout.decode_blocks.selection_over_cache` says). Returns `(out (B, Hq, Sq, Dv) in q's
    dtype, lse float32 (B, Hq, Sq))`."""
    if q.shape[2] > MAX_ROWS:
        raise ValueError(f"q has {q.shape[2]} query rows; the decode kernel serves at most {MAX_ROWS}")
    if _native_topk(view, pattern):  # TopK from the float32 block sums, in C++ (one call, O(blocks))
        token_index = _ext().topk_select_sums(q.detach(), view.block_sums, list(view.host_lengths),
                                              pattern.block_size, pattern.topk, pattern.sink_blocks,
                                              pattern.local_blocks,
                                              view.page_table if view.sums_by_page else None)
    elif isinstance(pattern, InfLLMv2) and native_over_cache(view):  # from the float32 window sums, in C++
        token_index = infllmv2_index_over_cache(q, view, pattern, picks=infllmv2_picks_over_cache_cpu)
        pattern = pattern.attention_view()
    else:
        pattern, token_index = selection_over_cache(q, view, pattern)
    if view.kind == "contiguous":  # sequence b is k[b]: strided rows, read in runs
        table, page_size = None, 0
    else:
        table, page_size = view.page_table, view.page_size
    return _decode_fwd(q, view.k, view.v, pattern, scale=scale, token_index=token_index, lengths=view.lengths,
                       page_table=table, page_size=page_size, softcap=softcap, k_scale=view.k_scale,
                       v_scale=view.v_scale)


class PreparedDecode:
    """The split-KV kernel over one paged cache's storage with every argument that cannot change
    between decode steps filled in once (the pattern's token rule, scale, softcap, the K/V pages):
    `run(q, lengths, page_table, out)` sets the step's four tensors and calls the binding, which
    checks them (shapes, dtypes, lengths within the table, page ids within the pool, `out`
    contiguous and apart from q) and writes the result into `out`: no Python validation, no view,
    no allocation per step. q `(B, Hq, Sq, D)` or `(B, Hq, D)` (one row per sequence), `out` the
    same rank with Dv. Made by `CpuCacheDecode.prepared` for what needs nothing computed per step
    (Dense, SlidingWindow; no sinks, no quantized storage); a serving loop's fast path
    (integrations/vllm), not a public entry point: `attention_with_cache` / `CachePlan.run` keep
    the full validation. Keeps no step's tensors (the binding's `decode_step` takes them as
    arguments)."""

    def __init__(self, pattern, *, scale: float, softcap, k: torch.Tensor, v: torch.Tensor, page_size: int,
                 longest: int | None = None):
        ext = _ext()
        args = ext.DecodeArgs()
        args.k, args.v, args.scale, args.softcap, args.page_size = k, v, float(scale), float(softcap or 0.0), page_size
        causal, window, sinks = pattern.token_rule()
        args.causal, args.window, args.sinks = causal, window if window else -1, sinks if window else 0
        args.max_length = -1 if longest is None else int(longest)  # the binding refuses longer sequences
        self._args, self._step = args, ext.decode_step
        self.k, self.v = k, v
        #: the longest sequence `run` may be given (None: any; a longer one: the binding's
        #: ValueError): a TopK / InfLLMv2 runs as this Dense re-run only while it sees every causal
        #: key (`dense_reach`)
        self.longest = longest

    def run(self, q: torch.Tensor, lengths: torch.Tensor, page_table: torch.Tensor, out: torch.Tensor) -> None:
        self._step(self._args, q, lengths, page_table, out)


def _keys_read(p) -> float:
    """Keys of one (batch, kv head) the kernel reads: the union over the Sq rows of their visited
    keys (TopK: the rows' selections are assumed disjoint, the worst case on random inputs)."""
    pat = p.pattern
    per_row = pat.visited_pairs(p.sq, p.sk) / max(p.sq, 1)
    if isinstance(pat, TopK):
        blocks = pat.sink_blocks + pat.local_blocks + pat.topk * p.sq
        return min(float(p.sk), blocks * pat.block_size, per_row * p.sq)
    return min(float(p.sk), per_row + (p.sq - 1))


class CpuDecode(FlashKernel):
    """Split-KV (flash-decoding) forward for Sq <= 16: the visited keys of each (batch, kv head)
    are split across threads, each split reads its K/V once for all G x Sq rows of the group, in
    the inputs' dtype, float32 accumulation, splits merged by log-sum-exp. No backward."""

    name = "cpu.decode"
    backend = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    patterns = (Dense, SlidingWindow, BlockSparse, TopK)
    head_dims = (1, 512)
    supports_backward = False
    supports_softcap = True
    phases = ("decode", "chunked-prefill")
    #: fraction of the device's nominal bandwidth at which the visited K/V bytes are read:
    #: measured 2-3x cpu.block_sparse's decode speed for bfloat16 and ~1.5x for float32 (which
    #: converts every visited block to float32 scratch, modelled at 0.35 of 4-byte elements), and
    #: 60-120% of a same-run torch copy_ of K+V (16K keys, B=1 Hq=32 Hkv=8 D=128, 1-2 threads,
    #: 2026-11-23, 2-core AVX2 EPYC shared with other jobs: load average 8-12)
    memory_efficiency = 0.45
    #: float32 FMA rate over the visited pairs (dot products + output update, no matrix units);
    #: matters only for many rows per kv head (Sq x G large)
    compute_efficiency = 0.5
    #: Python + extension call + one parallel region
    overhead_s = 40e-6
    #: TopK's selection: keys pooled by the extension (K read once in its dtype, all threads;
    #: measured 55-65 ms for 268 MB of bf16 K at 131K keys on the loaded 2-core machine, 4-5 GB/s),
    #: then the contract's PyTorch scoring / top-k. Modelled with the same terms as
    #: cpu.block_sparse's selection (scores at 0.15 of the float32 peak, K bytes at the nominal
    #: bandwidth) so that the common part cancels when the two are ranked; both are optimistic
    #: in absolute terms (cpu.block_sparse's PyTorch pooling is far slower still: ~4 s there)
    select_efficiency = 0.15
    select_overhead_s = 250e-6

    def unavailable(self):
        return unavailable_reason(_ext)

    def path_note(self, p) -> str:
        """Which products the extension multiplies with for this problem (shown by `explain()`;
        the words come from the kernel's own dispatch rules, `products` in the binding)."""
        try:
            ext = _ext()
        except Exception:  # noqa: BLE001 - unavailable: the scheduler lists the reason instead
            return ""
        name = str(p.dtype).replace("torch.", "")
        kv = getattr(p, "kv_dtype", None) or name
        return f"cpu.decode: {ext.products(name, kv, p.group * max(p.sq, 1), p.head_dim, p.v_head_dim)}"

    def extra_reasons(self, p):
        why = []
        if p.sq > MAX_ROWS:
            why.append(f"Sq = {p.sq} query rows > {MAX_ROWS}: a decode kernel (prefill kernels tile longer chunks)")
        return why

    def cost(self, p):
        elem = kv_elem_bytes(p)  # a quantized cache: 1 byte + the row's scale
        nbytes = elem * p.batch * p.kv_heads * _keys_read(p) * (p.head_dim + p.v_head_dim)
        flops = 2.0 * (p.head_dim + p.v_head_dim) * p.visited_pairs()
        t = roofline_seconds(p, flops=0.0, bytes_moved=nbytes, efficiency=self.memory_efficiency)
        t = max(t, roofline_seconds(p, flops=flops, bytes_moved=0.0, efficiency=self.compute_efficiency,
                                    compute_dtype=torch.float32))
        return t + self._topk_select_cost(p) + self.overhead_s

    def _topk_select_cost(self, p) -> float:
        if p.pattern.pool_block() is None:
            return 0.0
        nb = -(-p.sk // p.pattern.block_size)
        scores = 2.0 * p.head_dim * p.sq * nb * p.batch * p.kv_heads
        pool = self._pool_bytes(p, nb)
        return max(roofline_seconds(p, flops=scores, bytes_moved=0.0, efficiency=self.select_efficiency,
                                    compute_dtype=torch.float32),
                   roofline_seconds(p, flops=0.0, bytes_moved=pool, efficiency=1.0)) + self.select_overhead_s

    def _pool_bytes(self, p, nb: int) -> float:
        """Bytes the selection reads to pool the keys: all of K, in its dtype."""
        return torch.finfo(p.dtype).bits // 8 * p.batch * p.kv_heads * p.sk * p.head_dim

    def prepare(self, q, k, p):
        return decode_prepare(q, k, p.pattern)

    def forward(self, q, k, v, p, layout):
        return decode_forward(q, k, v, p.pattern, scale=p.scale, token_index=layout, softcap=p.softcap)


class CpuCacheDecode(CpuDecode):
    """`cpu.decode` over a cache (the "attention_with_cache" op): the same kernel and cost, K/V
    read in place from contiguous or paged storage, TopK selected from the cache's block means,
    InfLLMv2 from its window sums (the compressed keys; the C++ scoring of csrc/cpu/
    infllmv2_decode.cpp for float32 sums, extension "cpu_infllmv2", then TopK's path).
    Quantized storage (int8 / fp8 codes + row scales) is read as it sits and dequantized in
    registers (csrc/cpu/decode_quant.h)."""

    patterns = CpuDecode.patterns + (InfLLMv2,)
    cache_kinds = ("contiguous", "paged")
    kv_dtypes = (None, "int8", "fp8_e4m3")
    #: InfLLMv2's C++ selection over the window sums (csrc/cpu/infllmv2_decode.cpp): measured
    #: 0.66 ms / 2.5 ms on one thread for 32K / 128K keys (B=1 Hq=32 Hkv=2 D=128, one row:
    #: ~34 GFLOP/s counted, ~0.3 of a core's float32 peak; 2026-12-02, 2-core Zen 4 EPYC, shared)
    infllmv2_select_efficiency = 0.3

    def cost(self, p):
        if not isinstance(p.pattern, InfLLMv2):
            return super().cost(p)
        # the attention as its TopK view's (no pooling), plus the scoring of every visible
        # compressed key by every query head (fine and coarse) with an exp each
        pat = p.pattern
        t = super().cost(dataclasses.replace(p, pattern=pat.attention_view()))
        t -= self._topk_select_cost(dataclasses.replace(p, pattern=pat.attention_view()))
        windows = p.sk / pat.kernel_stride * (1.25 if pat.normalizer == "coarse" else 1.0)
        flops = (2.0 * p.head_dim + 20.0) * p.sq * windows * p.batch * p.q_heads
        wbytes = (8 if p.dtype == torch.float64 else 4) * p.batch * p.kv_heads * windows * p.head_dim
        return t + max(roofline_seconds(p, flops=flops, bytes_moved=0.0, efficiency=self.infllmv2_select_efficiency,
                                        compute_dtype=torch.float32),
                       roofline_seconds(p, flops=0.0, bytes_moved=wbytes, efficiency=1.0)) + self.select_overhead_s

    def preload(self, pattern):
        """The decode extension, and for InfLLMv2 its selection over window sums: the contiguous
        sums' extension (needed: `extra_reasons`) and the one that reads sums kept per page (vLLM's
        pages; without it that selection takes the PyTorch path, `native_over_cache`, so its
        failure is not this kernel's reason)."""
        why = self.unavailable() or selection_reason(pattern)
        if isinstance(pattern, InfLLMv2):
            pages_unavailable()
        return why

    def extra_reasons(self, p):
        why = super().extra_reasons(p)
        missing = selection_reason(p.pattern)  # InfLLMv2's selection over the window sums
        if missing:
            why.append(missing)
        return why

    def _pool_bytes(self, p, nb):
        return (8 if p.dtype == torch.float64 else 4) * p.batch * p.kv_heads * nb * p.head_dim

    def forward_cache(self, q, view, p):
        return decode_over_cache(q, view, p.pattern, scale=p.scale, softcap=p.softcap)

    def prepared(self, p, view):
        """A `PreparedDecode` for the problem `p` over a paged view's storage, or None where a step
        needs more than the binding's call (learned sinks, applied on (out, lse) after it;
        quantized storage; a selection: BlockSparse's layout). `p.asked_pattern`: the token rule as
        asked, not clamped to the cache's length at planning (the cache grows). A TopK or InfLLMv2
        gets the Dense re-run bounded by `dense_reach` (sequences no longer than the lengths at
        which it sees every causal key; the contract makes that dense causal attention), or None
        where it never covers them."""
        pat = p.asked_pattern if p.asked_pattern is not None else p.pattern
        if p.sinks or view.kind != "paged" or view.quant is not None:
            return None
        longest = None
        if isinstance(pat, (TopK, InfLLMv2)):
            longest = dense_reach(pat)
            if not longest:
                return None
            pat = Dense()
        elif not isinstance(pat, (Dense, SlidingWindow)):
            return None
        return PreparedDecode(pat, scale=p.scale, softcap=p.softcap, k=view.k, v=view.v, page_size=view.page_size,
                              longest=longest)


register(CpuDecode())
register(CpuCacheDecode(), op=CACHE_OP)
