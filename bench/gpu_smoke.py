"""A first check of a GPU machine in about a minute (`bash bench/gpu_check.sh --smoke`).

Compiled Triton attention (dense causal prefill, TopK prefill) and split-KV decode, and the CUDA
extension's decode, each against SDPA on the same inputs: the relative error against SDPA in
float32 and one timing each, so a first call shows whether the kernels compile, run and agree
before a long check is spent. Without a GPU it runs the CPU backend the same way (exercising the
script; its timings are not GPU figures). Exit 1 if any check fails or disagrees.

    python -m bench.gpu_smoke
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F


def _time_ms(fn, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / 3 * 1e3


def _sdpa(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def checks(device):
    import sparse_attn as sa
    from sparse_attn.cache import KVCache

    gpu = device.type == "cuda"
    be = "triton" if gpu else "cpu"
    dt = torch.bfloat16 if gpu else torch.float32
    s = 4000 if gpu else 1000
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dt)  # noqa: E731
    q, k, v = mk(1, 8, s, 128), mk(1, 2, s, 128), mk(1, 2, s, 128)
    yield ("dense causal prefill", be, lambda: sa.attention(q, k, v, sa.Dense(), backend=be),
           lambda: _sdpa(q, k, v, True))
    nb = -(-s // 64)
    yield ("TopK(nb) prefill (selects every block)", be,
           lambda: sa.attention(q, k, v, sa.TopK(nb, block_size=64), backend=be), lambda: _sdpa(q, k, v, True))
    qd = mk(2, 8, 1, 128)
    kd, vd = mk(2, 2, 8 * s, 128), mk(2, 2, 8 * s, 128)
    cache = KVCache(2, 2, 128, 8 * s, dtype=dt, device=device)
    cache.append(kd, vd)
    yield ("dense decode over a cache", be, lambda: sa.attention_with_cache(qd, cache, sa.Dense(), backend=be),
           lambda: _sdpa(qd, kd, vd, False))
    if gpu:
        yield ("dense decode over a cache", "cuda",
               lambda: sa.attention_with_cache(qd, cache, sa.Dense(), backend="cuda"),
               lambda: _sdpa(qd, kd, vd, False))


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"gpu_smoke on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (no GPU: CPU backend)'}; "
          f"torch {torch.__version__}", flush=True)
    bound = 3e-2 if device.type == "cuda" else 1e-4  # bfloat16 on the GPU, float32 on a CPU
    failed = 0
    for what, backend, ours, ref in checks(device):
        t0 = time.perf_counter()
        try:
            err = _rel(ours(), ref())
            ms, ref_ms = _time_ms(ours, device), _time_ms(ref, device)
            ok = err <= bound
            print(f"{'ok ' if ok else 'BAD'} {what} [{backend}]: rel. error vs SDPA {err:.1e}, {ms:.2f} ms "
                  f"(SDPA {ref_ms:.2f} ms), first call + timing {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # every check reports, even after one fails
            ok = False
            print(f"ERR {what} [{backend}]: {type(e).__name__}: {str(e)[:400]}", flush=True)
        failed += not ok
    print(f"gpu_smoke: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
