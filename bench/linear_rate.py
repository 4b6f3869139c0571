"""Rate of linear-attention prefill against a large GEMM measured in the same process.

    taskset -c 1 python bench/linear_rate.py --threads 1          # ~1 minute on one core

Forward only (no autograd), B=1, H heads, D = Dv, one sequence of S tokens, for the three decay
kinds (none, per-head `(H,)`, per-token `(B, H, S)`). Each repeat times every kernel once and then
an `n x n x n` float32 matmul, alternating, so a busy neighbour lowers both alike; the best time of
`--reps` is kept for each.

FLOPs are counted as the bench counts a linear-prefill row (bench/roofline.py, `work_of(case,
LINEAR)`): the recurrence's `4 S B H D Dv` (the `k v^T` update and the `q^T S` read per token), the
same for every kernel whatever extra work its algorithm does. `ratio` = kernel GFLOP/s / GEMM
GFLOP/s, i.e. the bench's `roof` column with this GEMM as the peak. `C64 GF/s` counts instead the
matrix products of `reference.linear_chunked` (`2 S B H (C (D + Dv) + 2 D Dv)`, C = 64: 1.5x the
above at D = 128), the count of the table in docs/linear_attention.md before 2026-11-23.

Every call allocates its output (64 MB at the defaults); its first touch (page faults) is part of
the time, ~35 ms of a ~160 ms call on the project's Zen 4 VM. PyTorch's THP_MEM_ALLOC_ENABLE=1
(transparent huge pages for large CPU allocations) cuts that to ~10 ms; the header says which.

Kernels timed: every registered linear-attention kernel that can serve the problem on this CPU
(`reference.linear_chunked`, and `cpu.linear_chunked` where its extension builds), plus
`linear_attention(...)` itself (the scheduler's choice, with its checks and dispatch).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _timed(fn, times: list) -> None:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--s", type=int, default=16384, help="sequence length (default 16384)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d", type=int, default=128, help="head dim D = Dv (default 128)")
    ap.add_argument("--reps", type=int, default=3, help="repeats; the best is kept (default 3)")
    ap.add_argument("--gemm", type=int, default=2048, help="size n of the n^3 float32 GEMM (default 2048)")
    ap.add_argument("--decays", default="none,per-head,per-token")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import sparse_attn as sa
    from sparse_attn.api.linear import plan_linear

    torch.manual_seed(0)
    b, h, s, d = 1, args.heads, args.s, args.d
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    decays = {
        "none": None,
        "per-head": -torch.rand(h) * 0.5 - 0.01,
        "per-token": torch.nn.functional.logsigmoid(torch.randn(b, h, s) + 4.0),
    }
    n = args.gemm
    ga, gb = torch.randn(n, n), torch.randn(n, n)
    gemm_flop = 2.0 * n ** 3
    flop = 4.0 * s * b * h * d * d
    alg_flop = 2.0 * s * b * h * (64 * 2 * d + 2 * d * d)

    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = "?"
    print(f"linear_attention prefill rate: B={b} H={h} S={s} D=Dv={d} float32, forward only; "
          f"torch {torch.__version__}, {args.threads} thread(s), cpus {affinity}")
    print(f"flop per call {flop / 1e9:.2f} G (bench's 4 S B H D Dv); GEMM {n}^3 = {gemm_flop / 1e9:.1f} G; "
          f"best of {args.reps}, kernels and GEMM alternating; "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print()
    print(f"{'decay':<10} {'kernel':<28} {'ms':>8} {'GF/s':>7} {'ratio':>6} {'C64 GF/s':>9}   GEMM GF/s")
    with torch.no_grad():
        for kind in args.decays.split(","):
            dec = decays[kind]
            plan = plan_linear(q, k, v, decay=dec)
            runs = {}
            for c in plan.candidates:
                if c.reasons or c.kernel.name == "reference.linear_recurrent":
                    continue
                runs[c.kernel.name] = (lambda kern: lambda: kern.run(q, k, v, plan.problem, decay=dec))(c.kernel)
            api = f"linear_attention -> {plan.kernel.name.split('.')[0]}"
            runs[api] = lambda: sa.linear_attention(q, k, v, decay=dec)
            for fn in runs.values():  # warm-up (first call builds extensions, touches pages)
                fn()
            times = {name: [] for name in runs}
            gemm_t = []
            for _ in range(args.reps):
                for name, fn in runs.items():
                    _timed(fn, times[name])
                _timed(lambda: torch.mm(ga, gb), gemm_t)
            gemm_rate = gemm_flop / min(gemm_t) / 1e9
            for name, ts in times.items():
                t = min(ts)
                rate = flop / t / 1e9
                print(f"{kind:<10} {name:<28} {1e3 * t:8.1f} {rate:7.1f} {rate / gemm_rate:6.3f} "
                      f"{alg_flop / t / 1e9:9.1f}   {gemm_rate:.1f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
