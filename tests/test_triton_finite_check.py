"""A finite check a GPU compiler cannot fold: the first GPU run (2026-12-04) found every Triton
softmax kernel returning NaN because `tl.where((s - s) == 0.0, s, nan)` on `s = dot * scale` was
compiled (sm_90, Triton 3.6) as `fma(dot, scale, -(dot * scale)) == 0`: the product's rounding
error, non-zero unless the scale is a power of two. The interpreter evaluates it as written, so
the CPU tests passed. The kernels now test `abs(s) < inf`; this test keeps the idiom out of the
GPU sources, and `bench/gpu_static.py` (CI compiles every GPU kernel for sm_80 / sm_90 with two
Triton versions) fails a kernel whose PTX has such an fma compared with zero; its reader is tested
here on the lines the old decode kernel compiled to."""
from __future__ import annotations

import re
from pathlib import Path

from bench.gpu_static import contracted_self_differences

ROOT = Path(__file__).resolve().parent.parent
GPU_SOURCES = sorted((ROOT / "sparse_attn" / "backends" / "triton").glob("*.py")) + sorted(
    (ROOT / "csrc" / "cuda").glob("*.cu*"))
IDIOM = re.compile(r"\(\s*(\w+)\s*-\s*\1\s*\)\s*==\s*0")


def test_no_self_difference_finite_check_in_gpu_sources():
    assert GPU_SOURCES, "no GPU sources found"
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in GPU_SOURCES
           for i, line in enumerate(p.read_text().splitlines(), 1) if IDIOM.search(line)]
    assert not bad, f"`(x - x) == 0` as a finite check (a GPU compiler contracts it into an fma): {bad}"


def test_idiom_pattern_finds_the_old_form():
    assert IDIOM.search('s = tl.where((s - s) == 0.0, s, float("nan"))')
    assert not IDIOM.search('s = tl.where(tl.abs(s) < float("inf"), s, float("nan"))')


def test_ptx_reader_finds_the_contracted_form():
    old = ("mul.f32 %r659, %r79, %r357;\nneg.f32 %r660, %r659;\nfma.rn.f32 %r661, %r79, %r357, %r660;\n"
           "setp.eq.f32 %p53, %r661, 0f00000000;\n")
    assert contracted_self_differences(old) == ["fma.rn.f32 %r661, %r79, %r357, %r660;"]
    assert not contracted_self_differences(old.replace("%r661, 0f", "%r662, 0f"))  # not compared with 0
    assert not contracted_self_differences(old.replace("%r660;\nset", "%r658;\nset"))  # a plain fma
