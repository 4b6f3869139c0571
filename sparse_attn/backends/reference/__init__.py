"""`reference`: plain PyTorch on any device; readable, autograd-capable, never `Sq x Sk`."""
from ...scheduler.cache_problem import CACHE_OP
from ...scheduler.registry import register
from .cache import ReferenceCacheChunked
from .kernels import ReferenceChunked, ReferenceLinear, TorchSDPA
from .linear import ReferenceLinearRecurrent

register(ReferenceChunked())
register(TorchSDPA())
register(ReferenceLinear(), op="linear_attention")
register(ReferenceLinearRecurrent(), op="linear_attention")
register(ReferenceCacheChunked(), op=CACHE_OP)

from .window_linear_step import ReferenceWindowLinearStep  # noqa: E402

register(ReferenceWindowLinearStep(), op="window_linear_step")

from .delta import ReferenceDeltaChunked, ReferenceDeltaRecurrent  # noqa: E402

register(ReferenceDeltaChunked(), op="delta_rule")
register(ReferenceDeltaRecurrent(), op="delta_rule")
