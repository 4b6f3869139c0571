"""The decode kernel's software prefetches survive compilation (csrc/cpu/prefetch.h).

GCC 12 had deleted every prefetch of the paced prefetch (`Pacer::step`, decode_direct.h) from the
compiled direct products, and nothing failed: the results do not depend on it, only the speed of a
paged cache does (0.49x -> 0.72x the contiguous cache's at one thread when it came back). This
test reads the built extension's machine code: the q . K^T products over a paged cache's rows
(`TableRows`) instantiated with the pacer (`Paced = true`), where its step is inlined, must hold
prefetch instructions.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from test_cpu_int8_decode import NO_JIT, _ext

pytestmark = pytest.mark.skipif(NO_JIT, reason="SPARSE_ATTN_DISABLE_JIT=1: the C++ extension is not built")


def _prefetches_per_function(so_path: str, objdump: str) -> dict[str, int]:
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", so_path], capture_output=True, text=True,
                         check=True).stdout
    counts: dict[str, int] = {}
    fn = None
    for line in out.splitlines():
        if line.endswith(">:"):
            fn = line
            counts.setdefault(fn, 0)
        elif fn is not None and "prefetch" in line:
            counts[fn] += 1
    return counts


def test_paced_prefetch_is_in_the_paged_products():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("reads x86 machine code; the Arm builds are checked by the cross-compile in .ci/arm")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    ext = _ext()
    if not (ext.bf16_dot or ext.int8_dot):
        pytest.skip("this CPU's build has no direct bf16 / int8 products (no AVX-512 BF16 / VNNI)")
    counts = _prefetches_per_function(ext.__file__, objdump)
    # the paced instantiations (`segment<TableRows<T>, true>`): a warm cache's calls run the
    # unpaced ones (`, false>`, csrc/cpu/reuse_clock.h), which hold no prefetch by design
    paced = re.compile(r"segment(_codes)?<sparse_attn_decode::TableRows<[^<>]*>, true>")
    paged = {fn: n for fn, n in counts.items()
             if ("qk_direct<" in fn or "qk_int8<" in fn) and "Split<" in fn and paced.search(fn)}
    assert paged, "no direct q . K^T product over a paged cache found in the extension's symbols"
    empty = [fn[:160] for fn, n in paged.items() if n == 0]
    assert not empty, f"{len(empty)} of {len(paged)} paged q . K^T products hold no prefetch instruction: {empty[:3]}"
