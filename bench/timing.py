"""Wall-clock timing: warm-up calls, then the median of repeats within a time budget."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    repeats: int
    times_ms: list


def measure(fn, device: torch.device, *, budget_s: float, warmup: int = 1, max_repeats: int = 30):
    """Time `fn()`; returns (Timing, result of the last call).

    Runs `warmup` untimed calls, then timed calls until `max_repeats` or until one more call would
    exceed `budget_s` (at least one timed call).
    """
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats:
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start + statistics.median(times) > budget_s:
            break
    ms = [1e3 * t for t in times]
    return Timing(statistics.median(ms), len(ms), ms), result
