"""KV caches for decode and chunked prefill: a contiguous cache and a paged cache (page table of
fixed-size pages, as vLLM and FlashInfer use), both appendable with per-sequence lengths, both
keeping the pooled key of every key block for TopK selection in O(blocks) per step."""
from .attend import attention_with_cache
from .contiguous import KVCache
from .paged import PagedKVCache

__all__ = ["KVCache", "PagedKVCache", "attention_with_cache"]
