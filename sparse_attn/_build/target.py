"""Which instruction-set target a just-in-time C++ build compiles for.

x86-64: `-march=native` (the compiler reads the host CPU). aarch64: explicit `-march` flags built
from the CPU's feature list (`/proc/cpuinfo`), naming only the extensions the kernels use:
the NEON baseline `armv8.2-a+fp16+dotprod` where the CPU has half-precision arithmetic and dot
products (every Armv8.2+ core people run models on: Neoverse N1/V1/V2, Cortex-A7x/X, Apple M,
Snapdragon X), `+bf16` where it has the BF16 extension (the kernels' bfloat16 products use
`bfdot`), plain `armv8-a` otherwise. SVE and I8MM are not requested: no kernel uses them yet
(docs/arm.md says why), and a flag a kernel does not use only narrows where a build loads.

`SPARSE_ATTN_CPU_TARGET` overrides the choice: flags such as `-march=armv8.2-a+fp16+dotprod`
(or a bare `armv8.2-a+...` / `x86-64-v3`, taken as `-march=...`). The flags are part of the
build's cache key, and every extension checks at import that the CPU has what it was built for
(csrc/cpu/target_check.h), so a build for a newer CPU is refused, never run into SIGILL.
"""
from __future__ import annotations

import os
import platform

NATIVE = "-march=native"
ARM_BASELINE = "armv8.2-a+fp16+dotprod"


def _features() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(val.split())
    except OSError:
        pass
    return set()


def arm_march(features: set[str]) -> str:
    """The `-march` value for an aarch64 CPU with these /proc/cpuinfo features."""
    if not {"asimdhp", "asimddp"} <= features:
        return "armv8-a"
    return ARM_BASELINE + ("+bf16" if "bf16" in features else "")


def target_flags() -> list[str]:
    """Compiler flags that select the instruction set of a JIT build on this machine."""
    env = os.environ.get("SPARSE_ATTN_CPU_TARGET", "").strip()
    if env:
        return [f if f.startswith("-") else f"-march={f}" for f in env.split()]
    if platform.machine() in ("aarch64", "arm64"):
        feats = _features()
        if not feats and platform.system() == "Darwin":  # no /proc: every Apple M core has the baseline
            return [f"-march={ARM_BASELINE}"]
        return [f"-march={arm_march(feats)}"]
    return [NATIVE]


def resolve(flags: list[str]) -> list[str]:
    """`flags` with the `-march=native` placeholder of extensions.py replaced by this machine's target."""
    out: list[str] = []
    for f in flags:
        out.extend(target_flags() if f == NATIVE else [f])
    return out
