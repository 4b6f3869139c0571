"""`cuda`: CUDA C++ kernels (csrc/cuda/), built just in time on machines with a CUDA build of torch.

On a machine without one, the kernels still register and `plan(...).explain()` says why they
cannot run."""
from ...scheduler.cache_problem import CACHE_OP
from ...scheduler.registry import register
from .paged_decode import CudaCacheDecode, CudaSplitKVDecode

register(CudaSplitKVDecode())
register(CudaCacheDecode(), op=CACHE_OP)
