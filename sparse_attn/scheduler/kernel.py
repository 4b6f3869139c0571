"""`Kernel`: what one kernel declares (capabilities), refuses (reasons) and costs (estimate).

The scheduler never special-cases a kernel: it asks every registered kernel for its reasons not
to run a `Problem`, keeps those with none, and ranks them by `cost()`. Capabilities are class
attributes so the docs and the tests can read them too.
"""
from __future__ import annotations

import torch

from .problem import Problem


class Kernel:
    name: str = "?"
    backend: str = "?"
    #: torch device types this kernel runs on; None = any
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    #: pattern classes served (contract patterns, or the internal LinearAttention marker)
    patterns: tuple[type, ...] = ()
    head_dims: tuple[int, int] = (1, 1 << 16)  # inclusive range
    supports_backward: bool = False
    #: phases this kernel is meant for; the others get a reason
    phases: tuple[str, ...] = ("prefill", "chunked-prefill", "decode", "training")
    #: cache layouts (`KVView.kind`) a kernel of the "attention_with_cache" op reads
    cache_kinds: tuple[str, ...] = ()
    #: cache storage it reads: None (rows in the queries' dtype) and/or quantized "int8" / "fp8_e4m3"
    kv_dtypes: tuple = (None,)
    #: the softmax options (contract, "Learned sinks and logit soft-capping"): a kernel that does
    #: not compute one declares it here, and the scheduler never gives it a call that asks for it
    supports_sinks: bool = False
    supports_softcap: bool = False
    #: runs a packed varlen call (`attention_varlen`) over all sequences at once (backends/flash_varlen.py)
    supports_varlen: bool = False

    def unavailable(self) -> str | None:
        """Why this kernel cannot run in this process at all (missing package, failed build)."""
        return None

    def extra_reasons(self, p: Problem) -> list[str]:
        return []

    def preload(self, pattern) -> str | None:
        """Load now what a call serving `pattern` would load on first use (compiled extensions:
        each load runs torch's build check, tens of ms even when the build is cached). Returns why
        this kernel cannot run here, None when it can. Default: `unavailable()`, which loads the
        kernel's extension; a kernel whose selection for some patterns is a second extension
        loads that too (`scheduler.preload` asks every kernel that could serve the pattern)."""
        return self.unavailable()

    def not_supported_reasons(self, p: Problem) -> list[str]:
        # the device first: a kernel for another device is refused without asking whether it could
        # run here (a CPU kernel's answer builds its C++ extension: minutes, on a GPU machine, for nothing)
        if self.devices is not None and p.device.type not in self.devices:
            return [f"device {p.device.type} not in {self.devices}"]
        why = []
        missing = self.unavailable()
        if missing:
            return [missing]
        if p.dtype not in self.dtypes:
            why.append(f"dtype {str(p.dtype).replace('torch.', '')} not supported")
        if not isinstance(p.pattern, self.patterns):
            why.append(f"pattern {type(p.pattern).__name__} not supported")
        lo, hi = self.head_dims
        if not (lo <= p.head_dim <= hi and lo <= p.v_head_dim <= hi):
            why.append(f"head dims {p.head_dim}/{p.v_head_dim} outside [{lo}, {hi}]")
        if p.requires_grad and not self.supports_backward:
            why.append("no backward pass (inputs require grad)")
        if p.phase not in self.phases:
            why.append(f"not meant for phase {p.phase}")
        if getattr(p, "sinks", False) and not self.supports_sinks:
            why.append("learned sinks (sink_logits) not implemented")
        if getattr(p, "softcap", None) is not None and not self.supports_softcap:
            why.append("softcap not implemented")
        if getattr(p, "varlen", False) and not self.supports_varlen:
            why.append("packed varlen not implemented (attention_varlen calls it once per sequence)")
        kind = getattr(p, "cache_kind", None)  # a CacheProblem
        if kind is not None and kind not in self.cache_kinds:
            why.append(f"does not read a {kind} cache")
        quant = getattr(p, "kv_dtype", None)
        if kind is not None and quant not in self.kv_dtypes:
            why.append(f"does not read {quant or 'unquantized'} storage (reads {self.kv_dtypes})")
        return why + self.extra_reasons(p)

    def cost(self, p: Problem) -> float:
        """Estimated seconds: a roofline over the FLOPs and bytes this kernel really touches."""
        raise NotImplementedError

    def run(self, q, k, v, p: Problem, *, gate=None, sink_logits=None) -> torch.Tensor:
        """`sink_logits` is passed only to kernels that declare `supports_sinks` (`with_sinks`), so a
        kernel written before the option keeps its `run(q, k, v, p, *, gate=None)`."""
        raise NotImplementedError

    #: `run_into` writes the rows in place (no result tensor, no copy); otherwise it copies `run`'s
    writes_out: bool = False

    def run_into(self, q, k, v, p: Problem, out: torch.Tensor, *, gate=None, sink_logits=None) -> torch.Tensor:
        """`run`, its `(B, Hq, Sq, Dv)` result written into `out` (inference only; `Plan.run(out=)`
        checks `out`). This default copies `run`'s result; a kernel that writes its rows in place
        overrides it and sets `writes_out` (`explain()` says which)."""
        return out.copy_(self.run(q, k, v, p, gate=gate, **with_sinks(sink_logits)))

    def run_cache(self, q, view, p: Problem, *, sink_logits=None) -> torch.Tensor:
        """Attention of `q` `(B, Hq, Sq, D)` over a cache's read view (`KVView`): the
        "attention_with_cache" op. Returns `(B, Hq, Sq, Dv)` in q's dtype. `sink_logits` `(Hq,)`
        is given only to kernels that declare `supports_sinks` (and only when `p.sinks`)."""
        raise NotImplementedError(f"{self.name} does not read caches")

    def __repr__(self):
        return f"<kernel {self.name} ({self.backend})>"


def with_sinks(sink_logits) -> dict:
    """The keyword arguments that carry `sink_logits` to `Kernel.run` / `run_cache`: none without sinks."""
    return {} if sink_logits is None else {"sink_logits": sink_logits}


def roofline_seconds(p: Problem, *, flops: float, bytes_moved: float, efficiency: float,
                     overhead_s: float = 0.0, compute_dtype: torch.dtype | None = None) -> float:
    """max(compute, memory) time at `efficiency` of the device's peak, plus fixed overhead.
    `compute_dtype`: the dtype the arithmetic really runs in, when not the inputs' (e.g. float32
    accumulation of bfloat16 inputs without bf16 dot products)."""
    compute = flops / (p.device.peak_tflops(compute_dtype or p.dtype) * 1e12 * efficiency)
    memory = bytes_moved / (p.device.bandwidth_gbs * 1e9 * efficiency)
    return max(compute, memory) + overhead_s
