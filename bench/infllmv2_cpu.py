"""InfLLMv2 on the CPU at MiniCPM4-8B's attention shape (B=1, Hq=32, Hkv=2, D=128, bf16), against SDPA.

    python -m bench.infllmv2_cpu --seq 16384 [--decode 131072] [--cache-decode 131072] [--repeat 1]
                                 [--skip-torch-select] [--skip-sdpa] [--sdpa-rows N]

Rows: the selection alone (the C++ kernel csrc/cpu/infllmv2_select.cpp that `cpu` runs, and the
PyTorch path layout/infllmv2_selection.py), the whole call (`attention(..., InfLLMv2(),
backend="cpu")`, selection included) and SDPA dense causal on the same inputs; decode: one query
row over `--decode` keys (full K/V tensors, not a cache), InfLLMv2 vs SDPA over the same keys;
cache decode: one step of `attention_with_cache` over a `PagedKVCache` holding `--cache-decode`
keys (selection from the cache's window sums, the C++ one cpu.decode runs) vs SDPA over the same
keys. Random inputs. Prints a
markdown table with the load average; each time is the wall time of the best call, with the CPU
time of the process (all threads) during that call beside it (less sensitive to the other jobs of a
shared machine than the wall time; both counted over 2 threads here).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.backends.cpu.infllmv2 import infllmv2_select_cpu
from sparse_attn.layout.infllmv2_selection import infllmv2_token_index


def _time(fn, repeat: int, warmup: bool) -> tuple[float, float]:
    """(wall s, process CPU s) of the call with the best wall time."""
    if warmup:
        fn()  # builds, caches
    best = (float("inf"), float("nan"))
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        w = time.perf_counter() - t
        if w < best[0]:
            best = (w, time.process_time() - c)
    return best


def _fmt(t) -> str:
    return f"{t[0]:.3f} ({t[1]:.3f} cpu)"


def _ratio(a, b) -> str:
    """b / a in wall time and in CPU time."""
    return f"{b[0] / a[0]:.2f}x ({b[1] / a[1]:.2f}x cpu)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--decode", type=int, default=0)
    ap.add_argument("--cache-decode", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-torch-select", action="store_true", help="do not time the PyTorch selection (slow)")
    ap.add_argument("--skip-sdpa", action="store_true", help="do not time SDPA's prefill (dense causal: O(S^2))")
    ap.add_argument("--sdpa-rows", type=int, default=0,
                    help="instead of SDPA's whole causal prefill, time N query rows over all S keys (non-causal, "
                         "the same kernel) and scale by the causal pairs S(S+1)/2 / (N S): an extrapolation")
    ap.add_argument("--no-warmup", action="store_true", help="time the first call (a loaded machine)")
    a = ap.parse_args()
    torch.manual_seed(0)
    pat = sa.InfLLMv2()
    rows = []
    if a.no_warmup:  # the extension loads outside the timed calls
        from sparse_attn.backends.cpu.kernels import _ext
        _ext()
    b, hq, hkv, d, dt = 1, 32, 2, 128, torch.bfloat16
    if a.seq:
        s = a.seq
        q, k, v = (torch.randn(b, h, s, d).to(dt) for h in (hq, hkv, hkv))
        with torch.no_grad():
            t_cpp = _time(lambda: infllmv2_select_cpu(q, k, pat.clamped(s)), a.repeat, not a.no_warmup)
            print(f"prefill S={s}: C++ selection {_fmt(t_cpp)} s", flush=True)
            t_sel = (float("nan"), float("nan"))
            if not a.skip_torch_select:
                t_sel = _time(lambda: infllmv2_token_index(q, k, pat.clamped(s)), a.repeat, False)
            print(f"prefill S={s}: PyTorch selection {_fmt(t_sel)} s", flush=True)
            t_all = _time(lambda: sa.attention(q, k, v, pat, backend="cpu"), a.repeat, not a.no_warmup)
            print(f"prefill S={s}: InfLLMv2 cpu {_fmt(t_all)} s", flush=True)
            t_sdpa = (float("nan"), float("nan"))
            if a.sdpa_rows and not a.skip_sdpa:
                qr = q[:, :, -a.sdpa_rows:]
                part = _time(lambda: F.scaled_dot_product_attention(qr, k, v, enable_gqa=True), a.repeat, False)
                f = s * (s + 1) / 2 / (a.sdpa_rows * s)
                t_sdpa = (part[0] * f, part[1] * f)
                print(f"prefill S={s}: SDPA {a.sdpa_rows} rows x {s} keys {_fmt(part)} s; x {f:.2f} causal pairs "
                      f"= {_fmt(t_sdpa)} s extrapolated", flush=True)
            elif not a.skip_sdpa:
                t_sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               a.repeat, False)
            how = "not run" if a.skip_sdpa else f"extrapolated from {a.sdpa_rows} rows" if a.sdpa_rows else "measured"
            print(f"prefill S={s}: SDPA dense causal {_fmt(t_sdpa)} s ({how})", flush=True)
        rows.append((f"prefill S={s} (C++ selection; PyTorch's: {t_sel[0]:.3f} s; SDPA {how})", t_cpp, t_all, t_sdpa))
        print(rows[-1], flush=True)
    if a.decode:
        s = a.decode
        q = torch.randn(b, hq, 1, d).to(dt)
        k, v = (torch.randn(b, hkv, s, d).to(dt) for _ in range(2))
        with torch.no_grad():
            t_sel = _time(lambda: infllmv2_token_index(q, k, pat.clamped(s)), max(a.repeat, 3), not a.no_warmup)
            t_all = _time(lambda: sa.attention(q, k, v, pat, backend="cpu"), max(a.repeat, 3), not a.no_warmup)
            t_sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), max(a.repeat, 3),
                           not a.no_warmup)
        rows.append((f"decode Sk={s}", t_sel, t_all, t_sdpa))
        print(rows[-1], flush=True)
    if a.cache_decode:
        s = a.cache_decode
        cache = sa.PagedKVCache(b, hkv, d, num_pages=-(-s // 64) + 1, page_size=64, max_len=s + 1, dtype=dt)
        for c0 in range(0, s, 8192):  # filled in chunks (the window sums are kept from the first call)
            n = min(8192, s - c0)
            cache.append(*(torch.randn(b, hkv, n, d).to(dt) for _ in range(2)))
        q = torch.randn(b, hq, 1, d).to(dt)
        k, v = cache.gather(0, s)
        with torch.no_grad():
            sa.attention_with_cache(q, cache, pat)  # makes the window sums (once per cache)
            plan = sa.plan_with_cache(q, cache, pat)
            print(plan.explain(), flush=True)
            from sparse_attn.backends.cpu.infllmv2 import infllmv2_picks_over_cache_cpu
            from sparse_attn.layout.infllmv2_selection import infllmv2_index_over_cache
            view = cache.kv_view()
            # the selection cpu.decode runs (the C++ picks over the window sums)
            t_sel = _time(lambda: infllmv2_index_over_cache(q, view, plan.problem.pattern,
                                                            picks=infllmv2_picks_over_cache_cpu),
                          max(a.repeat, 5), True)
            t_all = _time(lambda: sa.attention_with_cache(q, cache, pat), max(a.repeat, 5), True)
            t_sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), max(a.repeat, 5), True)
            t_dense = _time(lambda: sa.attention_with_cache(q, cache, sa.Dense()), max(a.repeat, 5), True)
        print(f"Dense attention_with_cache over the same cache ({sa.plan_with_cache(q, cache).kernel.name}): "
              f"{_fmt(t_dense)} s = {_ratio(t_all, t_dense)} InfLLMv2's step", flush=True)
        rows.append((f"decode Sk={s}, PagedKVCache ({plan.kernel.name}; Dense over the cache: {_fmt(t_dense)} s)",
                     t_sel, t_all, t_sdpa))
        print(rows[-1], flush=True)
    print(f"load average {os.getloadavg()}, threads {torch.get_num_threads()}")
    print("| case | selection s | InfLLMv2 cpu (sel. incl.) s | SDPA s (causal; decode: same keys) | speed-up "
          "| selection share |")
    print("|---|---|---|---|---|---|")
    for name, ts, ta, td in rows:
        print(f"| {name} | {_fmt(ts)} | {_fmt(ta)} | {_fmt(td)} | {_ratio(ta, td)} | {ts[0] / ta[0]:.0%} |")


if __name__ == "__main__":
    main()
