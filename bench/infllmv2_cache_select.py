"""InfLLMv2's selection of one decode step over a cache's window sums: the C++ kernel
(csrc/cpu/infllmv2_decode.cpp, what `cpu.decode` runs) vs the PyTorch scoring
(layout/infllmv2_selection.infllmv2_picks_over_cache), at MiniCPM4-8B's shape (B=1, Hq=32, Hkv=2,
D=128, bf16, `InfLLMv2()` defaults), and the whole `attention_with_cache` step.

    python -m bench.infllmv2_cache_select --lengths 32768 131072 [--repeat 9] [--rows 1] [--threads N]

A `PagedKVCache` (page 64) of random keys per length; the window sums made before timing. The
variants alternate within each repetition; per variant the median wall time and the median CPU
time of the process (all threads: less sensitive to the other jobs on a shared machine; with
`--threads 1` it is the work itself). Prints a markdown table with the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import sparse_attn as sa
from sparse_attn.backends.cpu.infllmv2 import infllmv2_picks_over_cache_cpu
from sparse_attn.layout.infllmv2_selection import infllmv2_picks_over_cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--rows", type=int, default=1, help="query rows per step (Sq)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    b, hq, hkv, d, dt = 1, 32, 2, 128, torch.bfloat16
    pat = sa.InfLLMv2()
    table = []
    for s in a.lengths:
        cache = sa.PagedKVCache(b, hkv, d, num_pages=-(-s // 64) + 1, page_size=64, max_len=s + 64, dtype=dt)
        for c0 in range(0, s, 8192):
            n = min(8192, s - c0)
            cache.append(*(torch.randn(b, hkv, n, d).to(dt) for _ in range(2)))
        q = torch.randn(b, hq, a.rows, d).to(dt)
        p = pat.clamped(s)
        view = cache.kv_view()
        with torch.no_grad():
            ref = infllmv2_picks_over_cache(q, view, p)  # makes the window sums
            # random inputs have no margin check: float32 rounding may flip a near-tied block
            diff = (infllmv2_picks_over_cache_cpu(q, view, p) != ref).any(-1).sum().item()
            print(f"Sk={s}: C++ and PyTorch picks differ in {diff} of {ref.shape[1] * ref.shape[2]} rows", flush=True)
            variants = {"C++": lambda: infllmv2_picks_over_cache_cpu(q, view, p),
                        "PyTorch": lambda: infllmv2_picks_over_cache(q, view, p),
                        "step": lambda: sa.attention_with_cache(q, cache, pat, backend="cpu"),
                        "dense step": lambda: sa.attention_with_cache(q, cache, sa.Dense(), backend="cpu")}
            for f in variants.values():
                f()
            wall = {k: [] for k in variants}
            cpu = {k: [] for k in variants}
            for _ in range(a.repeat):
                for k, f in variants.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    f()
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
        med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in variants}
        print(s, {k: f"{w * 1e3:.2f} ms wall / {c * 1e3:.2f} ms cpu" for k, (w, c) in med.items()}, flush=True)
        table.append((s, med))
    print(f"load average {os.getloadavg()}, threads {torch.get_num_threads()}, Sq {a.rows}")
    print("| Sk | selection C++ ms (wall / cpu) | selection PyTorch ms (wall / cpu) | PyTorch / C++ (cpu) "
          "| InfLLMv2 step ms | Dense step ms |")
    print("|---|---|---|---|---|---|")
    for s, m in table:
        print(f"| {s} | {m['C++'][0] * 1e3:.2f} / {m['C++'][1] * 1e3:.2f} | {m['PyTorch'][0] * 1e3:.2f} / "
              f"{m['PyTorch'][1] * 1e3:.2f} | {m['PyTorch'][1] / m['C++'][1]:.1f}x | {m['step'][0] * 1e3:.2f} | "
              f"{m['dense step'][0] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
