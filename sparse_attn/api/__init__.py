"""The public API: functions and modules."""
from .functional import attention, attention_varlen, linear_attention, plan, select_blocks
from .modules import SparseAttention

__all__ = ["attention", "attention_varlen", "linear_attention", "plan", "select_blocks", "SparseAttention"]
