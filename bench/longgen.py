"""Long generation: a prompt (prefill), then tokens generated one by one through a cache.

Per pattern, through the public API only: `sa.attention` over the prompt, `cache.append` of its
keys, then per generated token `cache.append` + `sa.attention_with_cache` (`sa.KVCache`; a
`sa.PagedKVCache` that gives back the pages behind the window for `SlidingWindow`), and for linear
attention `sa.linear_attention` chained through its state. Beside them, in the same run, what a
user writes by hand: SDPA over a growing tensor (`torch.cat` of K and V at every token, then
`F.scaled_dot_product_attention`). Reported: prefill seconds, generated tokens/s, the cache's
bytes, and for TopK the share of a step spent selecting blocks, estimated as
`1 - (step of a SlidingWindow over as many keys as TopK visits) / (TopK step)` on the same cache
(the public API does not time the selection apart).

Random q/k/v stand in for a model's (the attention is the same work whatever the values; TopK's
selection cost does not depend on what it selects).

    python -m bench.longgen                     # 32K prompt, 2K generated, Hq=8, Hkv=2, D=128, bf16
    python -m bench.longgen --prompt 8192 --new 512
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

#: Hq, Hkv (GQA 4) and D: a quarter of a 32-head model's layer, so the 32K run takes minutes on 2 cores
HEADS, HEAD_DIM = (8, 2), 128
#: topk, window of the rows (block 64); the SlidingWindow row's pages are released as it slides
TOPK, WINDOW, BLOCK, PAGE = 16, 1024, 64, 64
SELECTION_PROBE_STEPS = 32


def patterns():
    import sparse_attn as sa
    return [("dense", sa.Dense()), (f"window{WINDOW}", sa.SlidingWindow(WINDOW)),
            (f"topk{TOPK}", sa.TopK(TOPK, block_size=BLOCK)), (f"windowlinear{WINDOW}", sa.WindowLinear(WINDOW))]


def cache_bytes(obj) -> int:
    """Bytes of the distinct tensor storages an object holds as attributes (each storage once)."""
    seen = {}
    for t in vars(obj).values():
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _inputs(prompt, new, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = HEADS
    mk = lambda h: torch.randn(1, h, prompt + new, HEAD_DIM, generator=g).to(device, dtype)
    return mk(hq), mk(hkv), mk(hkv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def run_pattern(name, pattern, q, k, v, prompt, new, device) -> dict:
    import sparse_attn as sa
    row = dict(case=f"longgen/{name}/S{prompt}+{new}", impl="sparse_attn", pattern=repr(pattern))
    hkv = k.shape[1]
    paged = isinstance(pattern, sa.SlidingWindow)
    total = prompt + new
    if isinstance(pattern, sa.WindowLinear):
        return run_window_linear(name, pattern, q, k, v, prompt, new, device)
    if paged:
        cache = sa.PagedKVCache(batch=1, kv_heads=hkv, head_dim=HEAD_DIM, num_pages=-(-total // PAGE) + 1,
                                page_size=PAGE, max_len=total, dtype=q.dtype, device=device, pool_block_size=BLOCK)
    else:
        cache = sa.KVCache(batch=1, kv_heads=hkv, head_dim=HEAD_DIM, max_len=total, dtype=q.dtype, device=device,
                           pool_block_size=BLOCK)
    try:  # the cache must take the pattern before any time is spent on the prefill
        cache.append(k[:, :, :1], v[:, :, :1])
        sa.attention_with_cache(q[:, :, :1], cache, pattern)
    except (TypeError, ValueError) as e:
        row.update(status="unsupported", note=f"attention_with_cache: {str(e).splitlines()[0][:160]}")
        return row
    cache = type(cache)(**_cache_args(cache))  # a fresh one: the probe's token is not the prompt
    row["prefill_s"], _ = _timed(lambda: sa.attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt],
                                                      pattern), device)
    cache.append(k[:, :, :prompt], v[:, :, :prompt])

    def step(i):
        cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        out = sa.attention_with_cache(q[:, :, i:i + 1], cache, pattern)
        if paged and (i + 1) % PAGE == 0:
            cache.release_outside(pattern)
        return out

    row["decode_s"], _ = _timed(lambda: [step(i) for i in range(prompt, total)], device)
    row["tokens_per_s"] = new / row["decode_s"]
    row["step_ms"] = 1e3 * row["decode_s"] / new
    row["cache_bytes"] = cache_bytes(cache)
    if paged:
        row["cache_bytes_in_use"] = (cache.num_pages - cache.free_pages) * 2 * hkv * PAGE * HEAD_DIM * q.element_size()
    if isinstance(pattern, sa.TopK):
        row["selection_share"] = _selection_share(cache, q, pattern, device)
    row["status"] = "ok"
    return row


def run_window_linear(name, pattern, q, k, v, prompt, new, device) -> dict:
    """WindowLinear decodes through `ModelCache` (its window KV plus the `(M, z)` memory of the evicted
    tokens: constant memory): the first `attend` is the prefill, then one `attend` per token."""
    import sparse_attn as sa
    row = dict(case=f"longgen/{name}/S{prompt}+{new}", impl="sparse_attn", pattern=repr(pattern) + " via ModelCache")
    gate = torch.zeros(q.shape[1], device=device)  # sigmoid(0) = 1/2: both parts count
    cache = sa.ModelCache(1)
    row["prefill_s"], _ = _timed(lambda: cache.attend(0, q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt],
                                                      pattern, gate=gate), device)
    row["decode_s"], _ = _timed(lambda: [cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1],
                                                      pattern, gate=gate) for i in range(prompt, prompt + new)],
                                device)
    row.update(tokens_per_s=new / row["decode_s"], step_ms=1e3 * row["decode_s"] / new,
               cache_bytes=cache.nbytes(), status="ok")
    return row


def _cache_args(cache):
    import sparse_attn as sa
    args = dict(batch=cache.batch, kv_heads=cache.kv_heads, head_dim=cache.head_dim, max_len=cache.max_len,
                dtype=cache.dtype, device=cache.device, pool_block_size=cache.pool_block_size)
    if isinstance(cache, sa.PagedKVCache):
        args.update(num_pages=cache.num_pages, page_size=cache.page_size)
    return args


def _selection_share(cache, q, pattern, device) -> float:
    """1 - (a SlidingWindow step over as many keys as TopK visits) / (a TopK step), same cache, same query."""
    import sparse_attn as sa
    keys = (pattern.topk + pattern.sink_blocks + pattern.local_blocks) * pattern.block_size
    qi = q[:, :, -1:]
    times = {}
    for label, pat in (("topk", pattern), ("window", sa.SlidingWindow(keys))):
        sa.attention_with_cache(qi, cache, pat)  # warm
        times[label], _ = _timed(lambda: [sa.attention_with_cache(qi, cache, pat)
                                          for _ in range(SELECTION_PROBE_STEPS)], device)
    return max(0.0, 1.0 - times["window"] / times["topk"])


def run_linear(q, k, v, prompt, new, device) -> dict:
    import sparse_attn as sa
    row = dict(case=f"longgen/linear/S{prompt}+{new}", impl="sparse_attn", pattern="linear_attention(per-head decay)")
    decay = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(q.shape[1], dtype=torch.float32))).to(device)
    row["prefill_s"], (_, state) = _timed(lambda: sa.linear_attention(
        q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], decay=decay, return_state=True), device)

    def gen():
        st = state
        for i in range(prompt, prompt + new):
            _, st = sa.linear_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], decay=decay,
                                        initial_state=st, return_state=True)
        return st
    row["decode_s"], st = _timed(gen, device)
    row.update(tokens_per_s=new / row["decode_s"], step_ms=1e3 * row["decode_s"] / new,
               cache_bytes=st.numel() * st.element_size(), status="ok")
    return row


def run_sdpa_growing(q, k, v, prompt, new, device) -> dict:
    """What a user writes by hand: concatenate K/V every token, then SDPA over all of it."""
    row = dict(case=f"longgen/dense/S{prompt}+{new}", impl="sdpa (torch.cat + F.sdpa)", pattern="dense causal")
    row["prefill_s"], _ = _timed(lambda: F.scaled_dot_product_attention(
        q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], is_causal=True, enable_gqa=True), device)
    kk, vv = k[:, :, :prompt].clone(), v[:, :, :prompt].clone()

    def gen():
        nonlocal kk, vv
        for i in range(prompt, prompt + new):
            kk = torch.cat([kk, k[:, :, i:i + 1]], dim=2)
            vv = torch.cat([vv, v[:, :, i:i + 1]], dim=2)
            F.scaled_dot_product_attention(q[:, :, i:i + 1], kk, vv, enable_gqa=True)
    row["decode_s"], _ = _timed(gen, device)
    row.update(tokens_per_s=new / row["decode_s"], step_ms=1e3 * row["decode_s"] / new,
               cache_bytes=kk.numel() * kk.element_size() + vv.numel() * vv.element_size(), status="ok")
    return row


def run_longgen(*, prompt: int, new: int, device, dtype=torch.bfloat16, log=print) -> list[dict]:
    """Every row of the long-generation case; `log` gets one line per row."""
    q, k, v = _inputs(prompt, new, dtype, device)
    base = dict(kind="longgen", Hq=HEADS[0], Hkv=HEADS[1], D=HEAD_DIM, dtype=str(dtype).removeprefix("torch."),
                prompt=prompt, new=new)
    jobs = [(lambda: run_sdpa_growing(q, k, v, prompt, new, device))]
    jobs += [(lambda n=n, p=p: run_pattern(n, p, q, k, v, prompt, new, device)) for n, p in patterns()]
    jobs.append(lambda: run_linear(q, k, v, prompt, new, device))
    rows = []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            row = job()
        except Exception as e:  # record it and go on with the other rows
            row = dict(case="longgen/?", impl="sparse_attn", status="error", error=f"{type(e).__name__}: {e}"[:300])
        row = {**base, **row, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        log(f"    {row['case']} {row['impl']}: " + (f"{row['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in row
                                                    else row.get("note") or row.get("error", "")))
    return rows


def estimate_seconds(prompt: int, new: int, roofline: dict) -> float:
    """Before measuring: the prefills at 20% of the measured bf16 matmul rate (dense: all causal
    pairs; the sparse rows are cheaper, counted as one more dense prefill) and the generated tokens
    reading (and SDPA's cat copying) the K/V at 20% of the copy rate."""
    hq, hkv = HEADS
    rate = max(roofline["matmul_gflops"].get("bfloat16", 0.0), roofline["matmul_gflops"]["float32"]) * 1e9
    prefill = 2 * 4.0 * HEAD_DIM * hq * prompt * prompt / 2 / (0.2 * rate)
    kv = 2 * hkv * HEAD_DIM * 2 * (prompt + new / 2)  # bytes of K+V at the average length
    decode = new * kv * 5 / (0.2 * roofline["copy_gbps"] * 1e9)  # dense + cat (x3) + window/topk
    return prefill + decode


def table(rows) -> str:
    lines = [f"{'long generation':36} {'impl':28} {'prefill s':>9} {'tokens/s':>9} {'ms/token':>9} "
             f"{'cache MB':>9} {'selection':>9}  note"]
    for r in rows:
        mb = f"{r['cache_bytes'] / 2**20:.1f}" if "cache_bytes" in r else "-"
        if "cache_bytes_in_use" in r:
            mb = f"{r['cache_bytes_in_use'] / 2**20:.1f}"
        lines.append(f"{r['case']:36} {r['impl'][:28]:28} " + (
            f"{r['prefill_s']:9.2f} {r['tokens_per_s']:9.0f} {r['step_ms']:9.2f} {mb:>9} "
            f"{(format(100 * r['selection_share'], '.0f') + '%') if 'selection_share' in r else '-':>9}  "
            if r.get("status") == "ok" else f"{'-':>9} {'-':>9} {'-':>9} {'-':>9} {'-':>9}  ")
            + (r.get("note") or r.get("error") or ""))
    lines.append(f"B=1 Hq={HEADS[0]} Hkv={HEADS[1]} D={HEAD_DIM}; cache MB: bytes held at the end (the paged window "
                 "cache: pages in use); selection: share of a TopK step spent selecting (estimated, see bench/longgen.py)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.longgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=32768)
    p.add_argument("--new", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results/longgen.json")
    args = p.parse_args(argv)
    from .hardware import detect_device, environment
    device = detect_device(args.device)
    env = environment(device)
    from .extensions import prepare
    t0 = time.perf_counter()
    # built apart, before any timed row (a cold build inside a row timed the compiler, not the kernel)
    env["extension_builds_s"] = prepare(device, log=lambda s: print(s, file=sys.stderr, flush=True))
    rows = run_longgen(prompt=args.prompt, new=args.new, device=device, dtype=getattr(torch, args.dtype),
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(rows))
    env["load_average_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "elapsed_s": time.perf_counter() - t0, "rows": rows}, f, indent=1, default=str)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s; load average {env['load_average']} at the start, "
          f"{env['load_average_end']} at the end)", file=sys.stderr)
    return 0 if all(r.get("status") != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
