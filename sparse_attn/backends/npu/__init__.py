"""`npu`: Ascend NPU kernels through torch_npu. Written against the documented torch_npu API and
UNTESTED ON HARDWARE (no NPU was reachable when it was written): where torch_npu is not installed
the kernels register and `plan(...).explain()` says why they cannot run."""
from ...scheduler.registry import register
from .fusion_attention import NpuFusionAttention

register(NpuFusionAttention())
