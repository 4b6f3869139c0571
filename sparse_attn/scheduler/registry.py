"""The kernel registry: backends register their kernels once, at import."""
from __future__ import annotations

_KERNELS: dict[str, list] = {}


def register(kernel, *, op: str = "attention"):
    """Add a kernel instance for `op` ("attention" or "linear_attention"); returns it."""
    _KERNELS.setdefault(op, []).append(kernel)
    return kernel


def kernels(op: str = "attention") -> list:
    from .. import backends  # noqa: F401  (registers the built-in kernels on first use)

    return list(_KERNELS.get(op, []))
