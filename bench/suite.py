"""The default suite: a representative slice of the full sweep that finishes in minutes.

`python -m bench` runs, per pattern, one prefill length, one decode length and one training
length, the linear-attention rows and the long-generation rows (bench/longgen.py), with
sparse_attn's own choice against the fastest SDPA backend; `--full` runs the whole sweep
(bench/cases.py) with every implementation. The cases are picked from the full sweep by name,
so rows added to the sweep later appear in the "left out" summary until they are picked here.
"""
from __future__ import annotations

import re

from .cases import Case

K = 1024

# case names: kind/label/dtype/S<len> (bench/cases.py); one regular expression per picked group
DEFAULT_CASES = {
    "cpu": [r"^prefill/[^/]+/[^/]+/S4096$", r"^decode/[^/]+/[^/]+/S32768$",
            r"^train/(dense|window\d+|topk\d+)/[^/]+/S1024$",
            r"^linear-prefill/linear/[^/]+/S16384$", r"^linear-decode/linear/[^/]+/S32768$",
            r"^delta-prefill/delta/[^/]+/S16384$", r"^delta-train/delta/[^/]+/S2048$"],
    "accel": [r"^prefill/[^/]+/[^/]+/S65536$", r"^decode/[^/]+/[^/]+/S262144$", r"^train/[^/]+/[^/]+/S16384$",
              r"^linear-prefill/linear/[^/]+/S131072$", r"^linear-decode/linear/[^/]+/S32768$",
              r"^delta-prefill/delta/[^/]+/S16384$", r"^delta-train/delta/[^/]+/S16384$"],
}
# implementation names (bench/impls.py); the SDPA backends a device cannot run drop out by themselves
DEFAULT_IMPLS = {
    "cpu": ("sparse_attn", "sdpa.flash", "transformers"),
    "accel": ("sparse_attn", "sdpa.flash", "sdpa.efficient", "sdpa.cudnn", "flex", "flash_attn", "flashinfer", "fla",
              "transformers"),
}


def default_dtype(device) -> str:
    """One dtype for the default suite: bfloat16, except on a CPU without bf16 dot-product
    instructions (there PyTorch's bf16 matmul is 10-50x slower than float32, for every implementation)."""
    if device.type != "cpu":
        return "bfloat16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def device_class(device) -> str:
    return "cpu" if device.type == "cpu" else "accel"


def pick_cases(cases, device):
    """(the default suite's cases, the left-out ones), both in sweep order. Only the length sweep's
    cases (each pattern at its default parameter); the sparsity sweep is --full's."""
    pats = [re.compile(p) for p in DEFAULT_CASES[device_class(device)]]
    keep = [c for c in cases if "length" in c.sweeps and any(p.search(c.name) for p in pats)]
    names = {c.name for c in keep}
    return keep, [c for c in cases if c.name not in names]


def pick_impls(impls, device):
    wanted = DEFAULT_IMPLS[device_class(device)]
    keep = [i for i in impls if i.name in wanted]
    return keep, [i for i in impls if i.name not in wanted]


def _lengths(ns) -> str:
    ks = sorted(set(ns))
    return ",".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in ks)


def left_out_summary(cases, impls) -> list[str]:
    """Lines saying what the default suite did not run, grouped by kind and dtype."""
    groups: dict = {}
    for c in cases:
        groups.setdefault((c.kind, str(c.dtype).removeprefix("torch.")), []).append(c)
    lines = [f"  {kind} {dt}: {len(cs)} cases ({', '.join(sorted({c.label for c in cs}))} at S={_lengths(c.Sk for c in cs)})"
             for (kind, dt), cs in groups.items()]
    if impls:
        lines.append(f"  implementations: {', '.join(i.name for i in impls)}")
    return lines


#: `python -m bench --headline`: the GPU targets the issues state (dense causal 16K forward against
#: SDPA flash; TopK(16) at 128K forward and forward + backward; SlidingWindow(4096) at 128K against
#: its ideal; dense and TopK decode at 128K with batch 8 against the memory bandwidth; chunked linear
#: attention against fla), each against the baselines of the same run (`headline_impls`, FlexAttention
#: on the same masks). On a CPU the same kinds at lengths that finish in a few minutes on 2 cores,
#: so the part of `bench/gpu_check.sh` that is not GPU time is known.
def headline_impls(device) -> tuple:
    if device.type == "cpu":  # FlexAttention on a CPU compiles for minutes: left to --full
        return ("sparse_attn", "sdpa.flash")
    # each GPU backend's own rows too: the scheduler's choice hides the kernel it did not pick (the
    # first H200 run measured cuda.splitkv_decode only; the cost model then moved Dense decode to SDPA,
    # and the Triton decode's figure is still an estimate). A row whose kernel was timed already in
    # the case is copied, not timed again (bench/runner.py)
    return ("sparse_attn", "sparse_attn[triton]", "sparse_attn[cuda]", "sdpa.flash", "sdpa.cudnn", "flex", "fla")


def headline_cases(device, dtype) -> list:
    def case(kind, fam, param, s, *, b=1, heads=(32, 8)):
        sq = 1 if kind in ("decode", "linear-decode") else s
        return Case(kind, fam, param, b, heads[0], heads[1], sq, s, 128, dtype, ("headline",))

    if device.type == "cpu":
        return [case("prefill", "dense", None, 4 * K), case("prefill", "topk", 16, 16 * K),
                case("train", "topk", 16, 4 * K), case("prefill", "window", 4096, 16 * K),
                case("decode", "dense", None, 32 * K, b=8), case("decode", "topk", 16, 32 * K, b=8),
                case("linear-prefill", "linear", None, 16 * K, heads=(8, 8))]
    return [case("prefill", "dense", None, 16 * K), case("prefill", "topk", 16, 128 * K),
            case("train", "topk", 16, 128 * K), case("prefill", "window", 4096, 128 * K),
            case("decode", "dense", None, 128 * K, b=8), case("decode", "topk", 16, 128 * K, b=8),
            case("linear-prefill", "linear", None, 128 * K, heads=(8, 8))]
