"""`triton`: Triton kernels for the GPU (and for CPU tensors under TRITON_INTERPRET=1, which is how
CI runs them). Each module registers its kernels; without a usable Triton they still register
and report why they cannot run (`Kernel.unavailable`)."""
from . import attention  # noqa: F401
from . import linear  # noqa: F401

from ...scheduler.cache_problem import CACHE_OP  # noqa: E402
from ...scheduler.registry import register  # noqa: E402
from .decode import TritonCacheDecode, TritonSplitKVDecode  # noqa: E402

register(TritonSplitKVDecode())
register(TritonCacheDecode(), op=CACHE_OP)

from . import linear_step  # noqa: E402,F401  (triton.linear_step for linear_attention decode)
from . import window_linear_step  # noqa: E402,F401  (triton.window_linear_step)
from . import delta  # noqa: E402,F401  (triton.delta_chunked, triton.delta_step for delta_rule)
