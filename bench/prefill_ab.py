"""The CPU prefill forward (or backward) of two builds, in one process: another git revision's "cpu" extension
against the working tree's, on the same prompts (bench/build_ab.py: the VM's speed drifts between
processes, so the two builds are timed call by call).

    python bench/prefill_ab.py                                  # HEAD vs the tree, Dense causal, bf16
    python bench/prefill_ab.py --rev HEAD~1 --lengths 100 256 1024 --dtype float32
    python bench/prefill_ab.py --pattern window:128 --hq 32 --hkv 8 --d 128
    python bench/prefill_ab.py --backward --mode 1               # the backward's two-pass schedule

Each length builds the layout the kernel would run (`cpu_layout`, with TopK's selection) once and
calls both builds' `block_sparse_fwd` on it: `--rounds` rounds, each timing `--reps` calls of one
build then of the other, in alternating order; the table gives the medians (us a call), their
ratio (`rev / tree`: above 1 the tree is faster) and whether both gave the same bits (a change of
where work is done should keep them; a change of arithmetic need not, and the table says so).
Patterns: the vLLM plugin's `SPARSE_ATTN_VLLM_PATTERN` grammar (`dense`, `window:W[:SINKS]`,
`topk:K[:BLOCK]` with 64-key blocks by default, `infllmv2[:field=value,...]`) and `full` (Dense
without the causal rule).
`--backward` times `block_sparse_bwd` instead (dq, dk, dv from the tree's forward output and lse,
a random dout; `--mode`: 0 the scheduler's choice, 1 two-pass, 2 fused).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparse_attn as sa  # noqa: E402
from bench.build_ab import load_revision  # noqa: E402
from sparse_attn.integrations.vllm.patterns import parse_pattern as vllm_pattern  # noqa: E402
from sparse_attn.backends.cpu.kernels import _ext, _rule, cpu_layout  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def parse_pattern(spec: str):
    """The vLLM plugin's grammar (`sparse_attn.integrations.vllm.patterns`), plus `full`."""
    if spec.strip().lower() == "full":
        return sa.Dense(causal=False)
    try:
        return vllm_pattern(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (or full)") from None


def time_calls(f, reps: int) -> float:
    """us a call over `reps` calls of `f`, after one untimed call."""
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="the git revision to compare the tree with (default HEAD)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 100, 128, 256, 512, 1024, 4096])
    ap.add_argument("--pattern", type=parse_pattern, default=sa.Dense())
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--hq", type=int, default=4)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=None, help="calls per round and build (default ~20K tokens' worth)")
    ap.add_argument("--backward", action="store_true", help="time the backward binding instead of the forward")
    ap.add_argument("--mode", type=int, choices=[0, 1, 2], default=0,
                    help="the backward's schedule: 0 auto, 1 two-pass, 2 fused (with --backward)")
    args = ap.parse_args(argv)
    if any(n <= 0 for n in args.lengths):
        ap.error("--lengths must be > 0")
    if args.hq <= 0 or args.hkv <= 0 or args.hq % args.hkv or args.d <= 0:
        ap.error("--hq and --hkv must be > 0 with --hq a multiple of --hkv, and --d > 0")
    if args.rounds <= 0 or (args.reps is not None and args.reps <= 0):
        ap.error("--rounds and --reps must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    builds = {"rev": load_revision(args.rev), "tree": _ext()}
    dt = DTYPES[args.dtype]
    load = os.getloadavg()
    what = f"backward (mode {args.mode})" if args.backward else "forward"
    print(f"# {what}, {args.rev} (rev) vs the working tree (tree): {args.pattern}, {args.dtype}, Hq {args.hq}, "
          f"Hkv {args.hkv}, D {args.d}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    print("| tokens | tiles (q x k) | rev us | tree us | rev / tree | same bits |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in args.lengths:
            q = torch.randn(1, args.hq, n, args.d, generator=g).to(dt)
            k = torch.randn(1, args.hkv, n, args.d, generator=g).to(dt)
            v = torch.randn(1, args.hkv, n, args.d, generator=g).to(dt)
            lay = cpu_layout(q, k, args.pattern)
            rest = (lay.full_count, lay.full_index, lay.partial_count, lay.partial_index, lay.token_index,
                    *_rule(lay), args.d ** -0.5, 0.0)
            outs = {}
            if args.backward:
                out, lse = builds["tree"].block_sparse_fwd(q, k, v, *rest, None, True)
                dout = torch.randn(out.shape, generator=g).to(dt)
                tokens, offsets = lay.transpose_tokens() or (None, None)
                brest = (out, lse, dout, lay.full_count, lay.full_index, lay.partial_count, lay.partial_index,
                         *lay.transpose(), lay.token_index, tokens, offsets, *_rule(lay), args.d ** -0.5, args.mode,
                         0.0)

                def call(b, m):
                    outs[b] = m.block_sparse_bwd(q, k, v, *brest)
            else:
                bufs = {b: torch.empty_like(q) for b in builds}

                def call(b, m):
                    m.block_sparse_fwd(q, k, v, *rest, bufs[b], False)
                    outs[b] = (bufs[b],)
            calls = {b: (lambda b=b, m=m: call(b, m)) for b, m in builds.items()}
            reps = args.reps or max(3, 20000 // n)
            times = {b: [] for b in builds}
            for r in range(args.rounds):
                for b in (("rev", "tree") if r % 2 == 0 else ("tree", "rev")):
                    times[b].append(time_calls(calls[b], reps))
            mr, mt = statistics.median(times["rev"]), statistics.median(times["tree"])
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs["rev"], outs["tree"]))
            same = "yes" if all(torch.equal(a, b) for a, b in zip(outs["rev"], outs["tree"])) else \
                f"no (max diff {diff:.1e})"
            print(f"| {n} | {lay.q_block} x {lay.k_block} | {mr:.1f} | {mt:.1f} | {mr / mt:.2f}x | {same} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
