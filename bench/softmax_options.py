"""The cost of learned sinks and logit soft-capping: each call against the same call without them.

    python -m bench.softmax_options               # CPU: B=1 Hq=32 Hkv=8 D=128, ~2 min on 2 cores
    python -m bench.softmax_options --quick       # shorter lengths, fewer repeats

Rows (same process, the plain and the optioned call alternated `--reps` times, best of each, so
a busy neighbour slows both alike): GPT-OSS-like `SlidingWindow(128)` + `sink_logits`, Gemma-2-like
`Dense()` + `softcap=50` (and `SlidingWindow(4096)` + `softcap=50`, its local layers), each as
prefill, forward + backward (training) and one decode step over a `KVCache`. The kernel is the
scheduler's choice, printed beside each row (it must be the same kernel with and without the
option, else the row says so). Every optioned output is checked against the PyTorch reference.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import sparse_attn as sa


def _best(fns, reps):
    """Alternate the callables `reps` times; best wall time of each (seconds)."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _rows(quick: bool):
    s_pre = 2048 if quick else 4096
    s_train = 1024 if quick else 2048
    s_dec = 8192 if quick else 32768
    for name, pat, opts in (("gpt-oss sinks + window 128", sa.SlidingWindow(128), dict(sinks=True)),
                            ("gemma-2 softcap 50, dense", sa.Dense(), dict(softcap=50.0)),
                            ("gemma-2 softcap 50, window 4096", sa.SlidingWindow(4096), dict(softcap=50.0))):
        yield name, pat, opts, "prefill", s_pre
        yield name, pat, opts, "train", s_train
        yield name, pat, opts, "decode", s_dec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU)")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    reps = a.reps or (3 if a.quick else 5)
    b, hq, hkv, d = 1, 32, 8, 128
    g = torch.Generator().manual_seed(0)
    print(f"# bench.softmax_options: B={b} Hq={hq} Hkv={hkv} D={d} {dtype} on {dev}, best of {reps} alternated; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':34} {'phase':8} {'S':>6} {'kernel':22} {'plain ms':>9} {'option ms':>9} {'ratio':>6}")
    for name, pat, opts, phase, s in _rows(a.quick):
        sinks = (torch.randn(hq, generator=g) + 2.0).to(dev) if opts.get("sinks") else None
        kw = dict(sink_logits=sinks, softcap=opts.get("softcap"))
        sq = 1 if phase == "decode" else s
        q = (torch.randn(b, hq, sq, d, generator=g) * 2).to(dev, dtype)  # scores of a few units: the cap bites
        k, v = (torch.randn(b, hkv, s, d, generator=g).to(dev, dtype) for _ in range(2))
        if phase == "decode":
            cache = sa.KVCache(b, hkv, d, s, dtype=dtype, device=dev)
            cache.append(k, v)
            kern = sa.plan_with_cache(q, cache, pat, **kw).kernel.name
            kern0 = sa.plan_with_cache(q, cache, pat).kernel.name
            plain = lambda: sa.attention_with_cache(q, cache, pat)  # noqa: E731
            opt = lambda: sa.attention_with_cache(q, cache, pat, **kw)  # noqa: E731
            ref = sa.attention_with_cache(q, cache, pat, backend="reference", **kw)
        else:
            train = phase == "train"
            leaves = [x.detach().requires_grad_(train) for x in (q, k, v)]
            if train and sinks is not None:
                kw["sink_logits"] = sinks.detach().requires_grad_()
            kern = sa.plan(*leaves, pat, **kw).kernel.name
            kern0 = sa.plan(*leaves, pat).kernel.name

            def call(**o):
                out = sa.attention(*leaves, pat, **o)
                if train:
                    out.sum().backward()
                return out

            plain = lambda: call()  # noqa: E731
            opt = lambda: call(**kw)  # noqa: E731
            with torch.no_grad():
                ref = sa.attention(q, k, v, pat, backend="reference", **{n: (x.detach() if torch.is_tensor(x) else x)
                                                                         for n, x in kw.items()})
        out = opt()
        err = (torch.linalg.vector_norm((out.detach() - ref).double()) / torch.linalg.vector_norm(ref.double())).item()
        t0, t1 = _best([plain, opt], reps)
        same = "" if kern == kern0 else f"  (plain call: {kern0})"
        print(f"{name:34} {phase:8} {s:6d} {kern:22} {t0 * 1e3:9.2f} {t1 * 1e3:9.2f} {t1 / t0:6.2f}"
              f"  err {err:.1e}{same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
