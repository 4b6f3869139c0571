"""`plan()`: the scheduler's decision for one call, and `explain()`, its account.

Host work only (shapes, pattern parameters, device properties): no kernel launch and no device
synchronisation, so a plan can be made inside a CUDA-graph capture or a decode loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .kernel import Kernel, with_sinks
from .problem import Problem
from .registry import kernels


@dataclass
class Candidate:
    kernel: Kernel
    reasons: list[str]
    cost: float | None


@dataclass
class Plan:
    problem: Problem
    candidates: list[Candidate]
    kernel: Kernel
    backend_request: str | None = None
    notes: list[str] = field(default_factory=list)

    def run(self, q, k, v, *, gate=None, sink_logits=None, out=None):
        """Run the chosen kernel on `q, k, v`: the problem the plan was made for (`ValueError` otherwise).

        `out`: a `(B, Hq, Sq, Dv)` tensor of q's dtype and device (any strides, e.g. a transposed view
        of a server's `(T, Hq, Dv)` output rows) that receives the result and is returned, for
        inference only. Kernels with `writes_out` write it in place; the others' result is copied in."""
        self.problem.check_inputs(q, k, v, gate=gate, sink_logits=sink_logits)
        if out is None:
            return self.kernel.run(q, k, v, self.problem, gate=gate, **with_sinks(sink_logits))
        self.problem.check_out(out, q, k, v, gate=gate, sink_logits=sink_logits)
        return self.kernel.run_into(q, k, v, self.problem, out, gate=gate, sink_logits=sink_logits)

    def prepared(self):
        """A lighter re-run of this plan for a loop that runs the same call many times (every layer
        of a served model): an object whose `run(q, k, v, out)` calls the chosen kernel's binding
        with the plan's fixed arguments (the layout of a Dense / SlidingWindow pattern, scale,
        softcap) and writes `out` `(B, Hq, Sq, Dv)` in place, the binding checking the tensors
        (shapes, dtypes, `out` apart from the inputs); None when the kernel has none for this
        problem (`CpuBlockSparse.prepared_forward`: a selection, sinks, autograd). The plan's
        choice stands (`explain()`); inference only: the caller keeps the call the plan was made
        for (the vLLM backend: one per request shape, grad disabled)."""
        make = getattr(self.kernel, "prepared_forward", None)
        return None if make is None or self.problem.requires_grad else make(self.problem)

    def explain(self) -> str:
        lines = [f"problem: {self.problem.describe()}",
                 f"request: backend={self.backend_request!r}; chosen: {self.kernel.name}"]
        # a kernel with several code paths says which one this problem takes (cpu.decode's
        # products); asked here, not at choose(), which runs on every call of the cache ops
        path = getattr(self.kernel, "path_note", None)
        outs = []
        if self.kernel.writes_out and not self.problem.varlen:
            outs = [f"run(out=...): {self.kernel.name} writes the rows in place (an out whose last dim is not "
                    f"contiguous gets a copy)" if not self.problem.sinks else
                    f"run(out=...): {self.kernel.name}'s result is copied into out (learned sinks apply after it)"]
        lines += [f"note: {n}" for n in self.notes + ([path(self.problem)] if path is not None else []) + outs if n]
        width = max(len(c.kernel.name) for c in self.candidates)
        for c in sorted(self.candidates, key=lambda c: (c.reasons != [], c.cost or 0.0)):
            mark = "*" if c.kernel is self.kernel else (" " if not c.reasons else "x")
            cost = f"{c.cost * 1e3:10.3f} ms" if c.cost is not None else " " * 13
            why = "chosen (cheapest)" if c.kernel is self.kernel else (
                "; ".join(c.reasons) if c.reasons else "supported, costlier")
            lines.append(f" {mark} {c.kernel.name:<{width}}  [{c.kernel.backend:9}] {cost}  {why}")
        return "\n".join(lines)

    __str__ = explain


def choose(problem: Problem, *, backend: str | None = None, op: str = "attention") -> Plan:
    """Filter the registered kernels of `op` by their reasons, rank by estimated cost."""
    cands = []
    for kern in kernels(op):
        if backend is not None and kern.backend != backend:
            # not asked: no capability checks, so no build of an extension nobody will run
            cands.append(Candidate(kern, [f"backend {backend!r} requested"], None))
            continue
        reasons = kern.not_supported_reasons(problem)
        cost = kern.cost(problem) if not reasons else None
        cands.append(Candidate(kern, reasons, cost))
    ok = [c for c in cands if not c.reasons]
    if not ok:
        listing = "\n".join(f"  {c.kernel.name} [{c.kernel.backend}]: {'; '.join(c.reasons)}" for c in cands
                            if backend is None or c.kernel.backend == backend)
        if not listing:
            listing = f"  (no kernel of backend {backend!r} is registered in this build)"
        raise ValueError(f"no kernel can run this {op} call with backend={backend!r} "
                         f"({problem.describe()}):\n{listing}")
    best = min(ok, key=lambda c: c.cost)
    return Plan(problem=problem, candidates=cands, kernel=best.kernel, backend_request=backend)
