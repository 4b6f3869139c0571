"""sparse_attn: block-sparse, sliding-window and linear-attention kernels for long contexts.

The semantics of every op are fixed by the contract (docs/contract.md); kernels differ in speed,
never in meaning. `plan(...).explain()` shows which kernel runs a call and why.
"""
from .api import SparseAttention, attention, attention_varlen, linear_attention, plan, select_blocks
from .api.cache import attention_with_cache, plan_with_cache
from .api.delta import delta_rule, delta_rule_varlen, plan_delta_rule
from .api.hybrid import HybridCache, HybridStack, hybrid_layers
from .api.linear import linear_decode_step, plan_linear
from .api.model_cache import ModelCache
from .api.window_linear import WindowLinearDecoder
from .cache import KVCache, PagedKVCache
from .layout import BlockLayout, build_layout
from .patterns import BlockSparse, Dense, InfLLMv2, Pattern, SlidingWindow, TopK, WindowLinear

__version__ = "0.1.0"

__all__ = ["attention", "attention_varlen", "linear_attention", "plan", "select_blocks", "SparseAttention",
           "Dense", "SlidingWindow", "BlockSparse", "TopK", "WindowLinear", "InfLLMv2", "Pattern", "BlockLayout",
           "build_layout", "KVCache", "PagedKVCache", "attention_with_cache", "plan_with_cache", "plan_linear",
           "hybrid_layers", "HybridStack", "HybridCache", "ModelCache", "linear_decode_step", "WindowLinearDecoder",
           "delta_rule", "delta_rule_varlen", "plan_delta_rule", "__version__"]


def __getattr__(name):
    # `sparse_attn.distributed` is imported on first use only: importing sparse_attn must not pull
    # in process-group machinery (slow, or absent from some torch builds)
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'sparse_attn' has no attribute {name!r}")
