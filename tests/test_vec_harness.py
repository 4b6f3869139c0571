"""The CPU kernels' vector layer on every instruction set the project targets, without torch.

- natively: tests/native/vec_harness.cpp built for this machine (-march=native) and for the
  portable x86-64 and AVX2 levels, each run against its scalar loops;
- compile-only where this machine cannot execute the code: the AVX-512 BF16 paths (CI's machines
  are AVX2 Zen 3 or AVX-512 Zen 4, so one of the two is always only compiled), and, where the cross
  compiler exists, aarch64 NEON and NEON + BF16 (.ci/arm runs those under qemu-user);
- the C++ extension sources with AVX-512 code compiled (-fsyntax-only) for AVX-512 BF16, so a change
  to a kernel cannot break a target that this CI machine does not run (the aarch64 builds of every
  extension are made and tested by .ci/arm).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "native" / "vec_harness.cpp"
CSRC = ROOT / "csrc"
X86 = platform.machine() in ("x86_64", "AMD64")
CROSS = shutil.which("aarch64-linux-gnu-g++")
#: the extension sources and the targets no CI machine can execute
AVX512_BF16 = "-march=sapphirerapids"
ARM_TARGETS = ["-march=armv8.2-a+fp16+dotprod", "-march=armv8.2-a+fp16+dotprod+bf16"]


def _cxx():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(compiler, march, out, extra=()):
    cmd = [compiler, "-O2", "-std=c++17", march, f"-I{CSRC}", str(HARNESS), "-o", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}"


@pytest.mark.skipif(not X86 or _cxx() is None, reason="x86-64 harness levels need an x86-64 C++ compiler")
@pytest.mark.parametrize("march", ["-march=native", "-march=x86-64-v3", "-march=x86-64"])
def test_harness_runs_natively(march, tmp_path):
    exe = tmp_path / "harness"
    _build(_cxx(), march, exe)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert ", 0 failed" in res.stdout and " passed" in res.stdout, res.stdout


@pytest.mark.skipif(not X86 or _cxx() is None, reason="the AVX-512 BF16 build needs an x86-64 C++ compiler")
def test_harness_compiles_for_avx512_bf16(tmp_path):
    _build(_cxx(), AVX512_BF16, tmp_path / "harness")


@pytest.mark.skipif(CROSS is None, reason="aarch64-linux-gnu-g++ is not installed (.ci/arm installs it)")
@pytest.mark.parametrize("march", ARM_TARGETS)
def test_harness_compiles_for_arm(march, tmp_path):
    _build(CROSS, march, tmp_path / "harness")


def _torch_includes():
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]


def _syntax_check(compiler, march, source):
    cmd = [compiler, "-fsyntax-only", "-std=c++17", "-fopenmp", march, f"-I{CSRC}", *_torch_includes(),
           "-DTORCH_EXTENSION_NAME=sparse_attn_check", str(CSRC / source)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{source} does not compile for {march}:\n{res.stderr[-4000:]}"


@pytest.mark.skipif(not X86 or _cxx() is None, reason="needs an x86-64 C++ compiler")
@pytest.mark.parametrize("source", ["cpu/decode.cpp", "cpu/block_sparse_fwd.cpp", "cpu/block_sparse_bwd.cpp",
                                    "cpu/topk_select.cpp"])
def test_extension_sources_compile_for_avx512_bf16(source):
    _syntax_check(_cxx(), AVX512_BF16, source)
