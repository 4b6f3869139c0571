"""Attention over a KV cache, planned like `attention`: `attention_with_cache` and `plan_with_cache`.

The flow is storage -> view -> plan -> kernel: a cache (`KVCache`, `PagedKVCache`, ...) is
storage; `cache.kv_view()` describes it in one record (`cache/view.py`); the call is validated
once into a `CacheProblem` (`scheduler/cache_problem.py`); every kernel registered for the
"attention_with_cache" op gives its reasons not to run it (cache kinds, dtypes, rows, ...) and its
cost; the cheapest runs over the view. Planning and running read no device value.
"""
from __future__ import annotations

import torch

from ..patterns import Dense
from ..scheduler.cache_problem import CACHE_OP, make_cache_problem
from ..scheduler.kernel import with_sinks
from ..scheduler.plan import Plan, choose
from ..scheduler.problem import check_backend


class CachePlan(Plan):
    """A `Plan` for `attention_with_cache`: `.run(q, cache)` runs the chosen kernel over the
    cache's current view. It runs the call it was made for (same shapes, dtype, device, cache
    kind, pattern); the cache may have grown since (every size is read from the view at run)."""

    def run(self, q, cache, *, sink_logits=None):
        problem, view = make_cache_problem(q, cache, self.problem.asked_pattern, scale=self.problem.scale,
                                           sink_logits=sink_logits, softcap=self.problem.softcap)
        if not self.problem.same_call(problem):
            raise ValueError(f"this plan was made for {self.problem.describe()}; it cannot run "
                             f"{problem.describe()}: plan the new call (plan_with_cache)")
        if type(problem.pattern) is not type(self.problem.pattern):  # e.g. a TopK that ran as Dense
            why = self.kernel.not_supported_reasons(problem)  # while the cache was short now selects
            if why:
                raise ValueError(f"this plan's kernel {self.kernel.name} cannot run {problem.describe()}: "
                                 f"{'; '.join(why)}; plan the new call (plan_with_cache)")
        return _run(self.kernel, q, view, problem, sink_logits)

    def prepared(self, cache):
        """A lighter re-run of this plan for a loop that decodes over the same storage every step:
        an object whose `run(q, lengths, page_table, out)` calls the chosen kernel with only the
        step's tensors (checked by the kernel's binding: shapes, dtypes, lengths, page ids),
        writing `out` in place; None when the chosen kernel has none for this call (see
        `CpuCacheDecode.prepared`). The plan's choice stands (`explain()`); what the full
        validation of `run` checks once -- q's heads, head dim, dtype, the pattern and options --
        the caller keeps the same (the vLLM backend: one per layer, batch size and cache tensor).
        A pattern that runs as Dense only while the sequences are short (a TopK, InfLLMv2) gets the
        Dense re-run with a bound: its `longest` attribute (None: no bound) is the longest sequence
        it may be given; the binding refuses a longer one, and the caller runs `run` past it."""
        make = getattr(self.kernel, "prepared", None)
        return None if make is None else make(self.problem, cache.kv_view())


def _run(kernel, q, view, problem, sink_logits=None):
    if problem.is_empty:
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2], view.v_head_dim)
    return kernel.run_cache(q, view, problem, **with_sinks(sink_logits))


def plan_with_cache(q, cache, pattern=Dense(), *, scale=None, backend=None, sink_logits=None,
                    softcap=None) -> CachePlan:
    """The scheduler's decision for `attention_with_cache(q, cache, pattern, ...)`, without running it.

    Returns a :class:`CachePlan`: `.kernel` is the chosen decode kernel, `.run(q, cache)` runs it,
    and `.explain()` lists every kernel of the op with its estimated cost or its reasons not to run
    (as `plan(...).explain()` does). Host work only. Planned with `sink_logits`, the plan runs
    as `.run(q, cache, sink_logits=...)`.
    """
    check_backend(backend)
    problem, _ = make_cache_problem(q, cache, pattern, scale=scale, sink_logits=sink_logits, softcap=softcap)
    p = choose(problem, backend=backend, op=CACHE_OP)
    return CachePlan(problem=p.problem, candidates=p.candidates, kernel=p.kernel, backend_request=backend)


def attention_with_cache(q: torch.Tensor, cache, pattern=Dense(), *, scale=None, backend=None, sink_logits=None,
                         softcap=None) -> torch.Tensor:
    """Attention of `q` `(B, Hq, Sq, D)` over the keys and values held in `cache`.

    Sequence `b`'s query rows are end-aligned to its own length (append their keys first). Returns
    `(B, Hq, Sq, Dv)` in q's dtype; rows with no visible key give zeros. Dense, SlidingWindow,
    BlockSparse (layout indexed by absolute positions) and TopK (selected from the cache's block
    means: the same selection as `attention` on the full sequence). `sink_logits` `(Hq,)` and
    `softcap` as in :func:`~sparse_attn.attention`.

    `backend`: None lets the scheduler choose among the decode kernels registered for caches
    (`plan_with_cache(...).explain()` shows the candidates: the split-KV kernels of csrc/cpu,
    csrc/cuda and Triton for Sq <= 16 and no autograd, the chunked PyTorch loop for anything);
    a named backend that cannot run the call raises `ValueError` with its reasons.
    Differentiable in q only through the PyTorch loop (plain autograd); meant for inference.
    """
    check_backend(backend)
    if getattr(cache, "is_sharded", False):  # sparse_attn.distributed.ShardedKVCache: a collective step
        if sink_logits is not None or softcap is not None:
            raise ValueError("sink_logits and softcap are not implemented for a ShardedKVCache (context "
                             "parallel decode); use a KVCache or PagedKVCache")
        return cache.attend(q, pattern, scale=scale)
    problem, view = make_cache_problem(q, cache, pattern, scale=scale, sink_logits=sink_logits, softcap=softcap)
    if problem.is_empty:
        return _run(None, q, view, problem)
    return _run(choose(problem, backend=backend, op=CACHE_OP).kernel, q, view, problem, sink_logits)
