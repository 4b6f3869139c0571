"""The CUDA sources compile with nvcc for Ampere (sm_80) and Hopper (sm_90).

CI has nvcc but no GPU and a CPU build of torch, so this test compiles the pure-CUDA translation
units (no torch headers) on their own; the torch binding (paged_decode_binding.cpp) is compiled
by the JIT build on a GPU machine (bench/gpu_check.sh). Skipped only where nvcc is not installed.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sparse_attn._build.extensions import EXTENSIONS

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")
CU_SOURCES = [s for spec in EXTENSIONS.values() if spec.get("cuda") for s in spec["sources"] if s.endswith(".cu")]


def test_cuda_sources_are_listed():
    assert CU_SOURCES, "no .cu source in the extension table"
    for s in CU_SOURCES:
        assert (CSRC / s).is_file(), s


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", CU_SOURCES)
def test_nvcc_compiles_for_sm80_and_sm90(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-c", str(CSRC / source), "-o", str(tmp_path / "out.o"), f"-I{CSRC}",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-warn-spills"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed:\n{res.stderr[-4000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
