"""KV caches: storage only. A contiguous cache and a paged cache (page table of fixed-size pages,
as vLLM and FlashInfer use), both appendable with per-sequence lengths, both keeping the running
block sums of their keys for TopK selection in O(blocks) per step, and a ring that keeps only
what a sliding window can still see. Each exposes one read view (`kv_view()` -> `KVView`); the
kernels that read it are planned by the scheduler (`sparse_attn.attention_with_cache`). Nothing
here imports a backend."""
from .contiguous import KVCache
from .paged import PagedKVCache
from .ring import RingKVCache
from .view import KVView

__all__ = ["KVCache", "PagedKVCache", "RingKVCache", "KVView", "attention_with_cache"]


def __getattr__(name):
    # `sparse_attn.cache.attention_with_cache` stays importable; it lives with the API (api/cache.py)
    if name == "attention_with_cache":
        from ..api.cache import attention_with_cache

        return attention_with_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
