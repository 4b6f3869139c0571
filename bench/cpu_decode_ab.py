"""CPU decode with one kernel setting off and on, in one process: the stream prefetch
(csrc/cpu/stream_ahead.h) or the bf16 products' AMX tiles (csrc/cpu/decode_amx.h).

    python bench/cpu_decode_ab.py                         # the stream, 128K keys, bf16 / int8 / fp8
    python bench/cpu_decode_ab.py --context 16384 --kinds bf16 int8 --threads 1
    python bench/cpu_decode_ab.py --paged                 # a PagedKVCache, 64-token pages shuffled
    python bench/cpu_decode_ab.py --vllm-pages --kinds bf16   # vLLM's page layout (the plugin's cache)
    python bench/cpu_decode_ab.py --toggle amx --kinds bf16

Dense decode (B 1, Hq 32, Hkv 8, D 128, one bf16 query row per head) over the same random keys in
a bf16, int8 or fp8_e4m3 cache, through `attention_with_cache`. Each round times `--reps` calls
with the setting off and on (the stream: `set_stream_ahead(0)` / `--ahead` bytes; the tiles:
`set_amx(False / True)`), in alternating order (the VM's memory speed drifts: compare only the rows
of one run), each call after reading a buffer twice the last-level cache's size (bench/llc.py: the
rows come from memory, as in a model's decode step; `--warm` times the calls back to back
instead, which lets a cache that fits in L3 be read partly from there); the table gives the
medians, their ratio, and whether both gave the same bits (the
stream must: only where memory is touched changes; the bf16 tiles sum in another order: they need
not). `--no-amx` runs with the tiles off when toggling the stream. `--vllm-pages`: the bf16 rows in
vLLM's CPU layout instead (`(pages, Hkv, page, 2 D)`, a page's K rows then its V rows per kv head,
in pages of `--page-size` tokens in random order, read through the vLLM plugin's `PagesCache`), which
the kernel reads as runs with the stream on and as 128-key paced segments with it off.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparse_attn as sa  # noqa: E402
from bench.llc import Evictor  # noqa: E402
from sparse_attn.backends.cpu import decode as cpu_decode  # noqa: E402


def vllm_pages(k, v, page_size):
    """k / v `(1, Hkv, n, D)` written into vLLM's layout through a random block table: a `PagesCache`."""
    from sparse_attn.integrations.vllm.pages import PagesCache, write_pages
    _, hkv, n, d = k.shape
    width = -(-n // page_size)
    table = (torch.randperm(width, generator=torch.Generator().manual_seed(0)) + 1).to(torch.int32)[None]
    pool = torch.zeros(width + 1, hkv, page_size, 2 * d, dtype=k.dtype)
    pos = torch.arange(n)
    write_pages(pool, k[0].transpose(0, 1), v[0].transpose(0, 1), table[0, pos // page_size].long() * page_size +
                pos % page_size)
    return PagesCache(pool, table, torch.tensor([n], dtype=torch.int32), [n])


def make_cache(k, v, kind, paged, page_size=64, vllm=False):
    b, hkv, n, d = k.shape
    kv_dtype = None if kind == "bf16" else kind
    if vllm:
        return vllm_pages(k, v, page_size)
    if paged:
        c = sa.PagedKVCache(b, hkv, d, num_pages=b * -(-n // page_size) + 1, page_size=page_size, max_len=n,
                            dtype=k.dtype, kv_dtype=kv_dtype)
        random.Random(0).shuffle(c._free)  # pages in random order, as in a pool in use
    else:
        c = sa.KVCache(b, hkv, d, n, dtype=k.dtype, kv_dtype=kv_dtype)
    for s in range(0, n, 8192):
        c.append(k[:, :, s:s + 8192], v[:, :, s:s + 8192])
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--kinds", nargs="+", default=["bf16", "int8", "fp8_e4m3"], choices=["bf16", "int8", "fp8_e4m3"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--ahead", type=int, default=8192, help="bytes ahead when on (default 8192)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=None, help="calls per round and setting (default ~400K keys' worth)")
    ap.add_argument("--paged", action="store_true", help="a PagedKVCache (K and V in two pools)")
    ap.add_argument("--vllm-pages", action="store_true", help="vLLM's page layout (bf16 only)")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page (--paged, --vllm-pages)")
    ap.add_argument("--no-amx", action="store_true", help="the tiles off (with --toggle stream)")
    ap.add_argument("--toggle", choices=["stream", "amx"], default="stream")
    ap.add_argument("--warm", action="store_true",
                    help="time the calls back to back (default: each after emptying the last-level cache)")
    ap.add_argument("--evict-mb", type=int, default=None,
                    help="MiB read before each call (default: twice the last-level cache, bench/llc.py)")
    args = ap.parse_args(argv)
    if args.ahead <= 0:
        ap.error("--ahead must be > 0 (bytes)")
    if args.toggle == "amx" and args.no_amx:
        ap.error("--no-amx contradicts --toggle amx")
    if args.vllm_pages and args.paged:
        ap.error("--vllm-pages and --paged are two different caches: choose one")
    if args.vllm_pages and args.kinds != ["bf16"]:
        ap.error("--vllm-pages holds bf16 rows only: pass --kinds bf16")
    if args.page_size <= 0 or args.page_size % 16:
        ap.error("--page-size must be a positive multiple of 16")
    if args.evict_mb is not None and (args.evict_mb <= 0 or args.warm):
        ap.error("--evict-mb must be > 0 and cannot go with --warm")
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = cpu_decode._ext()
    before_ahead, before_amx = ext.stream_ahead(), ext.amx_enabled()
    ext.set_amx(not args.no_amx)
    if args.toggle == "amx" and not ext.amx_enabled():
        print("# no AMX tiles on this CPU / build (or Linux refused them): nothing to toggle")
        return 0

    def setting(on: bool):
        if args.toggle == "stream":
            ext.set_stream_ahead(args.ahead if on else 0)
        else:
            ext.set_amx(on)
    n, reps = args.context, args.reps or max(3, 400000 // args.context)
    evictor = None if args.warm else Evictor(args.evict_mb)
    torch.manual_seed(0)
    k = torch.randn(1, 8, n, 128, dtype=torch.bfloat16)
    v = torch.randn(1, 8, n, 128, dtype=torch.bfloat16)
    q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
    load = os.getloadavg()
    fixed = f"AMX {'on' if ext.amx_enabled() else 'off'}" if args.toggle == "stream" else \
        f"stream {ext.stream_ahead()} bytes"
    layout = (f"vLLM's pages ({args.page_size}, shuffled)" if args.vllm_pages else
              f"paged ({args.page_size}, shuffled)" if args.paged else "contiguous")
    print(f"# {args.toggle} off / on; context {n}, {layout}, "
          f"{torch.get_num_threads()} threads, {fixed}, {args.rounds} rounds x {reps} calls "
          f"({'back to back' if evictor is None else f'each after reading {evictor.mbytes} MiB'}), "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    print("| cache | off ms | on ms | speed-up (off / on) | same bits |")
    print("|---|---|---|---|---|")
    try:
        for kind in args.kinds:
            cache = make_cache(k, v, kind, args.paged, args.page_size, args.vllm_pages)
            call = lambda c=cache: sa.attention_with_cache(q, c, sa.Dense())  # noqa: E731
            times = {False: [], True: []}
            outs = {}
            for r in range(args.rounds):
                for on in ((False, True) if r % 2 == 0 else (True, False)):
                    setting(on)
                    outs[on] = call()
                    if evictor is None:
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            call()
                        spent = time.perf_counter() - t0
                    else:
                        spent = 0.0
                        for _ in range(reps):
                            evictor.evict()
                            t0 = time.perf_counter()
                            call()
                            spent += time.perf_counter() - t0
                    times[on].append(spent / reps * 1e3)
            off, on = statistics.median(times[False]), statistics.median(times[True])
            same = torch.equal(outs[False], outs[True])
            print(f"| {kind} | {off:.2f} | {on:.2f} | {off / on:.2f}x | {same} |", flush=True)
            del cache
    finally:
        ext.set_stream_ahead(before_ahead)
        ext.set_amx(before_amx)
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
