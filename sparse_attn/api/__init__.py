"""The public API: functions and modules."""
from .functional import attention, attention_varlen, plan, select_blocks
from .linear import linear_attention
from .modules import SparseAttention

__all__ = ["attention", "attention_varlen", "linear_attention", "plan", "select_blocks", "SparseAttention"]
