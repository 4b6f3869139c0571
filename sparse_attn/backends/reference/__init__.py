"""`reference`: plain PyTorch on any device; readable, autograd-capable, never `Sq x Sk`."""
from ...scheduler.registry import register
from .kernels import ReferenceChunked, ReferenceLinear, TorchSDPA
from .linear import ReferenceLinearRecurrent

register(ReferenceChunked())
register(TorchSDPA())
register(ReferenceLinear(), op="linear_attention")
register(ReferenceLinearRecurrent(), op="linear_attention")

from .delta import ReferenceDeltaChunked, ReferenceDeltaRecurrent  # noqa: E402

register(ReferenceDeltaChunked(), op="delta_rule")
register(ReferenceDeltaRecurrent(), op="delta_rule")
