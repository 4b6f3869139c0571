"""The CPU decode kernel's prefetch modes where a model's caches are read in turn: whether
csrc/cpu/reuse_clock.h picks the faster one (docs/vllm_measurements.md, tenth session).

`--layers` paged caches (`--dtype`, float32 by default) (the vLLM plugin's page layout, pages in random order) are read
one after another, as a model's layers are within a step; between two calls `--evict` MB of other
memory is summed (untimed), as a model reads its weights. Each call is timed alone (the kernel's
binding, one thread); per prefetch mode (-1: the reuse clock, 0: off, 1: on) the modes alternate
over `--rounds` rounds, and the min and median per call are printed. Not part of the bench suite
or the tests.

    python bench/cpu_probes/decode_reuse.py [--keys 1024] [--layers 12] [--evict 64] [--rounds 21] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparse_attn.backends.cpu.decode import _ext
from sparse_attn.integrations.vllm.pages import PagesCache, write_pages


def _case(n: int, hq: int, hkv: int, d: int, page: int, dtype):
    """One layer's decode arguments over a fresh paged cache of n keys (and the tensors they use)."""
    pages = -(-n // page) + 1
    table = (torch.randperm(pages - 1)[: -(-n // page)].view(1, -1) + 1).to(torch.int32)
    pos = torch.arange(n)
    slots = table[0, pos // page].long() * page + pos % page
    kv = torch.zeros(pages, hkv, page, 2 * d, dtype=dtype)
    write_pages(kv, torch.randn(n, hkv, d), torch.randn(n, hkv, d), slots, torch.zeros(pages, hkv, d))
    lens = torch.full((1,), n, dtype=torch.int32)
    view = PagesCache(kv, table, lens, [n]).kv_view()
    a = _ext().DecodeArgs()
    a.q, a.k, a.v, a.scale = torch.randn(1, hq, 1, d).to(dtype), view.k, view.v, d ** -0.5
    a.lengths, a.page_table, a.page_size = view.lengths, view.page_table, view.page_size
    return a, (kv, table, lens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--evict", type=int, default=64, help="MB of other memory summed between two calls (0: none)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--hq", type=int, default=4)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()
    if min(a.keys, a.layers, a.rounds, a.hq, a.hkv, a.d, a.page) < 1 or a.evict < 0 or a.hq % a.hkv:
        raise ValueError("--keys, --layers, --rounds, --hq, --hkv, --d, --page must be positive, --evict >= 0, "
                         "--hkv must divide --hq")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    other = torch.ones(a.evict << 18)  # float32: 4 bytes each
    dtype = getattr(torch, a.dtype)
    cases = [_case(a.keys, a.hq, a.hkv, a.d, a.page, dtype) for _ in range(a.layers)]
    times: dict[int, list[float]] = {}
    for r in range(a.rounds):
        for mode in ((-1, 0, 1) if r % 2 == 0 else (1, 0, -1)):
            for args, _ in cases:
                args.prefetch = mode
            total = 0
            for i in range(4 * a.layers):
                if a.evict:
                    other.sum()
                t = time.perf_counter_ns()
                _ext().decode_fwd(cases[i % a.layers][0])
                total += time.perf_counter_ns() - t
            times.setdefault(mode, []).append(total / (4 * a.layers) / 1e3)
        print(f"round {r + 1}/{a.rounds}", end="\r", flush=True)
    print()
    names = {-1: "auto (reuse clock)", 0: "prefetch off", 1: "prefetch on"}
    for mode in (-1, 0, 1):
        v = times[mode]
        print(f"{a.dtype}, keys {a.keys}, layers {a.layers}, evict {a.evict} MB, {names[mode]}: "
              f"min {min(v):.1f} us, median {statistics.median(v):.1f} us a call")


if __name__ == "__main__":
    main()
