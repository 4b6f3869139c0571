"""The PyTorch TopK selection (`layout/topk_selection.py::top_blocks`) of another git revision against
the working tree's, in one process, call by call (the VM's speed drifts between processes).

    python bench/top_blocks_ab.py --rev 3970f11          # the stable-sort version against the tree
    python bench/top_blocks_ab.py --rev HEAD --threads 2

`top_blocks` picks each row's `width` best blocks with ties to the lower block; it runs on the
portable selection paths (the reference TopK prefill, cache decode off pooled block sums, the
Triton/CUDA layouts, the context-parallel cache), not in the C++ CPU selection. Each case times
`--reps` calls of one version then the other, `--rounds` times in alternating order, and reports
the medians (ms a call), `rev / tree` (above 1 the tree is faster), plain `torch.topk` (ties in
any order: the floor) and whether both versions chose the same blocks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sparse_attn.layout import topk_selection  # noqa: E402

#: (scores shape (B, Hkv, rows, blocks), width): a 256-row prefill chunk at 128K keys in 64-key blocks,
#: decode rows at 128K / 2M keys, and a 4K prompt in 64-token blocks
CASES = [((1, 8, 256, 2048), 16), ((1, 8, 4096, 64), 8), ((1, 8, 1, 2048), 16), ((8, 8, 1, 2048), 64),
         ((1, 8, 1, 32768), 64)]


def load_revision(rev: str):
    """`layout/topk_selection.py` as it was at `rev`, as a module of the installed package."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:sparse_attn/layout/topk_selection.py"],
                         check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType("sparse_attn.layout._topk_selection_rev")
    mod.__package__ = "sparse_attn.layout"
    exec(compile(src, f"{rev}:topk_selection.py", "exec"), mod.__dict__)
    if not hasattr(mod, "top_blocks"):
        raise ValueError(f"--rev {rev}: its topk_selection.py has no top_blocks")
    return mod


def timed(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", default="HEAD", help="git revision to compare against the working tree")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.threads < 1 or args.rounds < 1 or args.reps < 1:
        raise ValueError("--threads, --rounds and --reps must be positive")
    torch.set_num_threads(args.threads)
    old = load_revision(args.rev).top_blocks
    new = topk_selection.top_blocks
    print(f"top_blocks: {args.rev} vs the tree, {args.threads} threads, {args.rounds} rounds x {args.reps} calls")
    print("| scores (B, Hkv, rows, blocks) | width | rev ms | tree ms | rev / tree | torch.topk ms | same |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape, width in CASES:
        # small integers: many exact ties, so the tie rule is exercised and compared
        scores = torch.randint(-50, 50, shape, generator=gen).float()
        cand = torch.rand(shape, generator=gen) < 0.9
        same = torch.equal(old(scores, cand, width), new(scores, cand, width))
        times = {"rev": [], "tree": [], "topk": []}
        for r in range(args.rounds):
            order = [("rev", old), ("tree", new)] if r % 2 == 0 else [("tree", new), ("rev", old)]
            for name, fn in order:
                times[name].append(timed(lambda: fn(scores, cand, width), args.reps))
            times["topk"].append(timed(lambda: torch.topk(scores, width, dim=-1), args.reps))
        m = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"| {tuple(shape)} | {width} | {m['rev']:.3f} | {m['tree']:.3f} | {m['rev'] / m['tree']:.2f}x | "
              f"{m['topk']:.3f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
