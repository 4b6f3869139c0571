"""Time estimates made before anything is measured, so the ETA is honest from the first case.

A row's call time comes from the kernels' own `cost()` for sparse_attn (the scheduler's estimate
for the kernel it would choose, asked with zero-stride stand-ins of the inputs: no memory, no
kernel launch) and from the measured roofline at a prior fraction for the baselines. A row then
costs its first call plus the timed calls the runner makes (bench/runner.py: calls until the
timing budget is spent, at most 30), unless the estimate overruns the per-implementation budget
and the row is skipped. The progress bar scales what is left by what the finished cases really
took against their estimates.
"""
from __future__ import annotations

import torch

from .cases import host_pattern
from .roofline import LINEAR, work_of

#: fraction of the measured roofline a baseline is assumed to reach before it is measured
BASELINE_FRACTION = 0.2
#: per case: inputs, the float64 reference rows, Python overhead (seconds)
CASE_OVERHEAD_S = 0.5


def _stand_in(shape, dtype, device):
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def sparse_attn_call_s(case, pattern, device, backend=None, roofline=None) -> float | None:
    """The scheduler's cost of the kernel it would run for `case`, scaled to the measured
    `roofline` when given (None when it cannot say)."""
    import sparse_attn as sa
    if not case.softmax:
        return None
    q = _stand_in((case.B, case.Hq, case.Sq, case.D), case.dtype, device)
    k = _stand_in((case.B, case.Hkv, case.Sk, case.D), case.dtype, device)
    gate = _stand_in((case.Hq,), torch.float32, device) if case.family == "windowlinear" else None
    try:
        p = sa.plan(q, k, k, pattern, gate=gate, backend=backend, requires_grad=case.kind == "train")
    except Exception:
        return None
    cost = next((c.cost for c in p.candidates if c.kernel is p.kernel), None)
    if cost is None:
        return None
    cost *= machine_ratio(case, device, roofline) if roofline else 1.0
    return cost * (3.5 if case.kind == "train" else 1.0)  # a forward's cost; backward ~2.5x more


def machine_ratio(case, device, roofline) -> float:
    """The scheduler's peak for this device (a constant per device generation) over the peak this
    run measured: kernel costs are scaled by it, so that they and the baselines' roofline
    estimates describe the same machine (a loaded CPU measured 15x below its constants once)."""
    from sparse_attn.scheduler.device import device_info

    from .roofline import compute_peak
    info = device_info(device)
    if case.kind.endswith("decode"):
        return max(1.0, info.bandwidth_gbs / max(roofline["copy_gbps"], 1e-9))
    measured = compute_peak(roofline, str(case.dtype).removeprefix("torch."))
    return max(1.0, 1e3 * info.peak_tflops(case.dtype) / max(measured, 1e-9))


def row_seconds(call_s: float, *, timing_s: float, budget_s: float, device) -> float:
    """Wall seconds the runner spends on a row whose call takes `call_s` (0 when it will skip it)."""
    cpu_long = device.type == "cpu" and call_s > timing_s
    est = 1.5 * call_s if cpu_long else 1.5 * 3 * call_s
    if est > budget_s:
        return 0.0
    if cpu_long:  # timed once, cold
        return call_s
    timed = min(max(timing_s, call_s), 30 * call_s)
    return call_s + timed


def call_seconds(case, impls, device, roofline) -> dict:
    """{implementation name: estimated seconds of one call of `case`}, before anything ran."""
    pattern = host_pattern(case.make_pattern("cpu")) if case.softmax else None
    calls = {}
    for impl in impls:
        if impl.group == "sparse_attn":
            call = sparse_attn_call_s(case, pattern, device, getattr(impl, "backend", None), roofline)
            if call is None:
                what = pattern if case.softmax else LINEAR
                call = work_of(case, what, roofline)["seconds"] / BASELINE_FRACTION
        else:
            what = (pattern if case.softmax else LINEAR) if impl.computes == "pattern" else None
            call = work_of(case, what, roofline)["seconds"] / BASELINE_FRACTION
        calls[impl.name] = call
    return calls


def case_seconds(case, impls, device, roofline, *, timing_s: float, budget_s: float, seen: set,
                 calls: dict | None = None) -> float:
    """Estimated wall seconds of one case over `impls` (`calls`: from `call_seconds`, computed here
    when not given); a row that repeats a call of an earlier case (its `cache_key` in `seen`, which
    this adds to) costs 0, as in the runner."""
    calls = calls if calls is not None else call_seconds(case, impls, device, roofline)
    total = CASE_OVERHEAD_S
    for impl in impls:
        call = calls[impl.name]
        key = impl.cache_key(case)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        total += row_seconds(call, timing_s=timing_s, budget_s=budget_s, device=device)
    return total
