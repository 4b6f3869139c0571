"""vLLM with sparse_attn vs vLLM's own CPU backend: decode kernel GB/s and tiny-model tokens/s.

Run from vLLM's venv (docs/integrations.md), with sparse_attn importable:

    python bench/vllm_bench.py kernel --lengths 32768 131072 --rounds 3
    python bench/vllm_bench.py kernel --lengths 131072 --threads 1 --clock thread   # a loaded machine
    python bench/vllm_bench.py forward --lengths 1024 4096 16384     # one layer's decode forward, glue included
    python bench/vllm_bench.py chunk --lengths 4096 32768 --threads 1 --clock thread
    python bench/vllm_bench.py e2e --lengths 32768 --rounds 2 --new-tokens 32

`kernel`: one decode step over a paged KV cache in vLLM's CPU layout (the tensor both backends
read, `(pages, Hkv, page_size, 2 * D)`), vLLM's `cpu_attention_with_kv_cache` vs sparse_attn's
split-KV decode over the same pages (`PagesCache` -> `attention_with_cache`), Dense and TopK; K+V
bytes read per second, and a same-run `copy_` of K+V as the machine's bandwidth at that moment.
Each timed call comes after reading a buffer twice the last-level cache's size (bench/llc.py: a
480 MiB L3 holds most of a 128K bf16 cache, which a model's decode step never finds there); `--warm`
times the calls back to back instead.
`ours_dense` is Dense as the plugin runs a decode step (the plan's lighter re-run, `prepared`,
writing the output rows in place); `ours_dense_plan` the full `CachePlan.run` (Python validation
and a view per call). Our cache is moved into 2 MB pages first, where the plugin's cache is once
its background move has finished (backend.py `huge_pages_once`); vLLM's stays in the 4 KB pages `torch.zeros` gave it, as in
vLLM's engine (`--vllm-huge-pages`: both in 2 MB pages, the kernels alone on equal memory;
`--no-huge-pages`: both in 4 KB pages). `huge_MiB_*` reports what Linux holds in huge pages.
`ours_topk_gathered` is TopK as the plugin ran it before its selection read the page sums through
the block table: the sums gathered per step into `(B, Hkv, W, D)` first.
Runs alternate (A, B, A, B ...) so load from other jobs falls on both; medians are printed.

`forward`: one layer's decode `forward` with its glue (the plugin's impl vs the body of vLLM's),
one thread, CPU time, the GC heap frozen as vLLM's engine does; and our kernel's binding alone.
`--layers 1 12` (default): one cache called over and over (it stays in the last-level cache), and
12 caches called in turn as a model's layers are (each read from DRAM once the 12 exceed it).

`chunk`: one prefill chunk (4096 queries, vLLM's CPU token budget per step, float32 tiny-model
shape) ending at n keys: vLLM's kernel vs the plugin's path (gather from the pages, `attention`).

`e2e`: the tiny random Llama (tests/vllm_serving/tiny_model.py) served by `LLM(...)` in a fresh process per
run, vLLM's own backend and sparse_attn (dense, topk), alternating; prefill seconds (time to the
first token) and decode tokens/s (tokens after the first / their seconds). Prints `uptime`.
By default it times each engine's first request (the plugin's cache still on its way into 2 MB
pages, in the background); `--settle` times a later one (a short request first, then the plugin
waits for that move).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    return os.popen("uptime").read().strip().split("load average:")[-1].strip()


# ------------------------------------------------------------------------------------------ kernel
def vllm_isa(dtype, page: int, head_dim: int) -> str:
    """The kernel family vLLM's CPU backend picks for these caches on this machine (its own
    `_get_attn_isa`): "amx" for bf16 on a CPU with AMX tiles and pages of a multiple of 32,
    "vec" / "vec16" / "neon" otherwise. The baseline must be what vLLM would run here. Linux lets a
    process use AMX tiles only after asking for them (`arch_prctl`): in an engine the model's bf16
    matmuls (oneDNN) have asked by the time attention runs; here `torch.cpu._init_amx()` asks,
    else vLLM's AMX kernel dies on an illegal instruction."""
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    isa = _get_attn_isa(dtype, page, head_dim)
    if isa == "amx" and not torch.cpu._init_amx():
        raise RuntimeError("vLLM picks its AMX kernel here, but the kernel refused this process AMX tiles")
    return isa


def _vllm_call(ops, q, kp, vp, out, qsl, lens, table, scale, args, dtype):
    """vLLM's own CPU attention over its pages (written by `_kernel_case` with the same ISA), as a
    no-argument call (its scheduler metadata made once): the baseline of `kernel` and `chunk`."""
    isa = vllm_isa(dtype, args.page, args.d)
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=qsl.numel() - 1, num_heads=args.hq, num_kv_heads=args.hkv,
                                               head_dim=args.d, seq_lens=lens, dtype=dtype, query_start_loc=qsl,
                                               causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True)

    def call():
        ops.cpu_attention_with_kv_cache(query=q, key_cache=kp, value_cache=vp, output=out, query_start_loc=qsl,
                                        seq_lens=lens, scale=scale, causal=True, alibi_slopes=None,
                                        sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=meta,
                                        s_aux=None)
    return call


def _kernel_case(n: int, *, hq: int, hkv: int, d: int, page: int, dtype, batch: int = 1):
    """Two caches holding the same tokens, each written by its backend's own writer (vLLM's CPU
    writer may pack rows its own way): `(kv_vllm, kv_ours, page_sums, block_table, q, seq_lens)`."""
    import torch
    from vllm import _custom_ops as ops

    from sparse_attn.integrations.vllm.pages import split_pages, write_pages
    pages = batch * -(-n // page) + 1
    table = (torch.randperm(pages - 1)[: batch * -(-n // page)].view(batch, -1) + 1).to(torch.int32)
    pos = torch.arange(n)
    slots = torch.cat([table[b, pos // page].long() * page + pos % page for b in range(batch)])
    k = torch.randn(batch * n, hkv, d).to(dtype)
    v = torch.randn(batch * n, hkv, d).to(dtype)
    kv_vllm = torch.zeros(pages, hkv, page, 2 * d, dtype=dtype)
    kvp, vvp = split_pages(kv_vllm, columns=False)
    ops.cpu_attn_reshape_and_cache(k, v, kvp, vvp, slots, vllm_isa(dtype, page, d))
    kv_ours = torch.zeros_like(kv_vllm)
    sums = torch.zeros(pages, hkv, d)
    write_pages(kv_ours, k, v, slots, sums)
    q = torch.randn(batch, hq, d).to(dtype)
    lens = torch.full((batch,), n, dtype=torch.int32)
    return kv_vllm, kv_ours, sums, table, q, lens


def _time(fn, reps: int, clock=time.perf_counter, evictor=None) -> float:
    fn()  # warm
    best = []
    for _ in range(reps):
        if evictor is not None:
            evictor.evict()
        t = clock()
        fn()
        best.append(clock() - t)
    return statistics.median(best)


def _gathered_sums_cache():
    import dataclasses

    from sparse_attn.integrations.vllm.pages import PagesCache

    class GatheredSums(PagesCache):
        """The view the plugin gave before: page sums copied per step to `(B, Hkv, W + 1, D)`."""

        def kv_view(self):
            view = super().kv_view()
            sums = self.page_sums[self.block_table.long()].permute(0, 2, 1, 3)
            return dataclasses.replace(view, block_sums=sums, sums_by_page=False)

    return GatheredSums


def kernel_bench(args):
    import torch
    from vllm import _custom_ops as ops

    import sparse_attn as sa
    from sparse_attn.cache import huge_pages
    from sparse_attn.integrations.vllm.pages import PagesCache, split_pages

    gathered_sums_cache = _gathered_sums_cache()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError("--clock thread counts the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    sys.path.insert(0, ROOT)
    from bench.llc import Evictor
    evictor = None if args.warm else Evictor()
    rows = []
    for n in args.lengths:
        kv_vllm, kv, sums, table, q, lens = _kernel_case(n, hq=args.hq, hkv=args.hkv, d=args.d, page=args.page,
                                                         dtype=dtype)
        kp, vp = split_pages(kv_vllm, columns=False)
        qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        out = torch.empty_like(q)
        scale = args.d ** -0.5
        vllm_own = _vllm_call(ops, q, kp, vp, out, qsl, lens, table, scale, args, dtype)

        # the plugin moves its cache storage into 2 MB pages in the background from its first write
        # (backend.py `huge_pages_once`): timed here as it is once that has finished; vLLM's own backend keeps the 4 KB pages of its torch.zeros unless
        # --vllm-huge-pages (the same memory for both kernels); --no-huge-pages: ours as vLLM allocated it
        if not args.no_huge_pages:
            huge_pages.collapse(kv)
        if args.vllm_huge_pages:
            huge_pages.collapse(kv_vllm)
        cache = PagesCache(kv, table, lens, lens.tolist(), page_sums=sums)
        gathered = gathered_sums_cache(kv, table, lens, lens.tolist(), page_sums=sums)
        q4 = q[:, :, None]
        dense, topk = sa.Dense(), sa.TopK(topk=args.topk, block_size=args.page)

        plans = {p: sa.plan_with_cache(q4, cache, p, scale=scale) for p in (dense, topk)}  # as the backend does

        # Dense decode as the plugin runs it from a batch size's second step on (backend.py `_decode`):
        # the plan's lighter re-run with vLLM's query rows, writing the output rows in place
        fast = plans[dense].prepared(cache)
        out_ours = torch.empty_like(q)

        def ours_dense():
            fast.run(q, lens, table, out_ours)

        def ours_dense_plan():  # the full `CachePlan.run` (its Python validation and view each call)
            plans[dense].run(q4, cache)

        def ours_topk():
            plans[topk].run(q4, cache)

        def ours_topk_gathered():
            plans[topk].run(q4, gathered)

        kv_bytes = 2 * n * args.hkv * args.d * q.shape[0] * kv.element_size()
        dst = torch.empty_like(kv)

        def copy():
            dst.copy_(kv)

        # same inputs both ways: vLLM's output must match ours (a wrong kernel is not a fast one)
        vllm_own()
        ref = sa.attention_with_cache(q4, cache, dense, scale=scale)[:, :, 0]
        ours_dense()
        assert torch.equal(out_ours, ref)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert torch.equal(plans[topk].run(q4, cache), plans[topk].run(q4, gathered))
        order = [("copy", copy), ("vllm", vllm_own), ("ours_dense", ours_dense), ("ours_dense_plan", ours_dense_plan),
                 ("ours_topk", ours_topk), ("ours_topk_gathered", ours_topk_gathered)]
        times = {k: [] for k, _ in order}
        for r in range(args.rounds):  # the order flips every round: neither side always runs after the other
            for k, fn in (order if r % 2 == 0 else order[::-1]):
                times[k].append(_time(fn, args.reps, clock, evictor))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"n": n, "dtype": args.dtype, "threads": torch.get_num_threads(), "clock": args.clock, "load": _load(),
               "evict_mb": None if evictor is None else evictor.mbytes, "vllm_isa": vllm_isa(dtype, args.page, args.d),
               "rel_err_vs_vllm": err,
               "huge_MiB_ours": (huge_pages.huge_bytes(kv) or 0) >> 20,
               "huge_MiB_vllm": (huge_pages.huge_bytes(kv_vllm) or 0) >> 20,
               **{f"{k}_ms": 1e3 * t for k, t in med.items()},
               **{f"{k}_GBps": kv_bytes / t / 1e9 for k, t in med.items() if k in ("copy", "vllm", "ours_dense")},
               "dense_speedup": med["vllm"] / med["ours_dense"], "topk_speedup": med["vllm"] / med["ours_topk"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------------------- forward
def forward_bench(args):
    """One layer's decode `forward` as the engine calls it, glue included: the plugin's
    `SparseAttnImpl.forward` (metadata -> `PagesCache` -> plan -> kernel -> output) vs vLLM's
    `CPUAttentionBackendImpl.forward` body (a view and a chunk of the cache, then its op with the
    scheduler metadata made once), and our kernel's binding alone (`decode_fwd`). Short contexts,
    where the per-call costs show. The GC heap is frozen first, as vLLM's engine core does after
    its start (`freeze_gc_heap`): else collections over vLLM's millions of objects land on whoever
    allocates. Per call: the best of `--rounds` batches of `--reps` calls, alternating.
    `--layers L`: L caches (each its own pages, table, query and impl) called in turn, as a
    model's L layers are within a step: with L = 1 the one cache stays in the last-level cache
    between calls (a one-layer model), with L x the cache bytes beyond it each call reads its
    rows from DRAM, as in a real model (whose weights pass through that cache too)."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(1)
    for n in args.lengths:
        for layers in args.layers:
            _forward_row(args, n, layers, dtype)


def _forward_row(args, n: int, layers: int, dtype):
    """One `forward` row: `layers` caches of n keys each (their own pages, tables and queries),
    called in turn as a model's layers are; per call times."""
    import gc

    import torch
    from vllm import _custom_ops as ops

    from sparse_attn.backends.cpu.decode import _ext
    from sparse_attn.integrations.vllm.backend import SparseAttnImpl, SparseAttnMetadata
    from sparse_attn.integrations.vllm.pages import PagesCache, split_pages

    scale = args.d ** -0.5
    vllm_calls, ours_calls, kernel_calls, errs = [], [], [], []
    for _ in range(layers):
        impl = SparseAttnImpl(args.hq, args.d, scale, args.hkv)  # one per layer, as vLLM makes them
        kv_vllm, kv, _, table, q, lens = _kernel_case(n, hq=args.hq, hkv=args.hkv, d=args.d, page=args.page,
                                                      dtype=dtype)
        kp, vp = split_pages(kv_vllm, columns=False)
        qsl = torch.arange(2, dtype=torch.int32)
        out = torch.empty_like(q)
        vllm_op = _vllm_call(ops, q, kp, vp, out, qsl, lens, table, scale, args, dtype)

        def vllm_forward(kv_vllm=kv_vllm, vllm_op=vllm_op):
            pages, heads, page, _ = kv_vllm.size()
            kv_vllm.view((pages, heads, page * 2, -1)).chunk(2, dim=2)
            vllm_op()

        meta = SparseAttnMetadata(num_actual_tokens=1, query_start_loc=[0, 1], seq_lens=lens,
                                  seq_lens_host=lens.tolist(), block_table=table,
                                  slot_mapping=torch.zeros(1, dtype=torch.long), decode_idx=[0], prefill_idx=[])
        output = torch.empty_like(q)
        new_kv = q[:, :args.hkv]  # the step's K/V as vLLM hands them (already in the pages)

        def ours_forward(impl=impl, q=q, new_kv=new_kv, kv=kv, meta=meta, output=output):
            impl.forward(None, q, new_kv, new_kv, kv, meta, output)

        view = PagesCache(kv, table, lens, [n]).kv_view()
        dargs = _ext().DecodeArgs()
        dargs.q, dargs.k, dargs.v, dargs.scale = q[:, :, None], view.k, view.v, scale
        dargs.lengths, dargs.page_table, dargs.page_size = view.lengths, view.page_table, view.page_size

        def kernel_alone(dargs=dargs):
            _ext().decode_fwd(dargs)

        vllm_forward()
        ours_forward()
        errs.append(((output.float() - out.float()).norm() / out.float().norm()).item())
        vllm_calls.append(vllm_forward)
        ours_calls.append(ours_forward)
        kernel_calls.append(kernel_alone)

    def each(calls):
        def run():
            for c in calls:
                c()
        return run

    gc.collect()
    gc.freeze()
    fns = [("vllm_forward", each(vllm_calls)), ("ours_forward", each(ours_calls)),
           ("kernel_alone", each(kernel_calls))]
    best = {k: float("inf") for k, _ in fns}
    passes = max(1, args.reps // layers)  # about --reps calls a batch, whatever the layer count
    for r in range(args.rounds):
        for k, fn in (fns if r % 2 == 0 else fns[::-1]):
            t = time.thread_time()
            for _ in range(passes):
                fn()
            best[k] = min(best[k], (time.thread_time() - t) / (passes * layers))
    gc.unfreeze()
    row = {"n": n, "layers": layers, "dtype": args.dtype, "hq": args.hq, "hkv": args.hkv, "d": args.d,
           "load": _load(), "vllm_isa": vllm_isa(dtype, args.page, args.d), "rel_err_vs_vllm": max(errs), **{f"{k}_us": round(1e6 * t, 1) for k, t in best.items()},
           "speedup": best["vllm_forward"] / best["ours_forward"]}
    print(json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------- chunk
def chunk_bench(args):
    """One prefill chunk of `--chunk` queries ending at `n` keys, over one sequence's pages: vLLM's
    `cpu_attention_with_kv_cache` vs the plugin's path (keys from the pages with `gather_keys` into
    buffers reused from chunk to chunk, then `prefill.run_prefill`: `sparse_attn.attention` through
    a plan kept per shape, as every layer of a step shares it, and the result copied into vLLM's
    output rows; the gather timed alone too). n == chunk is a first chunk: the plugin
    then reads the new K/V directly."""
    import torch
    from vllm import _custom_ops as ops

    import sparse_attn as sa
    from sparse_attn.integrations.vllm.pages import Scratch, gather_keys, split_pages
    from sparse_attn.integrations.vllm.prefill import run_prefill

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    scratch = Scratch()  # as the plugin gathers: into buffers reused from chunk to chunk
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError("--clock thread counts the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    for n in args.lengths:
        c = min(args.chunk, n)
        kv_vllm, kv, sums, table, _, lens = _kernel_case(n, hq=args.hq, hkv=args.hkv, d=args.d, page=args.page,
                                                         dtype=dtype)
        kp, vp = split_pages(kv_vllm, columns=False)
        ok, ov = split_pages(kv)
        q = torch.randn(c, args.hq, args.d).to(dtype)
        qsl = torch.tensor([0, c], dtype=torch.int32)
        out = torch.empty_like(q)
        scale = args.d ** -0.5
        vllm_own = _vllm_call(ops, q, kp, vp, out, qsl, lens, table, scale, args, dtype)

        q4 = q.transpose(0, 1)[None]
        # as vLLM hands a first chunk's K/V: the new rows only, (T, Hkv, D)
        new_k = gather_keys(ok, table[0], n - c, n)[0].transpose(0, 1).contiguous()
        new_v = gather_keys(ov, table[0], n - c, n)[0].transpose(0, 1).contiguous()

        def gather():
            return gather_keys(ok, table[0], 0, n, scratch, 0), gather_keys(ov, table[0], 0, n, scratch, 1)

        rows = torch.empty_like(q)

        def ours(pattern):  # the plugin's call: its plan kept per shape, the result into vLLM's rows
            def run():
                k, v = (new_k, new_v) if n == c else gather()
                run_prefill(q, k, v, pattern, {"scale": scale}, rows)
            return run

        vllm_own()
        ref = sa.attention(q4, *gather(), sa.Dense(), scale=scale)[0].transpose(0, 1)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        fns = [("vllm", vllm_own), ("ours_dense", ours(sa.Dense())),
               ("ours_topk", ours(sa.TopK(topk=args.topk, block_size=args.page)))]
        if n > c:
            fns.append(("gather_kv", gather))
        times = {k: [] for k, _ in fns}
        for r in range(args.rounds):
            for k, fn in (fns if r % 2 == 0 else fns[::-1]):
                times[k].append(_time(fn, args.reps, clock))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"n": n, "chunk": c, "dtype": args.dtype, "threads": torch.get_num_threads(), "clock": args.clock,
               "load": _load(), "vllm_isa": vllm_isa(dtype, args.page, args.d), "rel_err_vs_vllm": err, **{f"{k}_ms": 1e3 * t for k, t in med.items()},
               "dense_speedup": med["vllm"] / med["ours_dense"], "topk_speedup": med["vllm"] / med["ours_topk"]}
        print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------------- e2e
#: the first, short request of `--settle` (the engine's context must hold it too, for short prompts)
SETTLE_TOKENS = 256


def _one_run(model, pattern, n, new_tokens, max_len, settle=False, dtype="float32"):
    code = f"""
import json, os, sys, time
sys.path.insert(0, {os.path.join(ROOT, 'tests', 'vllm_serving')!r})
from generate import prompts
def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model={model!r}, max_model_len={max_len}, enforce_eager=True, dtype={dtype!r}, seed=0,
              gpu_memory_utilization=0.3, enable_prefix_caching=False, disable_log_stats=False)
    p = [TokensPrompt(prompt_token_ids=prompts({n}, 1)[0])]
    settled = None
    if {settle!r}:  # a first short request, then (plugin) wait for the background huge-page move
        llm.generate([TokensPrompt(prompt_token_ids=prompts({SETTLE_TOKENS}, 1, seed=1)[0])],
                     SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        if os.environ.get("SPARSE_ATTN_VLLM_PATTERN"):
            from sparse_attn.integrations.vllm.backend import HUGE_JOBS
            t = time.perf_counter()
            for j in HUGE_JOBS:
                j.wait(600)
            settled = time.perf_counter() - t
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens={new_tokens + 1}, ignore_eos=True),
                     use_tqdm=False)[0]
    m = o.metrics  # engine-core timestamps: scheduled -> first token (prefill), first -> last (decode)
    stats = None
    if os.environ.get("SPARSE_ATTN_VLLM_PATTERN"):  # the plugin's own seconds (attention, all layers)
        from sparse_attn.integrations.vllm.backend import HUGE_JOBS, STATS
        stats = dict(STATS)
        stats["huge_MiB"] = [sum(j.progress()[i] for j in HUGE_JOBS) >> 20 for i in (0, 1)]  # at the last token
        stats["settled_s"] = settled
    print(json.dumps({{"prefill_s": m.first_token_ts - m.scheduled_ts,
                      "decode_tok_s": (m.num_generation_tokens - 1) / (m.last_token_ts - m.first_token_ts),
                      "decode_s": m.last_token_ts - m.first_token_ts,
                      "tokens": list(o.outputs[0].token_ids), "stats": stats}}))
if __name__ == "__main__":
    main()
"""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.pop("SPARSE_ATTN_VLLM_PATTERN", None)
    if pattern != "vllm":
        env["SPARSE_ATTN_VLLM_PATTERN"] = pattern
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"{pattern} at {n}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def e2e_bench(args):
    sys.path.insert(0, os.path.join(ROOT, "tests", "vllm_serving"))
    from tiny_model import make_tiny_llama
    model = args.model or make_tiny_llama(tempfile.mkdtemp(prefix="tiny_llama_"))
    rows = []
    for n in args.lengths:
        res = {p: [] for p in args.patterns}
        for _ in range(args.rounds):
            for p in args.patterns:
                max_len = max(n, SETTLE_TOKENS if args.settle else 0) + args.new_tokens + 64
                r = _one_run(model, p, n, args.new_tokens, max_len, args.settle, args.dtype)
                res[p].append(r)
                st = r.get("stats") or {}
                inside = (f", in the plugin: decode {st['decode_s']:.2f} s ({st['decode_calls']} calls, "
                          f"{st.get('decode_dense_covered', 0)} of them Dense while the pattern covers every "
                          f"key), prefill "
                          f"{st['prefill_s']:.2f} s ({st['prefill_direct']} direct, {st['prefill_gathered']} "
                          f"gathered), InfLLMv2 windows {st.get('windows_s', 0.0):.2f} s, 2 MB pages (background) "
                          f"at the last token: {st['huge_MiB'][0]} of {st['huge_MiB'][1]} MiB gone through"
                          + (f" (waited {st['settled_s']:.1f} s for it after the first request)"
                             if st.get("settled_s") is not None else "") if st else "")
                print(f"# run n={n} {p}: prefill {r['prefill_s']:.4f} s, decode {r['decode_tok_s']:.2f} tok/s "
                      f"({r['decode_s']:.2f} s){inside}, load {_load()}", flush=True)
        for p, runs in res.items():
            row = {"n": n, "backend": p, "dtype": args.dtype, "load": _load(),
                   "prefill_s": statistics.median(r["prefill_s"] for r in runs),
                   "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                   "runs": [[round(r["prefill_s"], 4), round(r["decode_tok_s"], 2)] for r in runs],
                   "same_tokens_as_vllm": runs[-1]["tokens"] == res.get("vllm", runs)[-1]["tokens"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _shape_args(p, *, hq: int, hkv: int, d: int, dtype: str):
    """The cache's shape and dtype, one mode's defaults."""
    p.add_argument("--hq", type=int, default=hq)
    p.add_argument("--hkv", type=int, default=hkv)
    p.add_argument("--d", type=int, default=d)
    p.add_argument("--page", type=int, default=64)
    p.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    _shape_args(k, hq=32, hkv=8, d=128, dtype="bfloat16")
    k.add_argument("--topk", type=int, default=16)
    k.add_argument("--rounds", type=int, default=3)
    k.add_argument("--reps", type=int, default=3)
    k.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    k.add_argument("--clock", default="wall", choices=["wall", "thread"],
                   help="thread: CPU time of the calling thread (with --threads 1: the whole kernel's time, "
                        "not the time slices other jobs take on a loaded machine)")
    k.add_argument("--no-huge-pages", action="store_true",
                   help="leave our cache in the 4 KB pages torch.zeros gave it (the plugin moves it to 2 MB pages)")
    k.add_argument("--vllm-huge-pages", action="store_true",
                   help="move vLLM's cache to 2 MB pages too: both kernels over the same kind of memory")
    k.add_argument("--warm", action="store_true",
                   help="time the calls back to back (default: each after emptying the last-level cache)")
    f = sub.add_parser("forward")
    f.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    _shape_args(f, hq=4, hkv=2, d=64, dtype="float32")
    f.add_argument("--rounds", type=int, default=8)
    f.add_argument("--reps", type=int, default=200)
    f.add_argument("--layers", type=int, nargs="+", default=[1, 12],
                   help="caches called in turn per pass, as a model's layers are (1: one cache, warm in L3)")
    ch = sub.add_parser("chunk")
    ch.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    ch.add_argument("--chunk", type=int, default=4096, help="queries of the chunk (vLLM's CPU default budget)")
    _shape_args(ch, hq=4, hkv=2, d=64, dtype="float32")
    ch.add_argument("--topk", type=int, default=16)
    ch.add_argument("--rounds", type=int, default=2)
    ch.add_argument("--reps", type=int, default=1)
    ch.add_argument("--threads", type=int, default=0)
    ch.add_argument("--clock", default="wall", choices=["wall", "thread"])
    e = sub.add_parser("e2e")
    e.add_argument("--model", default=None)
    e.add_argument("--lengths", type=int, nargs="+", default=[32768])
    e.add_argument("--patterns", nargs="+", default=["vllm", "dense", "topk:16"])
    e.add_argument("--new-tokens", type=int, default=32)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's dtype in both engines (bfloat16: vLLM runs its AMX kernels where it has them)")
    e.add_argument("--rounds", type=int, default=2)
    e.add_argument("--settle", action="store_true",
                   help="time a server's later request: each engine first serves a short request and the plugin "
                        "then waits until its KV cache is in 2 MB pages (the background move, backend.py "
                        "`huge_pages_once`); default: the engine's first request")
    a = ap.parse_args()
    print(f"# {a.what}: load average {_load()}", flush=True)
    import torch

    # in inference mode, as vLLM's worker runs a model step (the plugin's prepared prefill path is
    # for calls without grad; before 2026-12-06 the chunk bench ran with grad on and timed `run`)
    with torch.inference_mode():
        {"kernel": kernel_bench, "forward": forward_bench, "chunk": chunk_bench, "e2e": e2e_bench}[a.what](a)


if __name__ == "__main__":
    main()
