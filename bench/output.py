"""The bench's outputs: the table (stdout), JSON (everything) and CSV (one row per case x
implementation)."""
from __future__ import annotations

import csv
import json
import os

COLUMNS = [  # header, width, row -> text
    ("case", 34, lambda r: r["case"]),
    ("impl", 22, lambda r: r["impl"]),
    ("kernel", 28, lambda r: r.get("kernel", "-")[:28]),
    ("ms", 10, lambda r: f"{r['ms']:.3f}" if "ms" in r else "-"),
    ("rate", 12, lambda r: (f"{r['gflops']:.3g} GF/s" if r.get("bound") == "compute" else f"{r['gbps']:.3g} GB/s")
     if "gflops" in r else "-"),
    ("roof", 5, lambda r: f"{100 * r['roofline_fraction']:.0f}%" if "roofline_fraction" in r else "-"),
    ("vs sdpa", 7, lambda r: f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "-"),
    ("rel err", 9, lambda r: f"{r['rel_error']:.1e}" + ("" if r["error_ok"] else "!") if "rel_error" in r else "-"),
]
CSV_FIELDS = ["case", "kind", "family", "param", "sweeps", "impl", "group", "kernel", "status", "B", "Hq", "Hkv", "Sq",
              "Sk", "D", "dtype", "density", "ms", "min_ms", "repeats", "first_call_ms", "prep_ms", "work_flop",
              "work_byte", "gflops", "gbps", "roofline_ms", "roofline_fraction", "bound", "sdpa_best_ms",
              "speedup_vs_sdpa", "rel_error", "tolerance", "error_ok", "peak_mem_gb", "estimate_s", "wall_s", "note", "error"]
ENV_FIELDS = ["device", "device_name", "cpu_model", "torch", "triton", "git_commit", "date", "command"]  # on every CSV row


def note_of(r: dict) -> str:
    if r.get("status") == "error":
        return "ERROR " + r.get("error", "")
    return r.get("note", "")


def table(rows: list, roofline: dict, env: dict, statuses=("ok", "skipped", "error")) -> str:
    """One line per row of `statuses`; the unsupported (implementation, reason) pairs are summed
    up at the end, once each."""
    mm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in roofline["matmul_gflops"].items())
    lines = [f"device: {env['device_name']}   torch {env['torch']}   triton {env.get('triton')}",
             f"roofline (measured): copy {roofline['copy_gbps']:.1f} GB/s, matmul {mm}",
             "  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w, _) in enumerate(COLUMNS)) + "  note"]
    last = None
    for r in rows:
        if r.get("status") not in statuses:
            continue
        cells = [f(r).ljust(w) if i < 3 else f(r).rjust(w) for i, (_, w, f) in enumerate(COLUMNS)]
        if r["case"] == last:
            cells[0] = " " * COLUMNS[0][1]
        last = r["case"]
        lines.append("  ".join(cells) + "  " + note_of(r)[:120])
    unsupported: dict = {}
    for r in rows:
        if r.get("status") == "unsupported":
            unsupported.setdefault((r["impl"], r.get("note", "")), []).append(r["case"])
    if unsupported:
        lines.append("not run (unsupported):")
        for (impl, why), cases in unsupported.items():
            lines.append(f"  {impl}: {why[:160]}  ({len(cases)} case{'s' if len(cases) > 1 else ''})")
    lines.append("rate: GFLOP/s (compute-bound) or GB/s (memory-bound) of the implementation's own work; roof: that "
                 "work at the measured peak / measured time; vs sdpa: fastest SDPA backend's dense causal time / "
                 "this time; rel err: last 32 query rows vs float64 reference ('!' = above tolerance).")
    return "\n".join(lines)


def write_json(path: str, env: dict, roofline: dict, rows: list, elapsed_s: float, extra: dict | None = None) -> None:
    """`extra`: more top-level entries (e.g. "longgen": the long-generation rows, kept apart from
    `rows` whose fields bench.report and the plots rely on)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "roofline": roofline, "elapsed_s": elapsed_s, "rows": rows, **(extra or {})},
                  f, indent=1, default=str)


def write_csv(path: str, env: dict, rows: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    envcols = {k: env.get(k) for k in ENV_FIELDS}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + ENV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: ("|".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()}, **envcols})
