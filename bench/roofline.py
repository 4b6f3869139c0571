"""The machine's roofline, measured in the same run (copy bandwidth and matmul rate per dtype, best
of the repeats: a peak, not a median), and each case's work against it.

A row's `roofline_fraction` is `max(flop / matmul rate, bytes / copy bandwidth) / measured time`:
1.0 would be a kernel running at the measured peak of whichever resource bounds it. The work is
that of the implementation's own problem: the visited (query, key) pairs of the pattern for
sparse kernels, all causal pairs for the dense baselines.
"""
from __future__ import annotations

import torch

from .timing import measure


def copy_bandwidth(device: torch.device, mbytes: int, budget_s: float) -> float:
    """GB/s of a large tensor copy, counting the bytes read plus the bytes written."""
    n = mbytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t, _ = measure(lambda: dst.copy_(src), device, budget_s=budget_s, warmup=2, max_repeats=10)
    return 2 * src.numel() * 4 / (min(t.times_ms) * 1e-3) / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, budget_s: float) -> float:
    """GFLOP/s of an m x m x m matmul (2 m^3 FLOPs), best over the sizes tried: m doubles from
    512 up to `n` while a call stays under 50 ms, so a dtype with no fast path (bf16 on a CPU
    without bf16 instructions) costs a second, not minutes."""
    best, m = 0.0, min(512, n)
    while True:
        a = torch.randn(m, m, device=device).to(dtype)
        b = torch.randn(m, m, device=device).to(dtype)
        t, _ = measure(lambda: a @ b, device, budget_s=budget_s, warmup=1, max_repeats=10)
        best = max(best, 2 * m**3 / (min(t.times_ms) * 1e-3) / 1e9)
        if m >= n or min(t.times_ms) > 50:
            return best
        m *= 2


def measure_roofline(device: torch.device, dtypes, quick: bool = False) -> dict:
    big = device.type != "cpu"
    budget = 0.3 if quick else 1.0
    dts = list(dict.fromkeys(list(dtypes) + [torch.float32]))  # float32: linear attention's state
    return {
        "copy_gbps": copy_bandwidth(device, (256 if quick else 1024) if big else (64 if quick else 256), budget),
        "matmul_gflops": {str(dt).removeprefix("torch."): matmul_rate(device, dt, 8192 if big else (1024 if quick else 2048),
                                                                      budget) for dt in dts},
        "method": "copy: best of up to 10 copies of a float32 tensor (read + write bytes); matmul: best of up to "
                  "10 square matmuls, 2 n^3 flop",
    }


def compute_peak(roofline: dict, dtype: str) -> float:
    """GFLOP/s a kernel on `dtype` inputs can reach: the dtype's measured matmul rate, or the float32
    one when that is higher (every kernel may convert to float32; on CPUs without bf16/fp16 matrix
    instructions PyTorch's half-precision matmul is far slower than float32: 1 vs 120 GFLOP/s seen
    on the project's AVX2 machine, which made every bf16 row look compute-bound)."""
    rates = roofline["matmul_gflops"]
    return max(rates.get(dtype) or 0.0, rates["float32"])


def merge_rooflines(a: dict, b: dict) -> dict:
    """The higher of two measurements of each peak (start and end of a run: other work on a shared
    machine only ever lowers a measured peak)."""
    return {"copy_gbps": max(a["copy_gbps"], b["copy_gbps"]),
            "matmul_gflops": {k: max(v, b["matmul_gflops"].get(k, 0.0)) for k, v in a["matmul_gflops"].items()},
            "method": a["method"] + "; best of the measurements at the start and at the end of the run"}


def refresh_fractions(rows: list, roofline: dict) -> None:
    """Recompute each timed row's roofline time and fraction against `roofline`."""
    for r in rows:
        if "work_flop" not in r or "ms" not in r:
            continue
        peak = compute_peak(roofline, r["dtype"])
        compute, memory = r["work_flop"] / (peak * 1e9), r["work_byte"] / (roofline["copy_gbps"] * 1e9)
        r["roofline_ms"] = 1e3 * max(compute, memory)
        r["roofline_fraction"] = max(compute, memory) / (r["ms"] * 1e-3)
        r["bound"] = "compute" if compute >= memory else "memory"


#: `work_of(case, LINEAR, ...)`: the linear-attention recurrence of a linear case
LINEAR = object()


def work_of(case, what, roofline: dict) -> dict:
    """flop, bytes and roofline seconds of one call of `case`. `what`: the sparse_attn pattern the
    implementation computes, None for dense causal attention, or LINEAR for the linear recurrence."""
    from sparse_attn.patterns.base import causal_pairs
    elt = torch.empty((), dtype=case.dtype).element_size()
    bh = case.B * case.Hq
    qo_bytes = 2 * bh * case.Sq * case.D * elt
    if what is LINEAR and case.family == "delta":  # the chunked form's FLOPs at C = 64 (patterns/delta.py)
        c = min(64, case.Sq)
        flop = 2.0 * (3 * case.D * case.D + c / 2 * 5 * case.D + c * c / 6) * case.Sq * bh
        byte = qo_bytes + 2 * case.B * case.Hkv * case.Sq * case.D * elt + 8.0 * bh * case.Sq
        if case.kind == "delta-train":  # the backward recomputes the chunk terms, then ~2x the products
            flop *= 3.0
            byte *= 2.5
    elif what is LINEAR:  # recurrent form: k v^T update and q^T S read, per token and head
        flop = 4.0 * case.D * case.D * case.Sq * bh
        state = 2 * bh * case.D * case.D * 4 if case.kind in ("linear-decode", "linear-step") else 0  # float32 state in and out
        byte = qo_bytes + 2 * case.B * case.Hkv * case.Sq * case.D * elt + state
    else:
        pairs = bh * (what.visited_pairs(case.Sq, case.Sk) if what is not None else causal_pairs(case.Sq, case.Sk))
        flop = 4.0 * case.D * pairs
        if case.family == "windowlinear" and what is not None:  # the linear memory: k v^T and q M per token
            flop += 4.0 * case.D * case.D * case.Sq * bh
        if case.Sq == 1:  # decode: the K/V rows the query visits, read once per kv head
            kv = pairs / case.Hq * case.Hkv * 2 * case.D * elt
        else:
            kv = 2 * case.B * case.Hkv * case.Sk * case.D * elt
        byte = qo_bytes + kv
        if case.kind == "window-step":  # the linear memory M, float32, read and written once per kv head
            byte += 2 * case.B * case.Hkv * case.D * case.D * 4
        if case.kind == "train":  # backward ~2.5x the forward's products; reads q k v o do, writes dq dk dv
            flop *= 3.5
            byte *= 2.5
    dt = str(case.dtype).removeprefix("torch.")
    peak = compute_peak(roofline, dt)
    compute, memory = flop / (peak * 1e9), byte / (roofline["copy_gbps"] * 1e9)
    return {"flop": flop, "byte": byte, "seconds": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory"}
