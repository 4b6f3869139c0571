"""Context parallelism: one sequence sharded over the ranks of a `torch.distributed` process group
(gloo on CPU, NCCL on GPU), computing exactly what one process computes on the whole sequence.

* `shard` / `unshard` — the `zigzag` (balanced causal work) and `contiguous` layouts (sharding.py);
* `cp_attention`, `cp_plan` — softmax patterns, sparse-aware fetching, forward and backward
  (attention.py, fetch_plan.py, segment.py, transport.py);
* `cp_linear_attention` — linear attention with a scan of states over the ranks (linear.py);
* `cp_delta_rule` — the delta rule (DeltaNet, Gated DeltaNet, KDA), a scan of affine state maps (delta.py);
* `ShardedKVCache` — decode over a context stored across ranks (cache.py);
* `count_bytes` — what this process sent, for measurements and tests.

Launching, memory and traffic: docs/distributed.md.
"""
from .attention import cp_attention, cp_plan
from .cache import ShardedKVCache
from .delta import cp_delta_rule
from .linear import cp_linear_attention
from .sharding import shard, unshard
from .transport import count_bytes

__all__ = ["shard", "unshard", "cp_attention", "cp_plan", "cp_linear_attention", "cp_delta_rule", "ShardedKVCache", "count_bytes"]
