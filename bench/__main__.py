"""`python -m bench`: every implementation (sparse_attn's choice and each registered backend, SDPA
per backend, FlexAttention, flash-attn / FlashInfer / fla when importable) on the sweep for the
detected device; prints a table, writes JSON + CSV and PNG plots (matplotlib, optional)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .cases import DTYPES, sweep
from .hardware import detect_device, environment
from .impls import all_impls, probe_sdpa, sdpa_impls
from .output import table, write_csv, write_json
from .progress import Progress
from .roofline import measure_roofline, merge_rooflines, refresh_fractions
from .runner import Calibration, run_case


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sweep (under 4 minutes on a 2-core CPU)")
    p.add_argument("--out", default="bench/results/latest.json",
                   help="JSON output path; the CSV and the plots go beside it (<stem>.csv, <stem>-plots/)")
    p.add_argument("--device", default=None, help="cpu, cuda, npu, ... (default: detected)")
    p.add_argument("--dtype", default=None, help="comma-separated, some of: " + ", ".join(DTYPES) +
                   " (default: bfloat16,float32; with --quick float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--filter", default=None,
                   help="only cases whose name contains one of these comma-separated substrings "
                        "(names: kind/pattern/dtype/S<len>, see --list)")
    p.add_argument("--impl", default=None,
                   help="only implementations whose name contains one of these comma-separated substrings "
                        "(e.g. 'sparse_attn,sdpa'; see --list)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per implementation per case: longer ones are skipped with the estimate recorded "
                        "(default 5 with --quick, 60 otherwise)")
    p.add_argument("--timing", type=float, default=None,
                   help="seconds of timed calls per row, the median reported (default 0.3 with --quick, 3 "
                        "otherwise); a call longer than this is timed once, cold. Raise it where seconds-long "
                        "rows are compared: one sample of a 3 s call moved by +-30%% on the 2-core VM")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--list", action="store_true", help="list the cases and implementations, and exit")
    return p.parse_args(argv)


def _match(name: str, spec: str | None) -> bool:
    return spec is None or any(s.strip() and s.strip() in name for s in spec.split(","))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = detect_device(args.device)
    # quick on CPU: float32 only (CPUs without bf16 instructions run bf16 matmuls 10-50x slower)
    spec = args.dtype or (("float32" if device.type == "cpu" else "bfloat16") if args.quick else "bfloat16,float32")
    try:
        dtypes = [DTYPES[d.strip()] for d in spec.split(",")]
    except KeyError as e:
        sys.exit(f"--dtype: unknown dtype {e}; expected some of {', '.join(DTYPES)}")
    budget = args.budget if args.budget is not None else (5.0 if args.quick else 60.0)
    timing_budget = args.timing if args.timing is not None else (0.3 if args.quick else 3.0)
    if not timing_budget > 0:
        sys.exit(f"--timing: expected a positive number of seconds, got {args.timing}")
    cases = [c for c in sweep(device, args.quick, dtypes) if _match(c.name, args.filter)]
    impls, external = all_impls(device)
    impls = [i for i in impls if _match(i.name, args.impl)]
    if args.list:
        print("implementations: " + ", ".join(i.name for i in impls))
        print("\n".join(f"{c.name}  [{', '.join(c.sweeps)}]" for c in cases))
        return 0
    # SDPA backends that run no dtype of this sweep on this device are left out (listed in the JSON)
    sdpa_status = {s.name: [probe_sdpa(s.backend, device, d) for d in dtypes] for s in sdpa_impls()}
    impls = [i for i in impls if i.group != "sdpa" or not all(sdpa_status[i.name])]
    if not cases or not impls:
        sys.exit(f"no case matches --filter {args.filter!r}" if not cases else f"no implementation matches --impl {args.impl!r}")

    progress = Progress(len(cases))
    log = progress.message
    env = environment(device)
    env.update(quick=args.quick, budget_s=budget, timing_s=timing_budget, dtypes=[str(d).removeprefix("torch.") for d in dtypes],
               implementations=[i.name for i in impls], external_libraries=external,
               sdpa_backends={n: next((w for w in ws if w), None) if all(ws) else "ok" for n, ws in sdpa_status.items()})
    log(f"bench on {env['device_name']}: {len(cases)} cases x {len(impls)} implementations "
        f"({', '.join(i.name for i in impls)}); measuring the roofline ...")
    if device.type == "cpu" and env["load_average"][0] > 0.5:
        log(f"warning: load average {env['load_average'][0]:.1f} on {env['cpu_count']} cores: "
            "other work is running, CPU timings will be noisy")
    roofline = measure_roofline(device, dtypes, quick=args.quick)
    calib, cache, rows = Calibration(roofline), {}, []
    for i, case in enumerate(cases, 1):
        progress.start_case(i, case.name)
        case_rows = run_case(case, impls, device, roofline, calib, budget_s=budget, timing_budget_s=timing_budget,
                             cache=cache)
        rows += case_rows
        n = {s: sum(r.get("status") == s for r in case_rows) for s in ("ok", "skipped", "error")}
        best = min((r for r in case_rows if r.get("status") == "ok"), key=lambda r: r["ms"], default=None)
        what = f"fastest {best['impl']} {best['ms']:.2f} ms" if best else "nothing ran"
        progress.end_case(i, f"{case.name}: {what}; {n['ok']} ok, {n['skipped']} skipped, {n['error']} errors")
        for r in case_rows:
            if r.get("status") == "error":
                log(f"    error in {r['impl']}: {r['error']}")

    env["load_average_end"] = os.getloadavg()
    roofline_start = roofline
    roofline = merge_rooflines(roofline, measure_roofline(device, dtypes, quick=args.quick))
    roofline["start"] = {k: roofline_start[k] for k in ("copy_gbps", "matmul_gflops")}
    refresh_fractions(rows, roofline)
    elapsed = progress.elapsed()
    print(table(rows, roofline, env))
    stem = os.path.splitext(args.out)[0]
    write_json(args.out, env, roofline, rows, elapsed)
    write_csv(stem + ".csv", env, rows)
    written = [args.out, stem + ".csv"]
    if not args.no_plots:
        from .plots import make_plots
        written += make_plots({"environment": env, "roofline": roofline, "rows": rows}, stem + "-plots")
    count = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "unsupported", "error")}
    bad = [f"{r['case']} {r['impl']}" for r in rows if r.get("error_ok") is False]
    log(f"done in {elapsed:.1f} s: {len(rows)} rows: " + ", ".join(f"{v} {k}" for k, v in count.items())
        + f"; wrote {', '.join(written[:2])}" + (f" and {len(written) - 2} plots" if len(written) > 2 else "")
        + (f"; above tolerance: {', '.join(bad)}" if bad else ""))
    # exit status: errors or tolerance misses of sparse_attn itself (a baseline's failure is only reported)
    ours = [r for r in rows if r["group"] == "sparse_attn"]
    return 1 if any(r.get("status") == "error" or r.get("error_ok") is False for r in ours) else 0


if __name__ == "__main__":
    sys.exit(main())
