"""`python -m bench`: the default suite (bench/suite.py: per pattern one prefill, decode and training
length, linear attention and long generation, sparse_attn's choice against the fastest SDPA backend;
minutes, extension builds included); `--full`: every implementation (sparse_attn's choice and each
registered backend, SDPA per backend, FlexAttention, flash-attn / FlashInfer / fla when importable)
on the whole sweep for the detected device. Prints a table, writes JSON + CSV and PNG plots
(matplotlib, optional)."""
from __future__ import annotations

import argparse
import os
import resource
import sys

import torch

from . import extensions, longgen, suite
from .cases import DTYPES, sweep
from .estimate import call_seconds, case_seconds
from .hardware import detect_device, environment
from .impls import all_impls, probe_sdpa, sdpa_impls
from .output import table, write_csv, write_json
from .progress import Progress
from .roofline import measure_roofline, merge_rooflines, refresh_fractions
from .runner import Calibration, run_case


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true",
                      help="the whole sweep with every implementation (hours on a 2-core CPU: bound it with "
                           "--filter and --budget)")
    mode.add_argument("--quick", action="store_true", help="small sweep, float32 on CPU (under 4 minutes on a 2-core CPU)")
    mode.add_argument("--headline", action="store_true",
                      help="the issues' GPU targets against their baselines (bench/suite.py headline_impls; "
                           "what bench/gpu_check.sh runs); on a CPU the same kinds at smaller lengths")
    p.add_argument("--out", default="bench/results/latest.json",
                   help="JSON output path; the CSV and the plots go beside it (<stem>.csv, <stem>-plots/)")
    p.add_argument("--device", default=None, help="cpu, cuda, npu, ... (default: detected)")
    p.add_argument("--dtype", default=None, help="comma-separated, some of: " + ", ".join(DTYPES) +
                   " (default: bfloat16,float32 with --full; float32 on CPU with --quick; in the default suite "
                   "bfloat16, or float32 on a CPU without bf16 instructions)")
    p.add_argument("--filter", default=None,
                   help="only cases whose name contains one of these comma-separated substrings "
                        "(names: kind/pattern/dtype/S<len>, see --list); picks from the whole sweep, as --full")
    p.add_argument("--impl", default=None,
                   help="only implementations whose name contains one of these comma-separated substrings "
                        "(e.g. 'sparse_attn,sdpa'; see --list); picks from the whole sweep, as --full")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per implementation per case: longer ones are skipped with the estimate recorded "
                        "(default 5 with --quick, 120 in the default suite, 60 with --full)")
    p.add_argument("--timing", type=float, default=None,
                   help="seconds of timed calls per row, the median reported (default 0.3 with --quick, 1 in the "
                        "default suite, 3 with --full); a call longer than this is timed once, cold. Raise it where seconds-long "
                        "rows are compared: one sample of a 3 s call moved by +-30%% on the 2-core VM")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--list", action="store_true", help="list the cases and implementations, and exit")
    return p.parse_args(argv)


def _match(name: str, spec: str | None) -> bool:
    return spec is None or any(s.strip() and s.strip() in name for s in spec.split(","))


def process_age() -> float:
    """Seconds since this process started (so 'elapsed' counts the imports and the builds too)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return max(0.0, up - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def cpu_seconds() -> dict:
    """User + system CPU seconds of this process and of its finished children (the compilers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"self": me.ru_utime + me.ru_stime, "children": kids.ru_utime + kids.ru_stime}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = detect_device(args.device)
    # quick on CPU: float32 only (CPUs without bf16 instructions run bf16 matmuls 10-50x slower)
    # --filter / --impl pick from the whole sweep and every implementation (docs/perf pages' commands
    # name cases and kernels the default suite leaves out)
    default_suite = not (args.full or args.quick or args.headline or args.filter or args.impl)
    spec = args.dtype or (("float32" if device.type == "cpu" else "bfloat16") if args.quick else
                          suite.default_dtype(device) if default_suite or args.headline else "bfloat16,float32")
    try:
        dtypes = [DTYPES[d.strip()] for d in spec.split(",")]
    except KeyError as e:
        sys.exit(f"--dtype: unknown dtype {e}; expected some of {', '.join(DTYPES)}")
    # the default suite's rows are few and chosen: a row is skipped only past 2 minutes (a loaded machine)
    budget = args.budget if args.budget is not None else (5.0 if args.quick else 120.0 if default_suite else 60.0)
    timing_budget = args.timing if args.timing is not None else (0.3 if args.quick else 1.0 if default_suite else 3.0)
    if not timing_budget > 0:
        sys.exit(f"--timing: expected a positive number of seconds, got {args.timing}")
    cases = suite.headline_cases(device, dtypes[0]) if args.headline else sweep(device, args.quick, dtypes)
    impls, external = all_impls(device)
    left_cases, left_impls = [], []
    if args.headline:
        impls = [i for i in impls if i.name in suite.headline_impls(device)]
    if default_suite:
        cases, left_cases = suite.pick_cases(cases, device)
        impls, left_impls = suite.pick_impls(impls, device)
    cases = [c for c in cases if _match(c.name, args.filter)]
    impls = [i for i in impls if _match(i.name, args.impl)]
    # long generation (bench/longgen.py): a short run in the default suite, issue 15's 32K + 2K with --full
    lg = None if args.quick or args.headline else ((8192, 512) if default_suite and device.type == "cpu" else (32768, 2048))
    if lg and not (_match(f"longgen/S{lg[0]}+{lg[1]}", args.filter) and _match("sparse_attn", args.impl)):
        lg = None
    left = suite.left_out_summary(left_cases, left_impls)
    if default_suite and args.dtype is None:
        left.append(f"  dtypes other than {spec} (--dtype, or --full for bfloat16 and float32)")
    if args.list:
        print("implementations: " + ", ".join(i.name for i in impls))
        print("\n".join(f"{c.name}  [{', '.join(c.sweeps)}]" for c in cases))
        if lg:
            print(f"longgen/S{lg[0]}+{lg[1]}  (bench/longgen.py: every pattern + SDPA over a growing tensor)")
        if left:
            print("left out of the default suite (--full runs them):\n" + "\n".join(left))
        return 0
    # SDPA backends that run no dtype of this sweep on this device are left out (listed in the JSON)
    sdpa_status = {s.name: [probe_sdpa(s.backend, device, d) for d in dtypes] for s in sdpa_impls()}
    impls = [i for i in impls if i.group != "sdpa" or not all(sdpa_status[i.name])]
    if (not cases and not lg) or not impls:
        sys.exit(f"no case matches --filter {args.filter!r}" if not cases else f"no implementation matches --impl {args.impl!r}")

    log = Progress(0).message
    env = environment(device)
    name = "default" if default_suite else "quick" if args.quick else "headline" if args.headline else "full"
    env.update(suite=name, left_out=left,
               quick=args.quick, budget_s=budget, timing_s=timing_budget, dtypes=[str(d).removeprefix("torch.") for d in dtypes],
               implementations=[i.name for i in impls], external_libraries=external,
               sdpa_backends={n: next((w for w in ws if w), None) if all(ws) else "ok" for n, ws in sdpa_status.items()})
    log(f"bench on {env['device_name']}: {env['suite']} suite, {len(cases)} cases x {len(impls)} implementations "
        f"({', '.join(i.name for i in impls)})" + (f" + long generation ({lg[0]} + {lg[1]} tokens)" if lg else ""))
    if left:
        log("left out of the default suite (--full runs them):\n" + "\n".join(left))
    if device.type == "cpu" and env["load_average"][0] > 0.5:
        log(f"warning: load average {env['load_average'][0]:.1f} on {env['cpu_count']} cores: "
            "other work is running, CPU timings will be noisy")
    env["extension_builds_s"] = extensions.prepare(device, log)
    log("measuring the roofline ...")
    roofline = measure_roofline(device, dtypes, quick=args.quick)
    seen: set = set()
    priors = [call_seconds(c, impls, device, roofline) for c in cases]
    estimates = [case_seconds(c, impls, device, roofline, timing_s=timing_budget, budget_s=budget, seen=seen, calls=pr)
                 for c, pr in zip(cases, priors)]
    if lg:
        estimates.append(longgen.estimate_seconds(*lg, roofline))
    progress = Progress(len(estimates), estimates=estimates)
    progress.start -= process_age()
    log(f"estimated from the roofline and the kernels' cost(), before measuring: {sum(estimates) / 60:.1f} min "
        f"for the {len(estimates)} cases")
    calib, cache, rows = Calibration(roofline), {}, []
    for i, case in enumerate(cases, 1):
        progress.start_case(i, case.name)
        case_rows = run_case(case, impls, device, roofline, calib, budget_s=budget, timing_budget_s=timing_budget,
                             cache=cache, priors=priors[i - 1])
        rows += case_rows
        n = {s: sum(r.get("status") == s for r in case_rows) for s in ("ok", "skipped", "error")}
        best = min((r for r in case_rows if r.get("status") == "ok"), key=lambda r: r["ms"], default=None)
        what = f"fastest {best['impl']} {best['ms']:.2f} ms" if best else "nothing ran"
        progress.end_case(i, f"{case.name}: {what}; {n['ok']} ok, {n['skipped']} skipped, {n['error']} errors")
        for r in case_rows:
            if r.get("status") == "error":
                log(f"    error in {r['impl']}: {r['error']}")
        # the rows so far, rewritten after each case: a run stopped by a time limit (bench/gpu_check.sh)
        # still leaves what it measured (marked partial; the full write below replaces it)
        write_json(args.out, env, roofline, rows, progress.elapsed(), extra={"partial": f"{i} of {len(cases)} cases"})

    lg_rows = []
    if lg:
        i = len(cases) + 1
        progress.start_case(i, f"longgen/S{lg[0]}+{lg[1]}")
        lg_rows = longgen.run_longgen(prompt=lg[0], new=lg[1], device=device, dtype=dtypes[0], log=log)
        progress.end_case(i, f"long generation: {sum(r.get('status') == 'ok' for r in lg_rows)} rows")
    env["load_average_end"] = os.getloadavg()
    roofline_start = roofline
    roofline = merge_rooflines(roofline, measure_roofline(device, dtypes, quick=args.quick))
    roofline["start"] = {k: roofline_start[k] for k in ("copy_gbps", "matmul_gflops")}
    refresh_fractions(rows, roofline)
    elapsed = progress.elapsed()
    print(table(rows, roofline, env))
    if lg_rows:
        print(longgen.table(lg_rows))
    if left:
        print("left out of the default suite (python -m bench --full runs them):\n" + "\n".join(left))
    env["cpu_seconds"] = cpu_seconds()
    stem = os.path.splitext(args.out)[0]
    write_json(args.out, env, roofline, rows, elapsed, extra={"longgen": lg_rows} if lg_rows else None)
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
    if device.type == "cpu":  # how much of the wall time this process had the CPU for
        cpu = env["cpu_seconds"]
        log(f"CPU time: {cpu['self']:.0f} s in this process + {cpu['children']:.0f} s in compilers, over "
            f"{elapsed:.0f} s of wall time on {env['cpu_count']} cores (load average {env['load_average'][0]:.1f} "
            f"at the start, {env['load_average_end'][0]:.1f} at the end)")
    # exit status: errors or tolerance misses of sparse_attn itself (a baseline's failure is only reported)
    ours = [r for r in rows if r["group"] == "sparse_attn"]
    return 1 if any(r.get("status") == "error" or r.get("error_ok") is False for r in ours) else 0


if __name__ == "__main__":
    sys.exit(main())
