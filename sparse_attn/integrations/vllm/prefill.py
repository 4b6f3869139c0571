"""One prefill request of a vLLM step through sparse_attn, as the plugin runs it (no vLLM import).

Every attention layer of a step sees the same request shapes, so the scheduler's choice (`plan()`:
~70 us of host work, 5% of a 1K-token first chunk on 2 cores) is made once per (pattern, shapes,
dtype, scale, soft-cap, sinks or not) and kept for every later layer and step with those; the plan's
`run` checks that the call is the one it was made for (`ValueError` otherwise, never a wrong
kernel). The kernel writes its result into vLLM's `(T, Hq, Dv)` output rows: through the plan's
`prepared()` re-run where it has one (the CPU kernel on Dense / SlidingWindow without sinks, grad
off: the binding called with the kept layout, checking the tensors in C++; 23-63 us less per call
than `run`'s Python checks and layout lookup, measured right after a kernel call), else through
`Plan.run(out=)` (in place for the CPU kernel, a copy for a kernel without `writes_out` or with
learned sinks).
"""
from __future__ import annotations

import torch

from ...api.functional import plan

#: plans kept at once (distinct request shapes; cleared whole when full: a long-running server sees
#: new prompt lengths all the time)
MAX_PLANS = 256
_PLANS: dict = {}


def _heads_major(t: torch.Tensor) -> torch.Tensor:
    """`(S, H, D)` rows as the `(1, H, S, D)` view the plans take; a 4-D tensor as it is."""
    return t.transpose(0, 1)[None] if t.dim() == 3 else t


def run_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, opts: dict,
                out_rows: torch.Tensor) -> torch.Tensor:
    """`attention(q, k, v, pattern, **opts)` written into `out_rows` `(T, Hq, Dv)`; `q` is vLLM's
    query rows `(T, Hq, D)`, `k` / `v` its new key rows `(S, Hkv, D)` (a first chunk) or gathered
    keys `(1, Hkv, S, D)` (`pages.gather_keys`), `opts` the plugin's keywords (`scale`, and
    `softcap` / `sink_logits` where the layer has them). Rows go to the prepared re-run as they
    are (the binding reads their strides: no views made here); the plan's `run` gets `(1, H, S,
    D)` views."""
    sinks = opts.get("sink_logits")
    grad = torch.is_grad_enabled()
    key = (pattern, q.shape, k.shape, v.shape, q.dtype, q.device, opts.get("scale"), opts.get("softcap"),
           sinks is not None, grad)
    kept = _PLANS.get(key)
    if kept is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        p = plan(_heads_major(q), _heads_major(k), _heads_major(v), pattern, **opts)
        kept = _PLANS[key] = (p, None if grad else p.prepared())
    p, fast = kept
    if fast is not None and k.dim() == 3:
        fast.run(q, k, v, out_rows)  # the kernel writes vLLM's rows
        return out_rows
    q4, k4, v4, out = _heads_major(q), _heads_major(k), _heads_major(v), _heads_major(out_rows)
    if fast is not None:
        fast.run(q4, k4, v4, out)
    else:
        p.run(q4, k4, v4, sink_logits=sinks, out=out)
    return out_rows
