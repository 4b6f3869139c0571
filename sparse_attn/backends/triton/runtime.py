"""What every Triton kernel class shares: where it may run (CUDA tensors, and CPU tensors only in
Triton's interpreter, `TRITON_INTERPRET=1`) and how it says that Triton cannot be used here."""
from __future__ import annotations

import contextlib
import os


def interpreting() -> bool:
    """True when Triton's interpreter is on: `@triton.jit` read this when the kernels were defined."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonKernelMixin:
    """Put before `Kernel` / `FlashKernel` in the bases; a subclass reports its import failure
    through `import_error()` (None when its Triton modules imported)."""

    backend = "triton"

    @property
    def devices(self):
        return ("cuda", "cpu") if interpreting() else ("cuda",)

    def import_error(self) -> str | None:
        return None

    def unavailable(self):
        err = self.import_error()
        return f"triton cannot be used here ({err})" if err else None


_STATIC_GPU = False


@contextlib.contextmanager
def gpu_launch_choices():
    """Inside this block the launchers make the choices they make for CUDA tensors (tile sizes,
    matrix-product precision) also for CPU tensors. Only `bench/gpu_static.py` uses it: it records
    the launches of CPU tensors (nothing runs) and compiles them for sm_80 / sm_90 without a GPU."""
    global _STATIC_GPU
    old, _STATIC_GPU = _STATIC_GPU, True
    try:
        yield
    finally:
        _STATIC_GPU = old


def on_gpu(t) -> bool:
    """Whether a launch over tensor `t` takes the GPU's choices (a CUDA tensor, or a recorded one)."""
    return t.device.type == "cuda" or _STATIC_GPU
