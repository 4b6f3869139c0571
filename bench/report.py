"""The final table (stdout) and the JSON file."""
from __future__ import annotations

import json
import os

COLUMNS = [  # header, width, row -> text
    ("#", 3, lambda r: str(r["index"])),
    ("case", 33, lambda r: r["name"]),
    ("kernel", 26, lambda r: r.get("kernel", "-")),
    ("ms", 9, lambda r: f"{r['ms']:.2f}" if "ms" in r else "-"),
    ("rate", 12, lambda r: f"{r['gflops']:.1f} GF/s" if "gflops" in r else
     f"{r['gbps']:.1f} GB/s" if "gbps" in r else "-"),
    ("roof", 5, lambda r: f"{100 * r['roofline_fraction']:.0f}%" if "roofline_fraction" in r else "-"),
    ("sdpa ms", 9, lambda r: f"{r['sdpa_ms']:.2f}" if "sdpa_ms" in r else "-"),
    ("vs sdpa", 7, lambda r: f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "-"),
    ("rel err", 9, lambda r: f"{r['rel_error']:.1e}" + ("" if r["error_ok"] else "!") if "rel_error" in r else "-"),
]


def table(rows: list, roofline: dict, env: dict) -> str:
    mm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in roofline["matmul_gflops"].items())
    lines = [f"device: {env['device_name']}   torch {env['torch']}",
             f"roofline: copy {roofline['copy_gbps']:.1f} GB/s, matmul {mm}",
             "  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w, _) in enumerate(COLUMNS)) + "  note"]
    for r in rows:
        cells = [f(r).ljust(w) if i < 3 else f(r).rjust(w) for i, (_, w, f) in enumerate(COLUMNS)]
        note = r.get("error") or r.get("note", "")
        lines.append("  ".join(cells) + "  " + note)
    lines.append("rel err: last 32 query rows vs the float64 reference backend; '!' = above the contract's "
                 "tolerance. roof: fraction of measured matmul rate (GB/s rows: of copy bandwidth).")
    return "\n".join(lines)


def write_json(path: str, env: dict, roofline: dict, rows: list, elapsed_s: float) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "roofline": roofline, "elapsed_s": elapsed_s, "rows": rows},
                  f, indent=1, default=str)
