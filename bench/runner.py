"""Run one case: inputs, kernel choice, timing, the SDPA baseline and the error against float64."""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from .cases import Case
from .timing import measure

ERROR_ROWS = 32
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # float32: 1e-5 on CPU, 1e-3 on GPU (tf32)


def tolerance(dtype, device) -> float:
    return TOLERANCE.get(dtype, 1e-5 if device.type == "cpu" else 1e-3)


def make_inputs(case: Case, device):
    """Deterministic q, k, v: the same shape always gets the same tensors (whatever the pattern)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((case.B, case.Hq, case.Hkv, case.Sq, case.Sk)).encode()))
    mk = lambda h, s: torch.randn(case.B, h, s, case.D, generator=g).to(device, case.dtype)
    q, k, v = mk(case.Hq, case.Sq), mk(case.Hkv, case.Sk), mk(case.Hkv, case.Sk)
    if case.kind == "train":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def retnet_decay(h: int, device) -> torch.Tensor:
    """Per-head log-decays log(1 - 2^(-5 - h)), as in RetNet."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(h, dtype=torch.float64))).to(device)


def work(case: Case, cpu_pattern) -> tuple[float, str]:
    """(amount, unit): FLOPs for compute cases, bytes of K and V visited for decode."""
    if case.kind == "linear":  # recurrent form: k v^T update and q^T S read, per token and head
        return 4.0 * case.D * case.D * case.Sq * case.B * case.Hq, "flop"
    pairs = cpu_pattern.visited_pairs(case.Sq, case.Sk)
    if case.kind == "decode":
        return pairs * case.B * case.Hkv * 2 * case.D * torch.empty((), dtype=case.dtype).element_size(), "byte"
    flops = 4.0 * case.D * pairs * case.B * case.Hq
    return flops * (3.5 if case.kind == "train" else 1.0), "flop"


def _train(fn, q, k, v, grad):
    def step():
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v)
        out.backward(grad)
        return out.detach()
    return step


def kernel_fn(case: Case, pattern, q, k, v):
    """(kernel name, zero-argument callable returning the case's output)."""
    import sparse_attn as sa
    if case.kind == "linear":
        decay = retnet_decay(case.Hq, q.device).to(torch.float32)
        return "(linear_attention auto)", lambda: sa.linear_attention(q, k, v, decay=decay)
    name = sa.plan(q, k, v, pattern).kernel.name
    if case.kind == "train":
        return name, _train(lambda a, b, c: sa.attention(a, b, c, pattern), q, k, v, torch.randn_like(q))
    return name, lambda: sa.attention(q, k, v, pattern)


def sdpa_fn(case: Case, q, k, v):
    """Dense causal SDPA on the same tensors (no mask for a single decode query)."""
    causal = case.Sq > 1
    f = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal, enable_gqa=case.Hq != case.Hkv)
    if case.kind == "train":
        return _train(f, q, k, v, torch.randn_like(q))
    return lambda: f(q, k, v)


def rel_error(case: Case, cpu_pattern, out, q, k, v) -> float:
    """||out - ref|| / ||ref|| on the last query rows, ref = reference backend in float64 on CPU.
    Queries are end-aligned, so attention(q[:, :, -n:], k, v) gives exactly those rows."""
    import sparse_attn as sa
    n = min(ERROR_ROWS, case.Sq)
    q64, k64, v64 = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    if case.kind == "linear":  # rows depend on the whole prefix through the state
        ref = sa.linear_attention(q64, k64, v64, decay=retnet_decay(case.Hq, "cpu"), backend="reference")[:, :, -n:]
    else:
        ref = sa.attention(q64[:, :, -n:], k64, v64, cpu_pattern, backend="reference")
    got = out[:, :, -n:].to("cpu", torch.float64)
    err = ((got - ref).norm() / ref.norm()).item()
    return err if math.isfinite(err) else float("nan")


class Calibration:
    """Work rates seen so far in this run, to estimate a case's time before running it."""

    def __init__(self, roofline: dict, fallback_fraction: float = 0.02):
        self.roofline, self.frac, self.rates = roofline, fallback_fraction, {}

    def seconds(self, key, amount: float, unit: str, dtype) -> float:
        """Estimated seconds of one call. key = (kind, kernel, dtype); an unseen key borrows the rate
        of the same kernel and kind in another dtype, else the slowest of the same kind and dtype,
        else a small fraction of the measured peak."""
        kind, kernel, dt = key
        tries = (lambda k: k == key, lambda k: k[:2] == (kind, kernel), lambda k: (k[0], k[2]) == (kind, dt))
        for match in tries:
            seen = [r for k, r in self.rates.items() if match(k)]
            if seen:
                return amount / min(seen)
        peak = self.roofline["copy_gbps"] if unit == "byte" else \
            self.roofline["matmul_gflops"][str(dtype).removeprefix("torch.")]
        return amount / (self.frac * peak * 1e9)

    def update(self, key, amount: float, ms: float):
        self.rates[key] = amount / (ms * 1e-3)


def run_case(case: Case, row: dict, device, roofline: dict, calib: Calibration, *, budget_s: float,
             timing_budget_s: float, sdpa_cache: dict) -> None:
    """Fills `row`, the case's row of the report. Raises on failure (what is filled so far stays)."""
    dt = str(case.dtype).removeprefix("torch.")
    row.update(kind=case.kind, B=case.B, Hq=case.Hq, Hkv=case.Hkv, Sq=case.Sq, Sk=case.Sk, D=case.D, dtype=dt)
    cpu_pattern = case.make_pattern("cpu") if case.make_pattern else None
    pattern = case.make_pattern(device) if case.make_pattern else None
    row["pattern"] = repr(pattern) if pattern is not None else "linear_attention(decay=RetNet per head)"
    if pattern is not None and case.label != "dense" and pattern.is_dense_causal_for(case.Sq, case.Sk):
        row["note"] = "= dense causal"
    amount, unit = work(case, cpu_pattern)
    q, k, v = make_inputs(case, device)
    kernel, fn = kernel_fn(case, pattern, q, k, v)
    row["kernel"] = kernel

    # estimate from the rates seen so far: warm-up (skipped on CPU when one call exceeds the timing
    # budget) plus one timed call, of the kernel and (unless cached) of SDPA; x1.5 as rates fall with S
    key, sdpa_rate_key = (case.kind, kernel, case.dtype), ("sdpa/" + case.kind, "sdpa", case.dtype)
    sdpa_key = (case.kind, case.B, case.Hq, case.Hkv, case.Sq, case.Sk, case.dtype)
    dense_amount = 4.0 * case.D * case.B * case.Hq * (case.Sq * (2 * case.Sk - case.Sq + 1) / 2) * \
        (3.5 if case.kind == "train" else 1.0)
    warmups = lambda call_s: 3 if device.type != "cpu" else 0 if call_s > timing_budget_s else 1
    call_s = calib.seconds(key, amount, unit, case.dtype)
    sdpa_s = calib.seconds(sdpa_rate_key, dense_amount, "flop", case.dtype)
    est = (warmups(call_s) + 1) * call_s
    if sdpa_key not in sdpa_cache:
        est += (warmups(sdpa_s) + 1) * sdpa_s
    est *= 1.5
    row["estimate_s"] = est
    if est > budget_s:
        row["status"] = "skipped"
        row["note"] = f"skipped: estimated {est:.3g} s > per-case budget {budget_s:g} s"
        return

    t, out = measure(fn, device, budget_s=timing_budget_s, warmup=warmups(call_s))
    calib.update(key, amount, t.median_ms)
    row.update(ms=t.median_ms, min_ms=min(t.times_ms), repeats=t.repeats, times_ms=t.times_ms, work=amount, unit=unit)
    rate = amount / (t.median_ms * 1e-3) / 1e9
    if unit == "byte":
        row["gbps"] = rate
        row["roofline_fraction"] = rate / roofline["copy_gbps"]
    else:
        row["gflops"] = rate
        row["roofline_fraction"] = rate / roofline["matmul_gflops"][dt]

    if sdpa_key not in sdpa_cache:
        ts, _ = measure(sdpa_fn(case, q, k, v), device, budget_s=timing_budget_s, warmup=warmups(sdpa_s))
        calib.update(sdpa_rate_key, dense_amount, ts.median_ms)
        sdpa_cache[sdpa_key] = ts.median_ms
    row["sdpa_ms"] = sdpa_cache[sdpa_key]
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / t.median_ms

    row["rel_error"] = rel_error(case, cpu_pattern, out, q, k, v)
    row["tolerance"] = tolerance(case.dtype, device)
    row["error_ok"] = row["rel_error"] <= row["tolerance"]
    row["status"] = "ok"
