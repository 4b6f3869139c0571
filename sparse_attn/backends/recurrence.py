"""`RecurrenceKernel`: the base of the kernels of a linear recurrence with a matrix state (the
delta rule today; `linear_attention`'s kernels predate it).

What varies between such kernels is declared, as for softmax kernels (scheduler/kernel.py):
- `form`: "chunked" (prefill, training: the sequence cut into chunks, products within a chunk,
  the state carried across chunks) or "recurrent" (token by token: decode, a few tokens);
- `decays`: the decay kinds served (the problem marker's `decay`);
- `max_tokens`: the longest input a recurrent form is meant for;
- `chunk`: tokens per chunk (chunked forms), used by the cost;
- `efficiency`, `overhead_s`, `per_step_overhead_s`: the cost model's constants.

The cost is the marker's work (`chunked_flops` / `step_flops`, `state_bytes`, `io_bytes`: the
recurrence knows its arithmetic, patterns/delta.py) on the device's roofline at the kernel's
efficiency, plus host overheads; a kernel implements `forward` only. So a new recurrence is one
marker and its kernels, and a new kernel of the delta rule is one subclass.
"""
from __future__ import annotations

import torch

from ..scheduler.kernel import Kernel, roofline_seconds
from ..scheduler.problem import TRAINING

#: forward + backward over forward, in FLOPs (the chunked backward recomputes the chunk's
#: triangles and solves, then runs ~2x the forward's state products)
BACKWARD_FLOP_FACTOR = 3.0


class RecurrenceKernel(Kernel):
    form: str = "chunked"
    decays: tuple[str, ...] = ("none", "per-token", "per-channel")
    max_tokens: int | None = None
    chunk: int = 64
    efficiency: float = 0.5
    overhead_s: float = 30e-6
    #: host cost of each sequential step (a chunk of the chunked form, a token of the recurrent
    #: one) for kernels that run the steps as separate PyTorch ops
    per_step_overhead_s: float = 0.0
    #: with gradients, the same per step again (autograd nodes and their backward)
    backward_step_factor: float = 3.0
    #: reads shared q/k heads in place (value heads `Hv = G * Hk`); every kernel here does
    native_gqa = True

    def chunk_for(self, p) -> int:
        return self.chunk

    def extra_reasons(self, p) -> list[str]:
        why = []
        kind = getattr(p.pattern, "decay", "none")
        if kind not in self.decays:
            why.append(f"decay {kind} not supported (serves {', '.join(self.decays)})")
        if self.max_tokens is not None and p.sq > self.max_tokens:
            why.append(f"S={p.sq} > {self.max_tokens}: steps token by token (decode); "
                       "a chunked kernel serves long inputs")
        return why + self.more_reasons(p)

    def more_reasons(self, p) -> list[str]:
        return []

    def cost(self, p) -> float:
        rec = p.pattern
        s = max(p.sq, 1)
        if self.form == "chunked":
            flops = rec.chunked_flops(p, self.chunk_for(p))
            steps = -(-s // self.chunk_for(p))
        else:
            flops = rec.step_flops(p)
            steps = s
        train = p.phase == TRAINING
        if train:
            flops *= BACKWARD_FLOP_FACTOR
        elem = torch.finfo(p.dtype).bits // 8
        nbytes = rec.state_bytes(p) + rec.io_bytes(p, elem) * (2 if train else 1)
        overhead = self.overhead_s + steps * self.per_step_overhead_s * (self.backward_step_factor if train else 1)
        return roofline_seconds(p, flops=flops, bytes_moved=nbytes, efficiency=self.efficiency,
                                overhead_s=overhead, compute_dtype=torch.float64 if p.dtype == torch.float64
                                else torch.float32)

    def run(self, q, k, v, p, *, beta=None, decay=None, initial_state=None, gate=None):
        """q, k `(B, Hk, S, D)`, v `(B, Hv, S, Dv)`, beta `(B, Hv, S)`; returns `(o (B, Hv, S, Dv)
        in v's dtype, final state (B, Hv, D, Dv) float32 (float64 for float64 inputs))`."""
        if gate is not None:
            raise ValueError("gate is not an argument of delta_rule")
        return self.forward(q, k, v, beta, p, decay=decay, initial_state=initial_state)

    def forward(self, q, k, v, beta, p, *, decay, initial_state):
        raise NotImplementedError
