"""`python -m bench.distributed`: context-parallel attention on one CPU host with gloo.

Runs `cp_attention` (forward, optionally forward + backward) over `--procs` processes of
`--threads` threads each, and the same attention in ONE process with `procs * threads` threads
(the scheduler's choice, and the reference chunked softmax that cp_attention's pieces use), and
prints per pattern: wall time (slowest rank), bytes this rank sent (K/V, gradients, statistics),
the transport the cost model chose, and the ratios. `TopK-local` draws inputs with locality (a few
key blocks every query prefers, as in real models); `TopK` draws them at random, where the union
of the blocks a rank's tokens select covers almost every block.
Run: `python -m bench.distributed --seq 65536 --heads 1 --kv-heads 1 --single auto` (docs/distributed.md).

Writes a JSON beside the printed table (`--out`). On a machine with one accelerator nothing
multi-device can be measured: this is a CPU-host measurement of the algorithm and its traffic.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _patterns(sa, names):
    table = {"dense": sa.Dense(), "window": sa.SlidingWindow(4096), "topk": sa.TopK(16),
             "topk-local": sa.TopK(16)}
    return {n: table[n] for n in names}


def _inputs(name, s, h, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, s, d, generator=g)
    k = torch.randn(1, hkv, s, d, generator=g)
    v = torch.randn(1, hkv, s, d, generator=g)
    if name == "topk-local":  # 16 hot key blocks of 64 tokens that every query prefers
        hot = torch.randn(d, generator=g) * 2
        for n in torch.randperm(s // 64, generator=g)[:16].tolist():
            k[:, :, n * 64:(n + 1) * 64] += hot
        q += hot
    return q, k, v


def _rank(rank, world, init, args, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import sparse_attn as sa
    from sparse_attn import distributed as cp

    res = {}
    for name, pat in _patterns(sa, args.patterns).items():
        q, k, v = _inputs(name, args.seq, args.heads, args.kv_heads, args.dim)
        loc = [cp.shard(x, layout=args.layout).requires_grad_(args.backward) for x in (q, k, v)]
        del q, k, v
        plan = cp.cp_plan(*loc, pat, layout=args.layout)
        dist.barrier()
        t0 = time.perf_counter()
        with cp.count_bytes() as c:
            out = cp.cp_attention(*loc, pat, layout=args.layout)
            if args.backward:
                out.sum().backward()
        dt = time.perf_counter() - t0
        dist.barrier()
        res[name] = {"seconds": dt, "sent": dict(c.sent), "transport": plan.transport,
                     "explain": plan.explain() if rank == 0 else ""}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _single(args):
    import sparse_attn as sa

    torch.set_num_threads(args.procs * args.threads)
    res = {}
    for name, pat in _patterns(sa, args.patterns).items():
        q, k, v = _inputs(name, args.seq, args.heads, args.kv_heads, args.dim)
        row = {}
        for backend in args.single:
            xs = [x.requires_grad_(args.backward) for x in (q, k, v)]
            be = None if backend == "auto" else backend
            kern = sa.plan(*xs, pat, backend=be).kernel.name
            t0 = time.perf_counter()
            out = sa.attention(*xs, pat, backend=be)
            if args.backward:
                out.sum().backward()
            row[backend] = {"seconds": time.perf_counter() - t0, "kernel": kern}
            for x in xs:
                x.grad = None
        res[name] = row
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--patterns", default="dense,window,topk,topk-local")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--single", default="auto,reference",
                   help="one-process baselines to time: 'auto' (the scheduler's choice), 'reference', or 'none'")
    p.add_argument("--skip-cp", action="store_true", help="only the one-process baselines")
    p.add_argument("--out", default="bench/results/distributed.json")
    args = p.parse_args(argv)
    args.patterns = args.patterns.split(",")
    args.single = [] if args.single == "none" else args.single.split(",")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load0 = os.getloadavg()
    ranks = []
    if not args.skip_cp:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank, args=(args.procs, f"tcp://127.0.0.1:{port}", args, tmp), nprocs=args.procs,
                               start_method="spawn")
            ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.procs)]
        load1 = os.getloadavg()
        print(f"# cp_attention {'forward+backward' if args.backward else 'forward'}, S={args.seq}, B=1, "
              f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}, float32, {args.layout}, {args.procs} processes x "
              f"{args.threads} thread(s), gloo; load average (1 min) before {load0[0]:.1f}, after {load1[0]:.1f}")
        print("| pattern | time (slowest rank) | per rank: sent total / K,V / stats | transport |")
        print("|---|---|---|---|")
        for name in args.patterns:
            t = max(r[name]["seconds"] for r in ranks)
            mib = lambda r, kinds=None: sum(v for k, v in r[name]["sent"].items() if kinds is None or k in kinds) / 2**20
            print(f"| {name} | {t:.2f} s | " + " ; ".join(
                f"{mib(r):.2f} / {mib(r, ('kv', 'grad')):.2f} / {mib(r, ('stats',)):.3f} MiB" for r in ranks)
                + f" | {ranks[0][name]['transport']} |")
        print()
        print(ranks[0][args.patterns[0]]["explain"])
        print(flush=True)
    single = _single(args) if args.single else {}
    if single:
        load2 = os.getloadavg()
        print(f"# one process, {args.procs * args.threads} threads, same inputs; load average after {load2[0]:.1f}")
        print("| pattern | " + " | ".join(f"{b} (kernel)" for b in args.single) + " |")
        print("|---|" + "---|" * len(args.single))
        for name in args.patterns:
            print(f"| {name} | " + " | ".join(f"{single[name][b]['seconds']:.2f} s ({single[name][b]['kernel']})"
                                               for b in args.single) + " |")
    rows = {"cp": {n: [r[n] for r in ranks] for n in args.patterns} if ranks else {}, "single": single}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "load_before": load0, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
