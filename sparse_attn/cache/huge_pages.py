"""Cache storage in transparent huge pages (Linux CPUs).

A CPU KV cache is a few large, long-lived tensors that decode streams through once per token.
With 4 KB pages every 4 KB of a stream is a new TLB entry and the hardware prefetchers stop at
each page boundary; advising the storage as huge pages (madvise MADV_HUGEPAGE) before it is first
touched gives 2 MB pages where the kernel's THP setting allows ("always" or "madvise"). Measured
on a 2-core Zen 4 VM, `attention_with_cache` decode over a 128K-token bf16 `KVCache` (B=1, Hkv=8,
D=128, 2 threads), runs alternating: 13.7-14.0 GB/s without, 15.4-15.9 with (other runs on this
noisy VM showed less). This is advice only: where THP is "never",
on other systems or if the call fails, the cache is the same tensor in ordinary pages.
(PyTorch's own switch for every CPU allocation is the environment variable
THP_MEM_ALLOC_ENABLE=1.)

Storage someone else allocated and already touched (vLLM's KV cache, which the vLLM plugin reads
in place) can only be moved to huge pages afterwards: `collapse` asks Linux (6.1 or later) to do it
now (madvise MADV_COLLAPSE; the contents are kept, the call copies them into 2 MB pages). Measured
on a 2-core Sapphire Rapids VM with THP "madvise" (vLLM's page layout, 64-token pages in random
order, Dense decode, B 1, Hq 32, Hkv 8, D 128, bf16, 2 threads, each call after evicting the L3;
one process, the same pages in two pools, alternating): 128K keys 27.8 -> 25.2 ms (1.10x), 16K
keys 3.84 -> 3.30 ms (1.16x); collapsing the 510 MB pool took 1.4 s (Linux compacted memory for
it; 0.02 s for 62 MB with free huge pages at hand). `Background` does the same from a thread at
idle priority, for storage in use whose owner should not wait (the vLLM plugin's cache).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time

import torch

_log = logging.getLogger(__name__)

_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_MADV_COLLAPSE = 25  # Linux 6.1
_HUGE = 2 << 20
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).madvise
            f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            _madvise = f
        except (OSError, AttributeError):
            _madvise = False
    return _madvise or None


def advise_huge(t: torch.Tensor) -> bool:
    """Advise the whole 2 MB pages of a CPU tensor's storage as huge; True if the advice was given.
    Only useful before the storage is first touched."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    a, e = _whole_pages(t)
    f = _libc_madvise() if t.untyped_storage().nbytes() >= 2 * _HUGE else None
    return f is not None and e > a and f(a, e - a, _MADV_HUGEPAGE) == 0


def _whole_pages(t: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the whole 2 MB pages inside t's storage (start >= end: none)."""
    st = t.untyped_storage()
    p, nbytes = st.data_ptr(), st.nbytes()
    return (p + _HUGE - 1) & ~(_HUGE - 1), (p + nbytes) & ~(_HUGE - 1)


def collapse(t: torch.Tensor) -> int:
    """Move the whole 2 MB pages of a CPU tensor's storage (all of it, not only t's view) into huge
    pages now, keeping their contents (madvise MADV_COLLAPSE, Linux 6.1+; THP not "never").
    Returns the bytes collapsed: 0 where nothing could be (not Linux, too small, an older kernel,
    THP off, or Linux found no huge pages: the storage is then unchanged, in ordinary pages)."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return 0
    a, e = _whole_pages(t)
    f = _libc_madvise() if e > a else None
    if f is None:
        return 0
    f(a, e - a, _MADV_HUGEPAGE)  # later faults of the range in huge pages too (advice only)
    return e - a if f(a, e - a, _MADV_COLLAPSE) == 0 else 0


class Background:
    """`collapse` of one storage done by a daemon thread, 32 MB at a time, at idle CPU priority
    (Linux SCHED_IDLE: it runs where a core has nothing else to do), for storage that is already
    in use: Linux copies each 2 MB page under the process's memory map lock, so a thread reading or
    writing the storage meanwhile waits for that page's copy (~0.5 ms: 0.26 s per GiB measured with
    free 2 MB blocks at hand) and sees the same contents; the compaction Linux may need first (most
    of the cost: ~2.7-5 ms of kernel CPU per 2 MB measured on a 2-core VM) runs where a core is idle,
    not on the caller's path.
    Several storages are collapsed in turn, a slice of each, so the low addresses of every one go
    first. `wait(timeout)` waits for it (tests, benches); `done` is set when it has finished and
    `seconds` then holds the wall time it took."""

    SLICE = 32 << 20
    _queue: list = []  # jobs with slices left, in turn
    _lock = threading.Lock()
    _worker: threading.Thread | None = None

    def __init__(self, t: torch.Tensor, on_done=None):
        self.tensor, self.on_done = t, on_done  # (the reference keeps the storage alive until done)
        self.first, self.end = _whole_pages(t)
        self.next = self.first  # where the next slice starts
        self.started, self.seconds = time.perf_counter(), None
        self.done = threading.Event()

    @classmethod
    def start(cls, t: torch.Tensor, on_done=None) -> "Background | None":
        """Queue t's storage; None where nothing can be collapsed (not a CPU tensor on Linux, no
        whole 2 MB page, or no madvise). `on_done(job)` is called from the thread when it ends."""
        if t.device.type != "cpu" or not sys.platform.startswith("linux"):
            return None
        job = cls(t, on_done)
        f = _libc_madvise() if job.end > job.next else None
        if f is None:
            return None
        f(job.next, job.end - job.next, _MADV_HUGEPAGE)  # later faults of the range in huge pages too
        with cls._lock:
            cls._queue.append(job)
            if cls._worker is None:
                cls._worker = threading.Thread(target=cls._run, name="sparse_attn-huge-pages", daemon=True)
                cls._worker.start()
        return job

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def progress(self) -> tuple[int, int]:
        """(bytes the thread has been through, bytes it collapses in all)."""
        return self.next - self.first, self.end - self.first

    @classmethod
    def _run(cls):
        try:  # pid 0: this thread (Linux schedules threads)
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError) as e:  # it then competes with the caller's threads: say so
            _log.warning("sparse_attn: the huge-page move runs at normal priority (SCHED_IDLE refused: %s)", e)
        f = _libc_madvise()
        while True:
            with cls._lock:
                if not cls._queue:
                    cls._worker = None
                    return
                job = cls._queue.pop(0)
            n = min(cls.SLICE, job.end - job.next)
            f(job.next, n, _MADV_COLLAPSE)  # (a page Linux could not collapse stays as it was)
            job.next += n
            if job.next < job.end:
                with cls._lock:
                    cls._queue.append(job)
                continue
            job.seconds = time.perf_counter() - job.started
            if job.on_done is not None:
                try:
                    job.on_done(job)
                except Exception:  # a log line must not end the thread with other storages queued
                    _log.exception("sparse_attn: the huge-page move's on_done callback failed")
            job.tensor = None
            job.done.set()


def huge_bytes(t: torch.Tensor) -> int | None:
    """Bytes of huge pages (AnonHugePages) in the mappings that hold t's storage, from
    /proc/self/smaps; None where Linux does not say (a check for tests and logs)."""
    if not sys.platform.startswith("linux"):
        return None
    st = t.untyped_storage()
    lo, hi = st.data_ptr(), st.data_ptr() + st.nbytes()
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    a, b = (int(x, 16) for x in head.split("-"))
                    inside = a < hi and lo < b
                elif inside and head == "AnonHugePages:":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return total


def zeros(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros(shape), its storage advised as huge pages (CPU, Linux) before the zero fill."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    advise_huge(t)
    return t.zero_()
