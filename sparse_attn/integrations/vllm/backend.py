"""sparse_attn as a vLLM (0.32) attention backend: backend class, metadata builder, impl.

Imported by vLLM only (through `register()`, which points `AttentionBackendEnum.CPU_ATTN` here):
this module imports vLLM at its top, the rest of the package does not.

Per step, vLLM first calls `do_kv_cache_update` (the new tokens' K/V into its pages, and for TopK
the page sums beside them; for InfLLMv2 the chunk sums), then `forward` over the whole batch, which
first completes InfLLMv2's windows whose last row the step wrote (`PageWindows.complete`: it needs
the block table, which `do_kv_cache_update` is not given), then:

* requests with one new token (decode) go together through `attention_with_cache`'s plan
  (`plan_with_cache`, kept per batch size) on a `PagesCache` -- the scheduler picks sparse_attn's
  split-KV decode, which reads vLLM's pages through the block table in place; from the second
  step on, where the plan has one (Dense / SlidingWindow without sinks), its lighter re-run
  (`CachePlan.prepared`): the kernel's binding called with the step's lengths, table and vLLM's
  query rows, writing vLLM's output rows in place; for a TopK / InfLLMv2 layer that re-run is
  Dense's, taken while the step's sequences are short enough for the pattern to see every causal
  key (the re-run's `longest`; past it the plan runs and selects);
* every other request (prefill, a chunk of a chunked prefill, a prefix-cache hit) runs
  `sparse_attn.attention` on its new queries against its keys, end-aligned as the contract says,
  through a plan made once per request shape and shared by every layer (`prefill.run_prefill`).
  A request with no earlier keys (a whole prompt, the first chunk of a chunked one) attends to its
  new K/V as vLLM hands them, no copy; a later chunk or a prefix-cache hit reads its visible keys
  from the pages in one gather (`pages.gather_keys`: from the window's start only, for a window
  without sinks). `STATS` counts both, for tests and benchmarks.

What the backend cannot honour raises `ValueError` naming the option when the layer is built
(engine start): ALiBi, a quantized KV cache (`kv_cache_dtype`), encoder / cross attention,
fused output quantization, KV sharing under TopK or InfLLMv2, an unknown pattern.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.logger import init_logger
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.kv_cache_interface import KVCacheLayout

from ...api.cache import plan_with_cache
from ...cache import huge_pages
from ...patterns import InfLLMv2, SlidingWindow, TopK
from ...scheduler import preload
from .pages import PagesCache, PageWindows, Scratch, gather_keys, split_pages, write_pages
from .patterns import ENV, layer_pattern, page_size_for, parse_pattern
from .prefill import run_prefill

#: vLLM looks the name up in `AttentionBackendEnum`: the member this backend stands in for
NAME = "CPU_ATTN"

#: "0" keeps vLLM's KV cache in the pages vLLM allocated it in (see `huge_pages_once`)
HUGE_PAGES_ENV = "SPARSE_ATTN_VLLM_HUGE_PAGES"

logger = init_logger("vllm.sparse_attn")  # under "vllm": its handler prints INFO
_huge_done: set = set()  # storage addresses already handled in this process (layers may share one)
_GATHERED = Scratch()  # a later prefill chunk's K and V, gathered from the pages (every layer's in turn)
HUGE_JOBS: list = []  # the background collapses `huge_pages_once` started in this process (benches report them)


def huge_pages_once(kv_cache: torch.Tensor):
    """At the first write into a KV cache storage: start moving it into 2 MB pages in the background,
    contents kept (`cache.huge_pages.Background`: madvise MADV_COLLAPSE, Linux 6.1+, from a daemon
    thread at idle CPU priority, 32 MB at a time). vLLM allocates the cache with `torch.zeros`, which
    on a Linux with transparent huge pages in "madvise" mode (Ubuntu's default) gives 4 KB pages, and
    decode streams the whole cache every token: in 2 MB pages the same kernel reads vLLM's layout
    1.10x faster at 128K keys, 1.16x at 16K (docs/vllm_measurements.md, "Eighteenth session"). The move
    costs Linux ~2.7-5 ms of kernel CPU per 2 MB where it must compact memory first (11.6 s for a
    4 GiB cache measured); done on the caller's path it held the first request that long, in the
    background it takes idle CPU only, and decode reads 4 KB pages until it reaches them. Once per
    storage and process, logged with its size and time when finished; `SPARSE_ATTN_VLLM_HUGE_PAGES=0`
    skips it. Returns the background job (None: skipped, done before, or nothing to collapse)."""
    key = kv_cache.untyped_storage().data_ptr()
    if key in _huge_done or kv_cache.device.type != "cpu":
        return None
    _huge_done.add(key)
    if os.environ.get(HUGE_PAGES_ENV, "1").strip() == "0":
        return None
    job = huge_pages.Background.start(kv_cache, on_done=_log_huge)
    if job is not None:
        HUGE_JOBS.append(job)
        logger.info("sparse_attn: moving the KV cache storage of %.1f MiB into 2 MB pages in the background "
                    "(%s=0 skips this)", kv_cache.untyped_storage().nbytes() / 2**20, HUGE_PAGES_ENV)
    return job


def _log_huge(job) -> None:
    total = job.tensor.untyped_storage().nbytes()
    huge = huge_pages.huge_bytes(job.tensor) or 0
    logger.info("sparse_attn: KV cache storage of %.1f MiB: %.1f MiB in 2 MB pages after %.2f s in the background "
                "(%s=0 skips this)", total / 2**20, min(huge, total) / 2**20, job.seconds, HUGE_PAGES_ENV)


#: what `forward` did in this process: prefill requests served from their new K/V directly, those
#: whose keys were gathered from the pages, the key rows gathered (K and V each), decode calls, and
#: the wall seconds spent in the decode and prefill parts of `forward` (all layers), and in completing
#: InfLLMv2's window sums (`PageWindows.complete`, every step that writes rows); the decode calls of
#: a TopK / InfLLMv2 layer that took the Dense re-run because every sequence was short enough
STATS = {"prefill_direct": 0, "prefill_gathered": 0, "rows_gathered": 0, "decode_calls": 0, "decode_s": 0.0,
         "prefill_s": 0.0, "windows_s": 0.0, "decode_dense_covered": 0}


def configured_pattern():
    """The pattern `SPARSE_ATTN_VLLM_PATTERN` asks for (`dense` when unset: the backend was chosen
    some other way)."""
    return parse_pattern(os.environ.get(ENV, "dense"))


class SparseAttnBackend(AttentionBackend):
    """vLLM attention backend whose kernels are sparse_attn's (CPU)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        size = page_size_for(configured_pattern())
        return [size] if size is not None else [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any head size (the decode kernel serves D <= 512; prefill kernels more)

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)  # one (page, kv head): its K rows, then its V rows

    @staticmethod
    def get_name() -> str:
        return NAME

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return SparseAttnImpl

    @staticmethod
    def get_builder_cls():
        return SparseAttnMetadataBuilder


@dataclass
class SparseAttnMetadata:
    """One step's batch. Host lists are read once here, not per layer."""

    num_actual_tokens: int
    query_start_loc: list[int]  # host, (num_reqs + 1,)
    seq_lens: torch.Tensor  # int32 (num_reqs,)
    seq_lens_host: list[int]
    block_table: torch.Tensor  # int32 (num_reqs, W)
    slot_mapping: torch.Tensor
    decode_idx: list[int]  # requests with one new token
    prefill_idx: list[int]  # the others
    causal: bool = True


class SparseAttnMetadataBuilder(AttentionMetadataBuilder[SparseAttnMetadata]):
    reorder_batch_threshold: int | None = 1  # vLLM puts the one-token requests first

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SparseAttnMetadata:
        m = common_attn_metadata
        qsl = m.query_start_loc_cpu[:m.num_reqs + 1].tolist()
        seq_lens = m.seq_lens[:m.num_reqs]
        host = seq_lens.tolist() if seq_lens.device.type == "cpu" else seq_lens.cpu().tolist()
        qlen = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
        decode = [i for i, n in enumerate(qlen) if n == 1]
        prefill = [i for i, n in enumerate(qlen) if n > 1]
        table = m.block_table_tensor[:m.num_reqs]
        return SparseAttnMetadata(num_actual_tokens=m.num_actual_tokens, query_start_loc=qsl,
                                  seq_lens=seq_lens.to(torch.int32), seq_lens_host=host,
                                  block_table=table if table.dtype == torch.int32 else table.to(torch.int32),
                                  slot_mapping=m.slot_mapping, decode_idx=decode, prefill_idx=prefill,
                                  causal=m.causal if isinstance(m.causal, bool) else None)


class SparseAttnImpl(AttentionImpl[SparseAttnMetadata]):
    """One decoder layer's attention on sparse_attn's kernels (pattern: `layer_pattern`)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        if alibi_slopes is not None:
            raise ValueError("alibi_slopes: the sparse_attn vLLM backend does not implement ALiBi")
        if kv_cache_dtype not in ("auto", None):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: the sparse_attn vLLM backend serves an "
                             f"unquantized KV cache only (kv_cache_dtype='auto')")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"attn_type={attn_type!r}: the sparse_attn vLLM backend serves decoder "
                             f"self-attention only")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.softcap = float(logits_soft_cap) if logits_soft_cap else None
        self.sinks = sinks
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.pattern = layer_pattern(configured_pattern(), sliding_window)
        # the extensions this layer's kernels call load now, when vLLM builds the layers, not in the
        # first request: a server's first 100-token prompt took 0.15 s where vLLM's own backend took
        # 0.015 (`bench/vllm_bench.py e2e`, 2-core Zen 4, 2026-12-07). A failed build is said on
        # stderr and left to the scheduler, which plans without it and says so in `explain()`
        preload(self.pattern, "cpu")
        self.is_topk = isinstance(self.pattern, TopK)
        self.is_infllmv2 = isinstance(self.pattern, InfLLMv2)
        if (self.is_topk or self.is_infllmv2) and kv_sharing_target_layer_name is not None:
            raise ValueError(f"kv_sharing_target_layer_name={kv_sharing_target_layer_name!r}: "
                             f"{type(self.pattern).__name__} keeps key sums per layer; a layer reading another "
                             f"layer's KV cache cannot run it")
        self._page_sums = None  # TopK: float32 (num_pages, Hkv, D), allocated with the first write
        self._windows = None  # InfLLMv2: its window sums beside the pages (PageWindows), likewise
        self._plans = {}  # decode batch size -> CachePlan
        self._fast = {}  # decode batch size -> the plan's lighter re-run (`CachePlan.prepared`), or None
        self._opts_for = (None, None)  # (key, opts): `_opts`, made again only when the sinks change
        self._split = (None, None)  # (kv_cache, its K and V page views): `split_pages` once per cache tensor
        self._huge_seen = None  # the cache tensor `huge_pages_once` was last called for

    # ------------------------------------------------------------------------------- cache write
    def _sums_for(self, kv_cache: torch.Tensor):
        if not self.is_topk:
            return None
        pages, heads, page_size, _ = kv_cache.shape
        if page_size != self.pattern.block_size:
            raise ValueError(f"vLLM's page size ({page_size}) differs from TopK's block_size "
                             f"({self.pattern.block_size}); set {ENV}=topk:N:{page_size} or --block-size")
        if self._page_sums is None or self._page_sums.shape[0] != pages:
            self._page_sums = torch.zeros(pages, heads, self.head_size, dtype=torch.float32, device=kv_cache.device)
        return self._page_sums

    def _windows_for(self, kv_cache: torch.Tensor):
        if not self.is_infllmv2:
            return None
        pages, heads, page_size, _ = kv_cache.shape
        if self._windows is None or self._windows.num_pages != pages:
            p = self.pattern
            sizes = [(p.kernel_size, p.kernel_stride)]
            if p.normalizer == "coarse":
                sizes.append((4 * p.kernel_size, 4 * p.kernel_stride))
            self._windows = PageWindows(pages, page_size, heads, self.head_size, sizes, device=kv_cache.device)
        return self._windows

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if kv_cache is not self._huge_seen:  # the first write into this tensor (vLLM hands each layer the same one)
            self._huge_seen = kv_cache
            huge_pages_once(kv_cache)
        write_pages(kv_cache, key, value, slot_mapping, self._sums_for(kv_cache), self._windows_for(kv_cache),
                    pages=self._pages(kv_cache))

    # ----------------------------------------------------------------------------------- forward
    def _opts(self, device):
        """The keyword options of every call: made once, and again only if the sinks are replaced or
        written in place (weights are loaded into them after the layer is built)."""
        s = self.sinks
        key = (device, None if s is None else (s.data_ptr(), s._version))
        if self._opts_for[0] != key:
            opts = {"scale": self.scale}
            if self.softcap is not None:
                opts["softcap"] = self.softcap
            if s is not None:
                opts["sink_logits"] = s.to(device=device, dtype=torch.float32)
            self._opts_for = (key, opts)
        return self._opts_for[1]

    def _pages(self, kv_cache):
        """`split_pages(kv_cache)`, kept per cache tensor (vLLM hands each layer the same one)."""
        if self._split[0] is not kv_cache:
            self._split = (kv_cache, split_pages(kv_cache))
        return self._split[1]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """`query` `(T, Hq, D)`, `key` / `value` `(T, Hkv, D)` (already in the pages), `kv_cache`
        `(num_pages, Hkv, page_size, 2 * D)`; writes `output` `(T, Hq, D)` and returns it."""
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("output_scale: the sparse_attn vLLM backend has no fused output quantization")
        if attn_metadata is None:  # profiling run
            return output
        m = attn_metadata
        if m.causal is not True:
            raise ValueError("causal: the sparse_attn vLLM backend serves causal attention only")
        opts = self._opts(query.device)
        qsl = m.query_start_loc
        if self._windows is not None:  # InfLLMv2: the windows this step's rows complete (needs the table)
            tw = time.perf_counter()
            self._windows.complete(m.block_table, [(i, n - (qsl[i + 1] - qsl[i]), n)
                                                   for i, n in enumerate(m.seq_lens_host)])
            STATS["windows_s"] += time.perf_counter() - tw
        t0 = time.perf_counter()
        if m.decode_idx:
            self._decode(query, kv_cache, m, output, opts)
        t1 = time.perf_counter()
        STATS["decode_s"] += t1 - t0
        if not m.prefill_idx:
            return output
        k_pages, v_pages = self._pages(kv_cache)
        for i in m.prefill_idx:
            a, b, total = qsl[i], qsl[i + 1], m.seq_lens_host[i]
            q = query[a:b]  # (T, Hq, D) rows
            lo = self._first_key(total, b - a)
            if total == b - a and key is not None:  # nothing cached before: the new key rows themselves
                k, v = key[a:b], value[a:b]
                STATS["prefill_direct"] += 1
            else:
                k = gather_keys(k_pages, m.block_table[i], lo, total, _GATHERED, 0)
                v = gather_keys(v_pages, m.block_table[i], lo, total, _GATHERED, 1)
                STATS["prefill_gathered"] += 1
                STATS["rows_gathered"] += total - lo
            run_prefill(q, k, v, self.pattern, opts, output[a:b])
        STATS["prefill_s"] += time.perf_counter() - t1
        return output

    def _first_key(self, total: int, new: int) -> int:
        """First key a chunk of `new` queries ending at `total` can see: a window without sinks
        never looks further back than `window - 1` keys (end alignment keeps the meaning)."""
        p = self.pattern
        if isinstance(p, SlidingWindow) and p.sinks == 0:
            return max(0, total - new - p.window + 1)
        return 0

    def _decode(self, query, kv_cache, m, output, opts):
        idx = m.decode_idx
        qsl = m.query_start_loc
        n = len(idx)
        if idx == list(range(n)):  # vLLM's reordered batch: the decodes come first
            rows = slice(qsl[0], qsl[n])
            table, lens = m.block_table, m.seq_lens
            if n < len(qsl) - 1:  # prefills follow
                table, lens = table[:n], lens[:n]
            fast = self._fast.get(n)
            if fast is not None and fast.k is self._pages(kv_cache)[0] and output.is_contiguous() and (
                    fast.longest is None or max(m.seq_lens_host[:n]) <= fast.longest):
                # the kernel writes vLLM's output rows in place; (n, Hq, D) rows are one query each
                STATS["decode_calls"] += 1
                if fast.longest is not None:  # a TopK / InfLLMv2 that sees every causal key: Dense
                    STATS["decode_dense_covered"] += 1
                if query.shape[0] == n:
                    fast.run(query, lens, table, output)
                else:
                    fast.run(query[:n], lens, table, output[:n])
                return
        else:
            rows = torch.tensor([qsl[i] for i in idx], dtype=torch.long, device=query.device)
            sel = torch.tensor(idx, dtype=torch.long, device=query.device)
            table, lens = m.block_table[sel], m.seq_lens[sel]
        cache = PagesCache(kv_cache, table, lens, [m.seq_lens_host[i] for i in idx], page_sums=self._page_sums,
                           windows=self._windows, pages=self._pages(kv_cache))
        STATS["decode_calls"] += 1
        q = query[rows][:, :, None]  # (n, Hq, 1, D)
        output[rows] = self._planned(q, cache, opts)[:, :, 0]

    def _planned(self, q, cache, opts):
        """`attention_with_cache` through a plan kept per decode batch size: the scheduler's choice
        (~150 us of host work per call) is made once, not per layer and step; each run decides from
        the step's lengths what the pattern runs as (a TopK / InfLLMv2 that sees every causal key
        runs as Dense: `CachePlan.run`). A plan that no longer fits the call (`CachePlan.run` raises
        `ValueError`) is made again; a second failure raises."""
        key = q.shape[0]
        plan = self._plans.get(key)
        sinks = opts.get("sink_logits")
        if plan is not None:
            try:
                return plan.run(q, cache, sink_logits=sinks)
            except ValueError:
                pass
        plan = self._plans[key] = plan_with_cache(q, cache, self.pattern, **opts)
        out = plan.run(q, cache, sink_logits=sinks)
        # later steps of this batch size: the plan's lighter re-run, where its kernel has one
        # (cpu.decode: the binding's call with the step's tensors only; for a TopK / InfLLMv2 the
        # Dense re-run, for sequences no longer than its `longest`)
        self._fast[key] = plan.prepared(cache)
        return out
