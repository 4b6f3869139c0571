"""What every Triton kernel class shares: where it may run (CUDA tensors, and CPU tensors only in
Triton's interpreter, `TRITON_INTERPRET=1`) and how it says that Triton cannot be used here."""
from __future__ import annotations

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
