"""Quantized KV caches on the CPU: decode speed and error of int8 / fp8 against the bf16 cache.

    python bench/quant_decode.py                       # B=1 Hq=32 Hkv=8 D=128, 128K keys, ~2-4 min
    python bench/quant_decode.py --context 32768 --reps 9

One process, the same random bf16 K/V appended to a bf16, an int8 and an fp8_e4m3 cache (contiguous
for Dense, paged with 64-token pages in random order for TopK(16)), one bf16 query row per head:
- time: median over `--reps` rounds, each round calling every cache once in turn (a busy
  neighbour slows all alike), each call after reading a buffer twice the last-level cache's size
  (bench/llc.py: a 480 MiB L3 holds a whole 128K int8 cache, which a model's decode step never
  finds there); `x bf16` is the median of the per-round ratios bf16 time / this time;
- GB/s: K/V bytes the kernel reads (codes + row scales for a quantized cache; the visited keys
  for TopK) over the median time; `of copy` is that over the run's copy rate (a float32 copy_,
  read + write bytes, best of 10: bench/roofline.py);
- error (float64, over the Dense output): `rel err` = ||o - o_bf16|| / ||o_bf16|| with o_bf16 the
  bf16 cache's output from the same kernel on the same inputs; `mass diff` = the mean over query
  rows of the total variation 1/2 sum_j |p_j - p_bf16_j| between the attention weights over the
  dequantized keys and over the bf16 keys.
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
from bench.roofline import copy_bandwidth  # noqa: E402
from sparse_attn.cache.quant import dequantize  # noqa: E402

KINDS = (None, "int8", "fp8_e4m3")


def _name(kind):
    return kind or "bf16"


def make_caches(k, v, *, paged: bool, page_size: int = 64, seed: int = 0):
    b, hkv, n, d = k.shape
    out = {}
    for kind in KINDS:
        if paged:
            c = sa.PagedKVCache(b, hkv, d, num_pages=b * -(-n // page_size) + 1, page_size=page_size, max_len=n,
                                dtype=k.dtype, kv_dtype=kind)
            random.Random(seed).shuffle(c._free)  # pages in random order, as in a pool in use
        else:
            c = sa.KVCache(b, hkv, d, n, dtype=k.dtype, kv_dtype=kind)
        for s in range(0, n, 8192):  # prefill in chunks (the append's temporaries stay small)
            c.append(k[:, :, s:s + 8192], v[:, :, s:s + 8192])
        out[kind] = c
    return out


def time_rounds(calls: dict, reps: int, evictor: Evictor | None = None):
    """Median seconds per call and median of per-round ratios against the bf16 entry; each call
    after `evictor.evict()` where given."""
    times = {key: [] for key in calls}
    for _ in range(reps):
        for key, fn in calls.items():
            if evictor is not None:
                evictor.evict()
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    ratio = {key: statistics.median(a / b for a, b in zip(times[None], times[key])) for key in calls}
    return med, ratio


def kv_bytes(kind, b, hkv, keys, d):
    per = 2 * d if kind is None else d + 4  # codes + the float32 scale of the row
    return 2 * b * hkv * keys * per  # K and V


def errors(q, k, v, cache, out, out_bf16, scale):
    """(relative output error, mean attention-mass difference) against the bf16 cache."""
    rel = ((out.double() - out_bf16.double()).norm() / out_bf16.double().norm()).item()
    if cache.kv_dtype is None:
        return rel, 0.0
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    tv = []
    for h in range(hkv):  # per kv head: (G, n) weights, never all heads at once
        kq = dequantize(cache.k[:, h, :n], cache.k_scale[:, h, :n])  # (B, n, D) float32
        qh = q[:, h * g:(h + 1) * g, 0].float()  # (B, G, D)
        p_q = torch.softmax(qh @ kq.transpose(-1, -2) * scale, -1)
        p_b = torch.softmax(qh @ k[:, h].float().transpose(-1, -2) * scale, -1)
        tv.append(0.5 * (p_q.double() - p_b.double()).abs().sum(-1).mean().item())
    return rel, sum(tv) / len(tv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--evict-mb", type=int, default=None,
                    help="MiB read before each timed call (default: twice the last-level cache, bench/llc.py)")
    args = ap.parse_args(argv)
    if args.evict_mb is not None and args.evict_mb <= 0:
        ap.error("--evict-mb must be > 0")
    evictor = Evictor(args.evict_mb)
    b, hq, hkv, d, n = args.batch, 32, 8, 128, args.context
    torch.manual_seed(0)
    k = torch.randn(b, hkv, n, d, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, n, d, dtype=torch.bfloat16)
    q = torch.randn(b, hq, 1, d, dtype=torch.bfloat16)
    scale = d ** -0.5
    load = os.getloadavg()
    copy = copy_bandwidth(torch.device("cpu"), 256, 1.0)
    print(f"# B={b} Hq={hq} Hkv={hkv} D={d} context={n} bf16 queries, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, copy {copy:.1f} GB/s, each call after "
          f"reading {evictor.mbytes} MiB")
    print("| pattern | cache | kernel | ms | x bf16 | GB/s | of copy | rel err | mass diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense = make_caches(k, v, paged=False)
    pat = sa.Dense()
    calls = {kind: (lambda c=c: sa.attention_with_cache(q, c, pat)) for kind, c in dense.items()}
    for fn in calls.values():
        fn()  # build / warm
    med, ratio = time_rounds(calls, args.reps, evictor)
    outs = {kind: fn() for kind, fn in calls.items()}
    for kind, c in dense.items():
        gbs = kv_bytes(kind, b, hkv, n, d) / med[kind] / 1e9
        rel, mass = errors(q, k, v, c, outs[kind], outs[None], scale)
        kern = sa.plan_with_cache(q, c, pat).kernel.name
        print(f"| Dense | {_name(kind)} contiguous | {kern} | {med[kind] * 1e3:.2f} | {ratio[kind]:.2f} | "
              f"{gbs:.1f} | {gbs / copy:.0%} | {rel:.2e} | {mass:.2e} |")
    del dense, calls, outs
    paged = make_caches(k, v, paged=True)
    pat = sa.TopK(args.topk, block_size=64)
    calls = {kind: (lambda c=c: sa.attention_with_cache(q, c, pat)) for kind, c in paged.items()}
    for fn in calls.values():
        fn()
    med, ratio = time_rounds(calls, args.reps, evictor)
    keys = min(n, (args.topk + pat.sink_blocks + pat.local_blocks) * 64)
    for kind, c in paged.items():
        gbs = kv_bytes(kind, b, hkv, keys, d) / med[kind] / 1e9
        kern = sa.plan_with_cache(q, c, pat).kernel.name
        print(f"| TopK({args.topk}) | {_name(kind)} paged | {kern} | {med[kind] * 1e3:.2f} | {ratio[kind]:.2f} | "
              f"{gbs:.1f} | {gbs / copy:.0%} | | |")
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
