"""The decode kernel's software prefetches survive compilation (csrc/cpu/prefetch.h).

GCC 12 had deleted every prefetch of the paced prefetch (`Pacer::step`, decode_direct.h) from the
compiled direct products, and nothing failed: the results do not depend on it, only the speed of a
paged cache does (0.49x -> 0.72x the contiguous cache's at one thread when it came back). This
test reads the built extension's machine code: the q . K^T products over a paged cache's rows
(`TableRows`) instantiated with the pacer (`Fetch::pace`), where its step is inlined, must hold
prefetch instructions; so must those over a contiguous cache's runs with the stream prefetch
(`StridedRows`, `Fetch::stream`: csrc/cpu/stream_ahead.h).
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from conftest import needs_jit
from test_cpu_int8_decode import _ext

pytestmark = needs_jit


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


def test_paced_and_stream_prefetches_are_in_the_products():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("reads x86 machine code; the Arm builds are checked by the cross-compile in .ci/arm")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    ext = _ext()
    if not (ext.bf16_dot or ext.int8_dot):
        pytest.skip("this CPU's build has no direct bf16 / int8 products (no AVX-512 BF16 / VNNI)")
    counts = _prefetches_per_function(ext.__file__, objdump)
    # the paced instantiations (`segment<TableRows<T>, Fetch::pace>`, demangled as `(...::Fetch)1`)
    # and the streamed ones (`segment<StridedRows<T>, Fetch::stream>`, `(...::Fetch)2`): a warm
    # cache's calls run `Fetch::none` (csrc/cpu/reuse_clock.h), which holds no prefetch by design
    fetch = r", \(sparse_attn_decode::\(anonymous namespace\)::Fetch\){}>"
    for rows, mode, what in (("TableRows", 1, "paged (pacer)"), ("StridedRows", 2, "contiguous (stream)")):
        inst = re.compile(r"segment(_codes)?<sparse_attn_decode::" + rows + r"<[^<>]*>" + fetch.format(mode))
        found = {fn: n for fn, n in counts.items()
                 if ("qk_direct<" in fn or "qk_int8<" in fn) and "Split<" in fn and inst.search(fn)}
        assert found, f"no direct q . K^T product over a {what} cache found in the extension's symbols"
        empty = [fn[:160] for fn, n in found.items() if n == 0]
        assert not empty, f"{len(empty)} of {len(found)} {what} q . K^T products hold no prefetch: {empty[:3]}"
