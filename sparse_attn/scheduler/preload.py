"""`preload`: load the compiled kernels a pattern will run before the first call needs them.

A kernel's extension loads on its first use: the first call of a process pays torch's build check
(ninja and the compiler's version: 10-45 ms per extension with the build cached, minutes the first
time on a machine, with a progress line). A server wants that at start, not in its first request:
it names the pattern and the device, and every registered kernel that could serve them loads what
it needs (`Kernel.preload`). Nothing is chosen here; `plan(...).explain()` still says what runs.
"""
from __future__ import annotations

import torch

from .cache_problem import CACHE_OP
from .registry import kernels


def preload(pattern, device="cpu", *, ops=("attention", CACHE_OP)) -> dict[tuple[str, str], str | None]:
    """Load the extensions of every kernel of `ops` that serves `pattern`'s class on `device`.
    Returns `{(op, kernel name): reason}`: None where the kernel is ready, else why it cannot run
    here (a failed build: said on stderr by the build too; the scheduler then plans without it)."""
    dev = torch.device(device).type
    out = {}
    for op in ops:
        for kern in kernels(op):
            if kern.devices is not None and dev not in kern.devices:
                continue
            if not isinstance(pattern, kern.patterns):
                continue
            out[(op, kern.name)] = kern.preload(pattern)
    return out
