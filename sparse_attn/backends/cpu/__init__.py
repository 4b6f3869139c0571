"""`cpu`: C++ kernels for x86 / Arm CPUs, built just in time from csrc/cpu on first use."""
from ...scheduler.registry import register
from .kernels import CpuBlockSparse

register(CpuBlockSparse())

from . import decode  # noqa: F401,E402  (registers its own kernels)
from . import linear  # noqa: F401,E402  (registers cpu.linear_chunked for linear_attention)
from . import linear_step  # noqa: F401,E402  (cpu.linear_step for linear_attention decode)
from . import window_linear_step  # noqa: F401,E402  (cpu.window_linear_step)

from .delta import CpuDeltaChunked, CpuDeltaStep  # noqa: E402

register(CpuDeltaChunked(), op="delta_rule")
register(CpuDeltaStep(), op="delta_rule")
