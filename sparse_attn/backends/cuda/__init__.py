"""`cuda`: CUDA C++ kernels (csrc/cuda/), built just in time on machines with a CUDA build of torch.

On a machine without one, the kernels still register and `plan(...).explain()` says why they
cannot run."""
from ...scheduler.registry import register
from .paged_decode import CudaSplitKVDecode

register(CudaSplitKVDecode())
