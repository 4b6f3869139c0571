"""sparse_attn: block-sparse, sliding-window and linear-attention kernels for long contexts.

The semantics of every op are fixed by the contract (docs/contract.md); kernels differ in speed,
never in meaning. `plan(...).explain()` shows which kernel runs a call and why.
"""
from .api import SparseAttention, attention, attention_varlen, linear_attention, plan, select_blocks
from .api.hybrid import HybridCache, HybridStack, hybrid_layers
from .api.linear import plan_linear
from .api.delta import delta_rule, delta_rule_varlen, plan_delta_rule
from .cache import KVCache, PagedKVCache, attention_with_cache
from .layout import BlockLayout, build_layout
from .patterns import BlockSparse, Dense, Pattern, SlidingWindow, TopK, WindowLinear

__version__ = "0.1.0"

__all__ = ["attention", "attention_varlen", "linear_attention", "plan", "select_blocks", "SparseAttention",
           "Dense", "SlidingWindow", "BlockSparse", "TopK", "WindowLinear", "Pattern", "BlockLayout",
           "build_layout", "KVCache", "PagedKVCache", "attention_with_cache", "plan_linear", "hybrid_layers", "HybridStack",
           "HybridCache", "delta_rule", "delta_rule_varlen", "plan_delta_rule", "__version__"]
