"""The CPU decode kernel's K/V read rate against a copy and a sum timed right beside it, grouped by the
memory phase the machine is in (docs/kernel_guide.md section 8).

On the 2-core Zen 4 VM the memory runs in a slow phase (a 512 MB torch.sum reads ~35 GB/s on 2
threads) and a fast one (55-59 GB/s), for minutes at a time, so a copy rate measured once (as the
bench does) can come from another phase than the decode calls it is compared with. This times
decode, sum and copy in turn, N times, and reports the medians and the decode / copy ratio per
phase. Not part of the bench suite or the tests.

    python bench/cpu_probes/decode_phases.py [--iters 2500] [--threads 2] [--keys 131072]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparse_attn as sa
from sparse_attn.backends.cpu.decode import decode_forward

FAST_SUM_GBPS = 42.0  # sums above this count as the fast phase (the 2-thread VM; pass --split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keys", type=int, default=131072)
    ap.add_argument("--split", type=float, default=FAST_SUM_GBPS, help="sum GB/s that separates the phases")
    a = ap.parse_args()
    if a.iters < 1 or a.threads < 1 or a.keys < 1:
        raise ValueError("--iters, --threads and --keys must be positive")
    torch.set_num_threads(a.threads)
    hkv, g, d = 8, 4, 128
    q = torch.randn(1, hkv * g, 1, d, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, a.keys, d, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, a.keys, d, dtype=torch.bfloat16)
    x = torch.randn(128 * 1024 * 1024)  # 512 MB
    dst = torch.empty_like(x)
    calls = {"decode": (lambda: decode_forward(q, k, v, sa.Dense(), scale=d ** -0.5), 2 * k.numel() * 2),
             "sum": (x.sum, x.numel() * 4),
             "copy": (lambda: dst.copy_(x), 2 * x.numel() * 4)}
    for f, _ in calls.values():  # warm up (and build the extension)
        f()
    rows = []
    for i in range(a.iters):
        r = {}
        for name, (f, nbytes) in calls.items():
            t0 = time.perf_counter()
            f()
            r[name] = nbytes / (time.perf_counter() - t0) / 1e9
        rows.append(r)
        if (i + 1) % 100 == 0:
            print(f"[{i + 1}/{a.iters}] decode {r['decode']:.1f} sum {r['sum']:.1f} copy {r['copy']:.1f} GB/s", flush=True)
    for label, keep in (("slow", lambda r: r["sum"] < a.split), ("fast", lambda r: r["sum"] >= a.split)):
        sel = [r for r in rows if keep(r)]
        if not sel:
            print(f"{label} phase (sum {'<' if label == 'slow' else '>='} {a.split} GB/s): no iterations")
            continue
        med = {n: statistics.median(r[n] for r in sel) for n in calls}
        ratio = sorted(r["decode"] / r["copy"] for r in sel)
        print(f"{label} phase: {len(sel)} iterations; GB/s medians: decode {med['decode']:.1f} sum {med['sum']:.1f} "
              f"copy {med['copy']:.1f} (read + write); decode / copy median {statistics.median(ratio):.2f}, "
              f"10th percentile {ratio[len(ratio) // 10]:.2f}")


if __name__ == "__main__":
    main()
