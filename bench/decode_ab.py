"""The CPU decode kernel of two builds, in one process: another git revision's "cpu_decode" extension
against the working tree's, on the same cache (bench/build_ab.py: the VM's speed drifts between
processes, so the two builds are timed call by call).

    python bench/decode_ab.py                                   # HEAD vs the tree, float32, 128K keys
    python bench/decode_ab.py --rev HEAD~1 --layouts vllm --page-size 16 --dtype bfloat16
    python bench/decode_ab.py --context 32768 --threads 1 --hq 32 --hkv 8 --d 128

Dense causal decode of one query row per head (B 1) over `--context` random keys, in each of
`--layouts`: `contiguous` (K, V `(1, Hkv, n, D)`), `paged` (K and V in two pools of
`--page-size`-token pages, the page table a random order) and `vllm` (vLLM's CPU layout `(pages,
Hkv, page, 2 D)` seen as the plugin sees it, `integrations.vllm.pages.split_pages`: each (page, kv
head) block holds its page's K, then its V rows; a random page table; float32 K as columns, which a
revision before the kernel read them (csrc/cpu/decode_kcols.h) refuses). The pools are in 2 MB
pages where the system allows (`cache.huge_pages`), as the caches and the plugin's pools are. Each
round times `--reps` calls of one build then of the other, in alternating order, each call after
reading a buffer twice the last-level cache's size (bench/llc.py: K/V come from memory, as in a
model's decode step); the table gives the medians as K+V GB/s, their ratio (`tree / rev`: above 1
the tree is faster) and whether both gave the same bits (a change of where memory is asked for keeps
them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.build_ab import load_revision  # noqa: E402
from bench.llc import Evictor  # noqa: E402
from sparse_attn.backends.cpu.decode import _ext  # noqa: E402
from sparse_attn.cache import huge_pages  # noqa: E402
from sparse_attn.integrations.vllm.pages import split_pages  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
LAYOUTS = ("contiguous", "paged", "vllm")


def make_cache(layout: str, k: torch.Tensor, v: torch.Tensor, page_size: int, g: torch.Generator):
    """(k, v, lengths, page_table, page_size) of `layout` holding k / v `(1, Hkv, n, D)`."""
    _, hkv, n, d = k.shape
    if layout == "contiguous":
        kc = huge_pages.zeros(*k.shape, dtype=k.dtype, device="cpu")
        vc = huge_pages.zeros(*v.shape, dtype=v.dtype, device="cpu")
        kc.copy_(k)
        vc.copy_(v)
        return kc, vc, None, None, 0
    width = -(-n // page_size)
    order = torch.randperm(width, generator=g)
    pad = width * page_size - n
    kt = torch.nn.functional.pad(k[0], (0, 0, 0, pad)).view(hkv, width, page_size, d).transpose(0, 1)
    vt = torch.nn.functional.pad(v[0], (0, 0, 0, pad)).view(hkv, width, page_size, d).transpose(0, 1)
    table, lengths = order[None].to(torch.int32), torch.tensor([n], dtype=torch.int32)
    if layout == "paged":
        kp = huge_pages.zeros(width, hkv, page_size, d, dtype=k.dtype, device="cpu")
        vp = huge_pages.zeros(width, hkv, page_size, d, dtype=v.dtype, device="cpu")
    else:  # the plugin's own views of one pool: each (page, kv head) block its K rows, then its V rows
        kp, vp = split_pages(huge_pages.zeros(width, hkv, page_size, 2 * d, dtype=k.dtype, device="cpu"))
    kp[order], vp[order] = kt, vt
    return kp, vp, lengths, table, page_size


def decode_call(ext, q, cache):
    """One Dense causal decode through the extension's binding: `(out, lse)`."""
    k, v, lengths, table, page_size = cache
    a = ext.DecodeArgs()
    a.q, a.k, a.v, a.scale, a.softcap = q, k, v, q.shape[-1] ** -0.5, 0.0
    a.causal, a.window, a.sinks = True, -1, 0
    a.lengths, a.page_table, a.page_size = lengths, table, page_size
    a.k_scale = a.v_scale = None
    a.prefetch = -1
    return ext.decode_fwd(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="the git revision to compare the tree with (default HEAD)")
    ap.add_argument("--context", type=int, default=131072, help="keys in the cache (default 131072)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page (paged, vllm; default 64)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--hq", type=int, default=4)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="torch threads, each a row (default: as set)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="calls per round and build (default 3)")
    ap.add_argument("--evict-mb", type=int, default=None, help="the evicting buffer (default: twice the LLC)")
    args = ap.parse_args(argv)
    if args.context <= 0 or args.page_size <= 0:
        ap.error("--context and --page-size must be > 0")
    if args.hq <= 0 or args.hkv <= 0 or args.hq % args.hkv or args.d <= 0:
        ap.error("--hq and --hkv must be > 0 with --hq a multiple of --hkv, and --d > 0")
    if args.rounds <= 0 or args.reps <= 0:
        ap.error("--rounds and --reps must be > 0")
    if args.threads and any(t <= 0 for t in args.threads):
        ap.error("--threads must be > 0")
    builds = {"rev": load_revision(args.rev, "cpu_decode"), "tree": _ext()}
    dt = DTYPES[args.dtype]
    evictor = Evictor(args.evict_mb)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.hq, 1, args.d, generator=g).to(dt)
    k = torch.randn(1, args.hkv, args.context, args.d, generator=g).to(dt)
    v = torch.randn(1, args.hkv, args.context, args.d, generator=g).to(dt)
    kv_bytes = 2 * k.numel() * k.element_size()
    load = os.getloadavg()
    print(f"# decode, {args.rev} (rev) vs the working tree (tree): Dense causal, {args.dtype}, {args.context} keys, "
          f"Hq {args.hq}, Hkv {args.hkv}, D {args.d}, page {args.page_size}, {args.rounds} rounds x {args.reps} "
          f"calls, evict {evictor.mbytes} MiB, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    print("| layout | threads | rev GB/s | tree GB/s | tree / rev | same bits |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for layout in args.layouts:
            cache = make_cache(layout, k, v, args.page_size, g)
            for threads in args.threads or [torch.get_num_threads()]:
                torch.set_num_threads(threads)
                outs = {b: decode_call(m, q, cache)[0] for b, m in builds.items()}
                times = {b: [] for b in builds}
                for r in range(args.rounds):
                    for b in (("rev", "tree") if r % 2 == 0 else ("tree", "rev")):
                        for _ in range(args.reps):
                            evictor.evict()
                            t0 = time.perf_counter()
                            decode_call(builds[b], q, cache)
                            times[b].append(time.perf_counter() - t0)
                mr, mt = statistics.median(times["rev"]), statistics.median(times["tree"])
                same = "yes" if torch.equal(outs["rev"], outs["tree"]) else \
                    f"no (max diff {(outs['rev'].float() - outs['tree'].float()).abs().max().item():.1e})"
                print(f"| {layout} | {threads} | {kv_bytes / mr / 1e9:.1f} | {kv_bytes / mt / 1e9:.1f} | "
                      f"{mr / mt:.2f}x | {same} |", flush=True)
            del cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
