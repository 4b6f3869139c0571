"""A C++ extension that fails to build is said on stderr, once, with the compiler's error line: the
scheduler then plans without the kernels that need it (explain() names the failure), and a user
should not have to find that out from a 40x slower call."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import needs_jit

ROOT = Path(__file__).resolve().parents[1]


@needs_jit
@pytest.mark.skipif(importlib.util.find_spec("sparse_attn._ext_cpu_decode") is not None,
                    reason="an ahead-of-time build is installed: nothing is built at run time")
def test_a_failed_build_is_said_once(tmp_path):
    src = tmp_path / "csrc"
    import shutil

    shutil.copytree(ROOT / "csrc", src)
    from sparse_attn._build.extensions import EXTENSIONS

    for source in EXTENSIONS["cpu_decode"]["sources"]:  # every source, so the build fails at once
        (src / source).write_text("#error deliberately broken for this test\n")
    code = textwrap.dedent("""
        import torch, sparse_attn as sa
        c = sa.KVCache(1, 2, 32, 16, dtype=torch.float32)
        c.append(torch.randn(1, 2, 16, 32), torch.randn(1, 2, 16, 32))
        q = torch.randn(1, 4, 1, 32)
        for _ in range(2):
            out = sa.attention_with_cache(q, c, sa.Dense())
        assert out.shape == (1, 4, 1, 32)
        print(sa.plan_with_cache(q, c, sa.Dense()).explain())
    """)
    env = dict(os.environ, SPARSE_ATTN_CSRC=str(src), SPARSE_ATTN_CACHE=str(tmp_path / "jit"), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    said = [ln for ln in r.stderr.splitlines() if "failed to build" in ln and "cpu_decode" in ln]
    assert len(said) == 1, r.stderr[-2000:]
    assert "deliberately broken" in said[0] and "explain()" in said[0]
    assert "cpu.decode" in r.stdout and "failed to build" in r.stdout  # the plan names it too
