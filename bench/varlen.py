"""Packed varlen (document-masked training): one `attention_varlen` call against the per-sequence
loop and SDPA.

    python -m bench.varlen                 # CPU: 32 x 1K and 4 x 4K packed, Dense causal, fp32
    python -m bench.varlen --quick         # 8 x 512 and 2 x 2K
    python -m bench.varlen --device cuda   # the GPU (Triton packed kernels): 32 x 1K and 4 x 32K

Rows per case (nseq x length, Hq=8 Hkv=2 D=64), forward and forward + backward, alternated `--reps`
times, best of each (a busy neighbour slows all alike):

* `packed`: `attention_varlen` (one kernel call over all sequences; the plan says which kernel);
* `loop`: `attention` once per sequence, the same backend (what `attention_varlen` did before);
* `sdpa loop`: `F.scaled_dot_product_attention(is_causal=True)` once per sequence;
* `sdpa mask`: one SDPA call over the packed row with a block-diagonal causal mask, only where its
  `T x T` mask and scores fit (`--mask-max` tokens, default 8192).

Every packed output is checked against the loop's. The issue's sizes are 32 x 1K and 4 x 32K; on a
2-core CPU 4 x 32K takes minutes per call, so the CPU default is 4 x 4K (pass `--cases` to change).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.api.functional import plan_varlen


def _best(fns, reps):
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _case(nseq, length, *, device, dtype, backend, reps, mask_max, hq=8, hkv=2, d=64):
    t = nseq * length
    cu = torch.arange(0, t + 1, length, dtype=torch.int32, device=device)
    q = torch.randn(t, hq, d, device=device, dtype=dtype)
    k = torch.randn(t, hkv, d, device=device, dtype=dtype)
    v = torch.randn(t, hkv, d, device=device, dtype=dtype)
    go = torch.randn(t, hq, d, device=device, dtype=dtype)
    pat = sa.Dense()
    plan, packed = plan_varlen(q, k, v, cu, cu, pat, max_seqlen_q=length, max_seqlen_k=length, backend=backend)

    def packed_call(train):
        qq, kk, vv = (x.detach().requires_grad_(train) for x in (q, k, v))
        o = sa.attention_varlen(qq, kk, vv, cu, cu, pat, max_seqlen_q=length, max_seqlen_k=length, backend=backend)
        if train:
            o.backward(go)
        return o

    def per_seq(fn, train):
        qq, kk, vv = (x.detach().requires_grad_(train) for x in (q, k, v))
        outs = []
        for i in range(nseq):
            s = slice(i * length, (i + 1) * length)
            outs.append(fn(*(x[s].transpose(0, 1)[None] for x in (qq, kk, vv)))[0].transpose(0, 1))
        o = torch.cat(outs)
        if train:
            o.backward(go)
        return o

    def loop(qi, ki, vi):
        return sa.attention(qi, ki, vi, pat, backend=backend)

    def sdpa(qi, ki, vi):
        return F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)

    def sdpa_mask(train):
        qq, kk, vv = (x.detach().requires_grad_(train) for x in (q, k, v))
        doc = torch.arange(t, device=device) // length
        pos = torch.arange(t, device=device)
        mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
        o = F.scaled_dot_product_attention(qq.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                           vv.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
        o = o[0].transpose(0, 1)
        if train:
            o.backward(go)
        return o

    with torch.no_grad():
        err = (packed_call(False).float() - per_seq(loop, False).float()).abs().max().item()
    names = ["packed", "loop", "sdpa loop"] + (["sdpa mask"] if t <= mask_max else [])
    rows = []
    for train in (False, True):
        fns = [lambda: packed_call(train), lambda: per_seq(loop, train), lambda: per_seq(sdpa, train)]
        if t <= mask_max:
            fns.append(lambda: sdpa_mask(train))
        ctx = torch.enable_grad() if train else torch.no_grad()
        with ctx:
            best = _best(fns, reps)
        rows.append((train, dict(zip(names, best))))
    return plan.kernel.name + (" (packed)" if packed else " (per sequence)"), err, rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.varlen", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--cases", default=None, help="nseq x length list, e.g. 32x1024,4x4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mask-max", type=int, default=8192)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    default = ("8x512,2x2048" if a.quick else "32x1024,4x4096") if dev.type == "cpu" else "32x1024,4x32768"
    cases = [tuple(int(x) for x in c.split("x")) for c in (a.cases or default).split(",")]
    la = os.getloadavg()
    print(f"# bench.varlen on {dev} {str(dtype).replace('torch.', '')}, Dense causal, Hq=8 Hkv=2 D=64, best of "
          f"{a.reps}; load average {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f}, torch threads {torch.get_num_threads()}")
    print("| case | pass | kernel | packed s | loop s | sdpa loop s | sdpa mask s | loop / packed | sdpa loop / packed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for nseq, length in cases:
        kern, err, rows = _case(nseq, length, device=dev, dtype=dtype, backend=a.backend, reps=a.reps,
                                mask_max=a.mask_max)
        for train, r in rows:
            m = r.get("sdpa mask")
            print(f"| {nseq} x {length} | {'fwd+bwd' if train else 'fwd'} | {kern} | {r['packed']:.3f} | "
                  f"{r['loop']:.3f} | {r['sdpa loop']:.3f} | {'-' if m is None else f'{m:.3f}'} | "
                  f"{r['loop'] / r['packed']:.2f} | {r['sdpa loop'] / r['packed']:.2f} |")
        print(f"<!-- {nseq} x {length}: max |packed - loop| = {err:.2e} -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
