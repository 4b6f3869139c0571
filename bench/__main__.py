"""`python -m bench`: run the sweep on the detected device, print a table, write JSON."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

from .cases import DTYPES, sweep
from .hardware import detect_device, environment
from .report import table, write_json
from .roofline import measure_roofline
from .runner import Calibration, run_case


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sweep (about 2 minutes on a small CPU)")
    p.add_argument("--out", default="bench/results/latest.json", help="JSON output path")
    p.add_argument("--device", default=None, help="cpu, cuda, npu, ... (default: detected)")
    p.add_argument("--dtype", default="bfloat16,float32", help="comma-separated: " + ", ".join(DTYPES))
    p.add_argument("--filter", default=None, help="only run cases whose name contains this substring")
    p.add_argument("--budget", type=float, default=60.0, help="per-case time budget in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = detect_device(args.device)
    try:
        dtypes = [DTYPES[d.strip()] for d in args.dtype.split(",")]
    except KeyError as e:
        sys.exit(f"--dtype: unknown dtype {e}; expected some of {', '.join(DTYPES)}")
    cases = [c for c in sweep(device, args.quick, dtypes) if not args.filter or args.filter in c.name]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0

    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start
    env = environment(device)
    log(f"bench on {env['device_name']}: {len(cases)} cases; measuring the roofline ...")
    if device.type == "cpu" and env["load_average"][0] > 0.5:
        log(f"warning: load average {env['load_average'][0]:.1f} on {env['cpu_count']} cores: "
            "other work is running, CPU timings will be noisy")
    roofline = measure_roofline(device, dtypes)
    calib, sdpa_cache, rows = Calibration(roofline), {}, []
    timing_budget = 1.0 if args.quick else 8.0
    for i, case in enumerate(cases, 1):
        tag = f"[{i}/{len(cases)}]"
        log(f"{tag} start {case.name}  (elapsed {elapsed():.1f} s)")
        t0 = time.perf_counter()
        row = {"index": i, "name": case.name}
        try:
            run_case(case, row, device, roofline, calib, budget_s=args.budget,
                     timing_budget_s=timing_budget, sdpa_cache=sdpa_cache)
        except Exception as e:  # record it and go on with the sweep
            row.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0],
                       traceback=traceback.format_exc())
        row["case_s"] = time.perf_counter() - t0
        rows.append(row)
        what = f"{row['ms']:.2f} ms, {row['kernel']}" if row["status"] == "ok" else \
            row.get("error") or row["note"].removeprefix("skipped: ")
        log(f"{tag} {row['status']:5} {case.name}: {what}  ({row['case_s']:.1f} s, elapsed {elapsed():.1f} s)")

    env["load_average_end"] = os.getloadavg()
    print(table(rows, roofline, env))
    write_json(args.out, env, roofline, rows, elapsed())
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    bad = [r["name"] for r in rows if r.get("error_ok") is False]
    log(f"done in {elapsed():.1f} s: {count['ok']} ok, {count['skipped']} skipped, {count['error']} errors; "
        f"JSON in {args.out}" + (f"; above tolerance: {', '.join(bad)}" if bad else ""))
    return 1 if count["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
