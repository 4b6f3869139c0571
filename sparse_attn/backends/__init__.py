"""Backends: one folder each; importing this package registers every kernel with the scheduler.

A backend whose dependencies are missing still registers its kernels; they report why they
cannot run (`Kernel.unavailable`), which `plan(...).explain()` shows.
"""
from . import reference  # noqa: F401
from . import cpu  # noqa: F401,E402
from . import triton  # noqa: F401,E402
from . import cuda  # noqa: F401,E402
from . import npu  # noqa: F401,E402
