"""Run one case: inputs once, then every implementation -> one row each (timing, error against the
float64 reference, fraction of the measured roofline). A failing implementation gives an `error`
row and the case goes on; one that would overrun its budget gives a `skipped` row with the reason."""
from __future__ import annotations

import gc
import math
import time
import traceback
import zlib

import torch

from .cases import Case, host_pattern
from .impls import Inputs, Unsupported, _mem_available_bytes
from .roofline import LINEAR, work_of
from .timing import measure, synchronize

ERROR_ROWS = 32
#: a linear-step call steps one of up to STEP_LAYERS equal states in turn (the layers of a model at one
#: token), STEP_POOL_BYTES of them in all: more than a CPU's L3 or a GPU's L2, so the state comes from memory
STEP_LAYERS, STEP_POOL_BYTES = 64, 256 << 20
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # float32: 1e-5 on CPU, 1e-3 on GPU (tf32)


def tolerance(dtype, device) -> float:
    return TOLERANCE.get(dtype, 1e-5 if device.type == "cpu" else 1e-3)


def retnet_decay(h: int, device) -> torch.Tensor:
    """Per-head log-decays log(1 - 2^(-5 - h)), as in RetNet."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(h, dtype=torch.float64))).to(device)


def make_inputs(case: Case, device) -> Inputs:
    """Deterministic tensors: the same shape always gets the same q, k, v (whatever the pattern)."""
    elt = torch.empty((), dtype=case.dtype).element_size()
    need = case.B * (case.Hq * case.Sq * 2 + case.Hkv * case.Sk * 2) * case.D * elt * (3 if case.kind == "train" else 1)
    avail = _mem_available_bytes(device)
    if need > 0.4 * avail:
        raise Unsupported(f"inputs and outputs need {need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available")
    g = torch.Generator().manual_seed(zlib.crc32(repr((case.B, case.Hq, case.Hkv, case.Sq, case.Sk)).encode()))
    mk = lambda h, s: torch.randn(case.B, h, s, case.D, generator=g).to(device, case.dtype)
    q, k, v = mk(case.Hq, case.Sq), mk(case.Hkv, case.Sk), mk(case.Hkv, case.Sk)
    x = Inputs(case, device, case.make_pattern(device), q, k, v)
    if case.family == "windowlinear":
        x.gate = torch.randn(case.Hq, generator=g).to(device)
    if case.family == "delta":  # Gated DeltaNet's (Qwen3-Next): beta = sigmoid, g = -softplus, qk_l2norm
        x.beta = torch.sigmoid(torch.randn(case.B, case.Hq, case.Sq, generator=g)).to(device)
        x.decay = (-0.5 * torch.nn.functional.softplus(torch.randn(case.B, case.Hq, case.Sq, generator=g))).to(device)
    elif not case.softmax:
        x.decay = retnet_decay(case.Hq, device).to(torch.float32)
    if case.kind in ("linear-decode", "linear-step"):
        x.state = (0.05 * torch.randn(case.B, case.Hq, case.D, case.D, generator=g)).to(device)
    if case.kind == "linear-step":  # one state per layer of a deep model: together they do not fit a cache
        n = max(2, min(STEP_LAYERS, STEP_POOL_BYTES // max(x.state.numel() * 4, 1)))
        x.states = [x.state.clone() for _ in range(n)]
    if case.kind in ("train", "delta-train"):
        for t in (x.q, x.k, x.v) + ((x.beta, x.decay) if case.family == "delta" else ()):
            t.requires_grad_()
        x.grad = torch.randn(q.shape, generator=g).to(device, case.dtype)
    return x


class References:
    """float64 CPU outputs of the last ERROR_ROWS query rows (queries are end-aligned, so
    attention(q[:, :, -n:], k, v) gives exactly those rows), computed once per case and target."""

    def __init__(self, x: Inputs):
        self.x, self.done = x, {}

    def get(self, target: str) -> torch.Tensor:
        if target not in self.done:
            self.done[target] = self._compute(target)
        return self.done[target]

    def _compute(self, target: str) -> torch.Tensor:
        import sparse_attn as sa
        x, case = self.x, self.x.case
        n = min(ERROR_ROWS, case.Sq)
        q64, k64, v64 = (t.detach().to("cpu", torch.float64) for t in (x.q, x.k, x.v))
        if case.family == "delta" and target == "pattern":  # the chunked reference in float64
            with torch.no_grad():
                return sa.delta_rule(q64, k64, v64, x.beta.detach().to("cpu", torch.float64),
                                     decay=x.decay.detach().to("cpu", torch.float64), qk_l2norm=True,
                                     backend="reference")[:, :, -n:]
        if case.kind in ("linear-decode", "linear-step") and target == "pattern":
            return sa.linear_attention(q64, k64[:, :, -1:], v64[:, :, -1:], decay=x.decay.to("cpu", torch.float64),
                                       initial_state=x.state.to("cpu", torch.float64), backend="reference")
        if not case.softmax and target == "pattern":  # rows depend on the whole prefix through the state
            return sa.linear_attention(q64, k64, v64, decay=x.decay.to("cpu", torch.float64),
                                       backend="reference")[:, :, -n:]
        pat = sa.Dense() if target == "dense" else x.pattern
        if target == "pattern" and case.family == "blocksparse":
            pat = type(pat)(pat.layout.cpu(), block_size=pat.block_size)
        gate = x.gate.to("cpu", torch.float64) if (x.gate is not None and target == "pattern") else None
        return sa.attention(q64[:, :, -n:], k64, v64, pat, gate=gate, backend="reference")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    n = ref.shape[2]
    got = out.detach()[:, :, -n:].to("cpu", torch.float64)
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    return err if math.isfinite(err) else float("nan")


PRIOR_FRACTION = 0.05  # of the measured roofline, for a call with no comparable rate yet


class Calibration:
    """Work rates seen so far in this run, to estimate a call's time before making it."""

    def __init__(self, roofline: dict, fallback_fraction: float = 0.02):
        self.roofline, self.frac, self.rates = roofline, fallback_fraction, {}
        self.compile_s: dict = {}

    def seconds(self, key, roof_s: float, prior_s: float | None = None) -> float:
        """Estimated seconds of one call, from the fraction of the roofline reached so far; when
        nothing comparable ran yet (e.g. --filter picked long cases only), `PRIOR_FRACTION` of it.
        key = (kind, implementation/kernel, dtype, pattern family). An unseen key borrows, in this
        order: the same kernel, kind and family in another dtype; the same kernel and family in a
        kind of the same regime (decode is latency-bound, the others compute-bound); the fastest
        rate of the same kind, dtype and family (an optimistic guess: a call is skipped only when
        even that overruns the budget). Never across pattern families: one kernel runs different
        code per pattern (TopK's selection, per-token blocks) whose cost the roofline work does
        not count, so a window rate made a reference TopK call at 32K look 100x cheaper than it
        was. With nothing comparable seen, `prior_s` (the estimate made before the run,
        bench/estimate.py: the kernel's own cost() for sparse_attn) when given."""
        kind, kernel, dt, fam = key
        tries = (lambda k: (k[0], k[1], k[3]) == (kind, kernel, fam),
                 lambda k: (k[1], k[3]) == (kernel, fam) and _regime(k[0]) == _regime(kind),
                 lambda k: (k[0], k[2], k[3]) == (kind, dt, fam))
        if key in self.rates:
            return roof_s / self.rates[key]
        for match in tries:
            seen = sorted(r for k, r in self.rates.items() if match(k))
            if seen:
                return roof_s / (seen[len(seen) // 2] if match is not tries[-1] else seen[-1])
        return prior_s if prior_s is not None else roof_s / PRIOR_FRACTION

    def update(self, key, roof_s: float, seconds: float):
        self.rates[key] = roof_s / max(seconds, 1e-9)


def calibration_key(case, impl, kernel: str) -> tuple:
    """`Calibration`'s key of one row: (kind, our kernel or the baseline's name, dtype, family). A
    baseline that computes dense causal attention makes the same call whatever the case's pattern,
    so its family is "dense" (keyed by the case's, a TopK case's SDPA rows borrowed our TopK
    kernel's rate on the first GPU run and were skipped as 68 s calls; such a call takes ~0.2 s there)."""
    fam = case.family if impl.computes == "pattern" else "dense"
    return (case.kind, kernel if impl.group == "sparse_attn" else impl.name, case.dtype, fam)


def _regime(kind: str) -> str:
    return "decode" if kind.endswith("decode") else "compute"


def _fill_timing(row: dict, t, roof: dict, first_s: float):
    row.update(ms=t.median_ms, min_ms=min(t.times_ms), repeats=t.repeats, times_ms=[round(v, 4) for v in t.times_ms],
               first_call_ms=1e3 * first_s)
    s = t.median_ms * 1e-3
    row.update(work_flop=roof["flop"], work_byte=roof["byte"], roofline_ms=1e3 * roof["seconds"],
               gflops=roof["flop"] / s / 1e9, gbps=roof["byte"] / s / 1e9,
               roofline_fraction=roof["seconds"] / s, bound=roof["bound"])


MEASURED = ("kernel", "ms", "min_ms", "repeats", "times_ms", "first_call_ms", "work_flop", "work_byte", "roofline_ms",
            "gflops", "gbps", "roofline_fraction", "bound", "rel_error", "tolerance", "error_ok", "peak_mem_gb",
            "prep_ms", "status", "error")


def run_case(case: Case, impls, device, roofline: dict, calib: Calibration, *, budget_s: float,
             timing_budget_s: float, cache: dict, priors: dict | None = None) -> list[dict]:
    """One row per implementation. `budget_s` bounds each implementation's time on this case;
    `priors`: {implementation name: estimated seconds of a call} made before the run."""
    dt = str(case.dtype).removeprefix("torch.")
    base = dict(case=case.name, kind=case.kind, family=case.family, param=case.param, sweeps=list(case.sweeps),
                B=case.B, Hq=case.Hq, Hkv=case.Hkv, Sq=case.Sq, Sk=case.Sk, D=case.D, dtype=dt)
    rows = [dict(base, impl=i.name, group=i.group) for i in impls]
    try:
        x = make_inputs(case, device)
    except Unsupported as e:
        for r in rows:
            r.update(status="skipped", note=f"skipped: {e}")
        return rows
    base_pattern = repr(x.pattern) if x.pattern is not None else "linear_attention(decay=RetNet per head)"
    x.host_pattern = host_pattern(x.pattern)
    density = case.density(x.host_pattern) if case.softmax else None
    refs = References(x)
    timed_kernels: dict = {}  # kernel name -> row, for sparse_attn backends that pick the same kernel
    for impl, row in zip(impls, rows):
        row.update(pattern=base_pattern if impl.computes == "pattern" else "dense causal", density=density
                   if impl.computes == "pattern" else 1.0)
        t0 = time.perf_counter()
        try:
            _run_impl(case, impl, row, x, refs, device, roofline, calib, budget_s, timing_budget_s, cache,
                      timed_kernels, (priors or {}).get(impl.name))
        except Unsupported as e:
            row.update(status="unsupported", note=str(e))
        except Exception as e:  # record it and go on with the other implementations
            row.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:300],
                       traceback=traceback.format_exc()[-3000:])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - t0  # everything this row cost, errors check included
    big = sum(t.numel() * t.element_size() for t in (x.q, x.k, x.v)) > (256 << 20)
    del x, refs
    if big:  # reference cycles (autograd graphs) can hold large tensors; gc costs ~1 s, so only here
        gc.collect()
    ok = [r["ms"] for r in rows if r["group"] == "sdpa" and r.get("status") == "ok"]
    for r in rows:
        if ok and r.get("status") == "ok":
            r["sdpa_best_ms"] = min(ok)
            r["speedup_vs_sdpa"] = min(ok) / r["ms"]
    return rows


def _run_impl(case, impl, row, x, refs, device, roofline, calib, budget_s, timing_budget_s, cache, timed_kernels,
              prior_s=None):
    key = impl.cache_key(case)
    if key is not None and key in cache:
        src = cache[key]
        row.update({k: src[k] for k in MEASURED if k in src})
        row["note"] = f"same call as {src['case']}"
        return
    built = impl.build(x)
    row["kernel"] = built.kernel
    row["prep_ms"] = 1e3 * built.prep_s
    if impl.group == "sparse_attn" and built.kernel in timed_kernels:
        src = timed_kernels[built.kernel]
        row.update({k: src[k] for k in MEASURED if k in src})
        row["note"] = f"same kernel as {src['impl']}"
        return
    what = (x.host_pattern if case.softmax else LINEAR) if impl.computes == "pattern" else None
    roof = work_of(case, what, roofline)
    ckey = calibration_key(case, impl, built.kernel)
    call_s = calib.seconds(ckey, roof["seconds"], prior_s)
    compile_s = calib.compile_s.get(impl.name, 0.0) if impl.compiles else 0.0
    cpu_long = device.type == "cpu" and call_s > timing_budget_s and not impl.compiles
    warm = 0 if cpu_long else (1 if device.type == "cpu" else 3)
    # warm-up + timed calls, x1.5 as rates fall with the length; a long CPU call is timed once, cold
    est = 1.5 * call_s if cpu_long else 1.5 * (max(warm, 1) + 1) * call_s + compile_s
    row["estimate_s"] = est
    if est > budget_s:
        row.update(status="skipped", note=f"skipped: estimated {est:.3g} s > budget {budget_s:g} s per implementation")
        return

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if warm:  # first call apart: one-time work (compilation, caches) must not count as the timing
        out = built.fn()
        synchronize(device)
    first_s = time.perf_counter() - t0
    if impl.compiles and warm:
        calib.compile_s[impl.name] = max(calib.compile_s.get(impl.name, 0.0), first_s)
    t, out = measure(built.fn, device, budget_s=timing_budget_s, warmup=max(warm - 1, 0))
    if built.check is not None:  # a stateful call (a decode step) moved on: check a fresh one instead
        out = built.check()
    if not warm:
        first_s = t.times_ms[0] * 1e-3
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    calib.update(ckey, roof["seconds"], t.median_ms * 1e-3)
    _fill_timing(row, t, roof, first_s)
    ref = refs.get("pattern" if impl.computes == "pattern" else "dense")
    row["rel_error"] = rel_error(out, ref)
    row["tolerance"] = tolerance(case.dtype, device)
    row["error_ok"] = bool(row["rel_error"] <= row["tolerance"])
    row["status"] = "ok"
    if key is not None:
        cache[key] = row
    if impl.group == "sparse_attn":
        timed_kernels[built.kernel] = row
