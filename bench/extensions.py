"""Build (or load) the C++/CUDA extensions before the first case, one by one, with the time each took.

A cold build is minutes on a 2-core machine; done inside the first case it made that case look
like the bench's pace (a 3-minute first case once predicted a 4-hour run). Done here, apart, the
ETA of the cases starts from their own estimates.
"""
from __future__ import annotations

import time


def needed(device) -> list[str]:
    """The extensions whose kernels can run on `device`: the CPU ones on a CPU, the CUDA one on a GPU."""
    from sparse_attn._build.extensions import EXTENSIONS
    want_cuda = device.type == "cuda"
    return [n for n, spec in EXTENSIONS.items() if bool(spec.get("cuda")) == want_cuda]


def prepare(device, log) -> dict:
    """{name: seconds it took to build or load, or the error text}; never raises (a failed build
    shows up in the kernels' reasons, and the bench runs what it can)."""
    from sparse_attn._build.jit import load_extension
    names = needed(device)
    if not names:
        return {}
    log(f"C++ extensions: building or loading {', '.join(names)} (a cached build loads in a second; "
        "a cold one takes 1-2 minutes each on 2 idle cores)")
    done = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            load_extension(name)
            done[name] = time.perf_counter() - t0
            log(f"  {name}: ready in {done[name]:.1f} s")
        except Exception as e:  # reported, and the scheduler's reasons will say it again
            done[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"  {name}: unavailable ({done[name]})")
    return done
