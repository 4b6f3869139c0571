"""The machine's roofline, measured in the same run: copy bandwidth and matmul rate per dtype
(best of the repeats: a peak, not a median)."""
from __future__ import annotations

import torch

from .timing import measure


def copy_bandwidth(device: torch.device, mbytes: int) -> float:
    """GB/s of a large tensor copy, counting the bytes read plus the bytes written."""
    n = mbytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t, _ = measure(lambda: dst.copy_(src), device, budget_s=1.0, warmup=2, max_repeats=10)
    return 2 * src.numel() * 4 / (min(t.times_ms) * 1e-3) / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """GFLOP/s of an n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t, _ = measure(lambda: a @ b, device, budget_s=1.5, warmup=2, max_repeats=10)
    return 2 * n**3 / (min(t.times_ms) * 1e-3) / 1e9


def measure_roofline(device: torch.device, dtypes) -> dict:
    big = device.type != "cpu"
    return {
        "copy_gbps": copy_bandwidth(device, 1024 if big else 256),
        "matmul_gflops": {str(dt).removeprefix("torch."): matmul_rate(device, dt, 8192 if big else 2048)
                          for dt in dtypes},
    }
