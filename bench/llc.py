"""The CPU's last-level cache, and a way to empty it of a kernel's data between timed calls.

A decode step reads every layer's cache once, so in a model a layer's K/V never come from the
last-level cache (the caches of all layers together are far larger). A benchmark that calls one
cache back to back can find part of it there: this VM's L3 is 480 MiB (lscpu), which holds a
whole 128K-token int8 cache (Hkv 8, D 128: 277 MB) and part of a bf16 one (537 MB). Measured
(Dense decode, 2 threads, one process): the same int8 call took 13.6, 13.0, 12.7, 12.3 ms as the
1st .. 4th case after a bf16 cache's calls, and 14.1 ms after reading a 1 GiB buffer each time,
against 21.5 ms for bf16 either way; a bench that repeats an int8 call overstates it by up to
~15%. `Evictor.evict()` reads a buffer twice the last-level cache's size (at least 64 MiB) before
a timed call, so the call's rows come from memory, as in a model.
"""
from __future__ import annotations

import glob

import torch


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports (sysfs, cpu0), in bytes; None where it says nothing."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if text[-1:].isalpha() else text
        if digits.isdigit():
            sizes.append(int(digits) * mult)
    return max(sizes) if sizes else None


class Evictor:
    """A float64 buffer of `mbytes` MiB (default: twice the last-level cache, at least 64 MiB;
    256 MiB where the size is unknown) whose sum, read before a timed call, leaves the cache
    holding it instead of the call's data."""

    def __init__(self, mbytes: int | None = None):
        if mbytes is None:
            llc = last_level_cache_bytes()
            mbytes = 256 if llc is None else max(64, 2 * llc // 2 ** 20)
        if mbytes <= 0:
            raise ValueError(f"mbytes must be > 0, got {mbytes}")
        self.mbytes = int(mbytes)
        self._buf = torch.ones(self.mbytes * 2 ** 20 // 8, dtype=torch.float64)

    def evict(self) -> None:
        float(self._buf.sum())
