"""A decode problem: query rows against a cache's read view, validated once (`attention_with_cache`).

Decode kernels register under the op `CACHE_OP` and answer, like every kernel, "why not" and "how
much" from the problem alone: it is a :class:`~sparse_attn.scheduler.Problem` whose `sk` is the
longest sequence the cache holds, plus the cache's kind (a kernel declares the kinds it reads,
`Kernel.cache_kinds`). Everything here is host work on the cache's host bookkeeping: no device
read, so a decode step can be planned inside a CUDA-graph capture.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import SOFTMAX_PATTERNS, BlockSparse, InfLLMv2
from .device import device_info
from .problem import CHUNKED, DECODE, TRAINING, Problem, check_scale, check_softmax_options, effective_pattern

#: the scheduler's op name of attention over a cache
CACHE_OP = "attention_with_cache"


@dataclass(frozen=True)
class CacheProblem(Problem):
    """A `Problem` over a cache: `sk` is the longest sequence held (host lengths); each sequence's
    rows are end-aligned to its own length."""

    cache_kind: str = "contiguous"
    #: the storage's quantization: None, "int8" or "fp8_e4m3" (a kernel declares `kv_dtypes`)
    kv_dtype: str | None = None
    page_size: int = 0
    cache_text: str = ""
    #: the pattern as the caller gave it; `pattern` is what runs at the cache's current length
    #: (`effective_pattern`: clamped, or Dense while it covers every key), which changes as the cache
    #: grows, so a plan compares and reruns this one
    asked_pattern: object = None

    @property
    def phase(self) -> str:
        # rows that extend a cache are decode (one) or chunked prefill (several), whatever Sk is
        if self.requires_grad:
            return TRAINING
        return DECODE if self.sq == 1 else CHUNKED

    def describe(self) -> str:
        return f"{super().describe()}, {self.cache_text}"

    def same_call(self, other: "CacheProblem") -> bool:
        """True when `other` is this call again, the cache possibly longer (what a plan may run)."""
        fields = ("batch", "q_heads", "kv_heads", "sq", "head_dim", "v_head_dim", "dtype", "device", "scale",
                  "requires_grad", "cache_kind", "kv_dtype", "page_size", "softcap", "sinks")
        same = all(getattr(self, f) == getattr(other, f) for f in fields)
        return same and self.asked_pattern == other.asked_pattern


def validate_cache_call(q, cache, pattern, *, scale=None):
    """The one validation of a call over a cache (`attention_with_cache`, `plan_with_cache`,
    `CachePlan.run`). Returns `(view, scale)`; raises `TypeError` / `ValueError` naming the
    argument. Checks that need the cache's bookkeeping (a released range, issue 20) belong here."""
    view_of = getattr(cache, "kv_view", None)
    if not callable(view_of):
        raise TypeError(f"cache must be a KVCache or PagedKVCache (an object with kv_view()), got "
                        f"{type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not isinstance(pattern, SOFTMAX_PATTERNS + (InfLLMv2,)):
        raise TypeError(f"pattern must be one of {[p.__name__ for p in SOFTMAX_PATTERNS + (InfLLMv2,)]} for "
                        f"attention over a cache, got {type(pattern).__name__}")
    view = view_of()
    if isinstance(pattern, InfLLMv2) and getattr(view, "compressed", None) is None:
        raise TypeError(f"InfLLMv2 over a cache needs its compressed keys, which {type(cache).__name__} does not "
                        f"keep: use a KVCache or PagedKVCache")
    if q.dim() != 4 or q.shape[0] != view.batch or q.shape[3] != view.head_dim:
        raise ValueError(f"q must have shape (B={view.batch}, Hq, Sq, D={view.head_dim}), got {tuple(q.shape)}")
    if q.shape[1] % view.kv_heads:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of the cache's kv_heads ({view.kv_heads})")
    if q.dtype != view.dtype:
        raise TypeError(f"q must have the cache's dtype {view.dtype}, got {q.dtype}")
    if q.device != view.device:
        raise ValueError(f"q is on {q.device} but the cache is on {view.device}")
    short = [b for b, n in enumerate(view.host_lengths) if n < q.shape[2]]
    if short:
        raise ValueError(f"sequences {short} hold fewer tokens than q has rows ({q.shape[2]}): append the "
                         f"queries' own keys to the cache first (lengths {list(view.host_lengths)})")
    check_reach = getattr(cache, "check_reach", None)  # never read what release_outside / free gave back
    if check_reach is not None:
        check_reach(pattern, q.shape[2])
    pool = pattern.pool_block()
    if pool is not None and pool != view.pool_block_size:
        raise ValueError(f"{type(pattern).__name__}.block_size ({pool}) must equal the cache's pool_block_size "
                         f"({view.pool_block_size})")
    if isinstance(pattern, BlockSparse):
        nb = -(-view.max_length // pattern.block_size)
        lay = pattern.layout
        if lay.shape[0] not in (1, view.batch) or lay.shape[1] not in (1, view.kv_heads) or lay.shape[2] < nb \
                or lay.shape[3] < nb:
            raise ValueError(f"BlockSparse.layout must have shape (B or 1, Hkv or 1, >= {nb}, >= {nb}) for this "
                             f"cache, got {tuple(lay.shape)}")
    return view, check_scale(scale, q.shape[3])


def make_cache_problem(q, cache, pattern, *, scale=None, sink_logits=None, softcap=None):
    """Validate a call over a cache and describe it: `(CacheProblem, view)`."""
    view, sc = validate_cache_call(q, cache, pattern, scale=scale)
    softcap = check_softmax_options(pattern, sink_logits, softcap, q_heads=q.shape[1], device=q.device)
    # integers beyond the longest sequence mean what its length means, and a pattern that sees every
    # causal key of the longest sequence (a TopK selecting all its candidates, a window longer than
    # it, InfLLMv2 below dense_len) runs as Dense: each shorter sequence is covered too. Decided per
    # call from the host lengths (`CachePlan.run` remakes this as the cache grows). A TopK that is
    # not covered has more keys than one block, so its block size (the cache's pooling) stays
    asked = pattern
    pattern, requested = effective_pattern(pattern, view.max_length)
    b, hq, sq, d = q.shape
    problem = CacheProblem(batch=b, q_heads=hq, kv_heads=view.kv_heads, sq=sq, sk=view.max_length, head_dim=d,
                           v_head_dim=view.v_head_dim, dtype=q.dtype, device=device_info(q.device), pattern=pattern,
                           scale=sc, requires_grad=bool(torch.is_grad_enabled() and any(
                               t is not None and t.requires_grad for t in (q, sink_logits))),
                           cache_kind=view.kind, kv_dtype=view.quant, page_size=view.page_size,
                           cache_text=view.describe(), torch_device=q.device, asked_pattern=asked, softcap=softcap,
                           sinks=sink_logits is not None, requested=requested)
    return problem, view


def kv_elem_bytes(p) -> float:
    """Bytes per K/V element a decode kernel reads for `p`: the dtype's size, or for a quantized
    cache one byte plus the row's float32 scale spread over the row."""
    if getattr(p, "kv_dtype", None) is None:
        return torch.finfo(p.dtype).bits / 8
    return 1.0 + 4.0 / max(1, p.head_dim)
