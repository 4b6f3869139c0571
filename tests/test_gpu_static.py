"""bench/gpu_static.py, the static GPU check, without compiling (CI runs the compile itself from
.ci/run): the launch recorder sees the GPU's launch choices on CPU tensors and launches nothing,
the resource parsers read ptxas / cuobjdump text, and the pass / fail rules and occupancy hold."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from bench import gpu_static as gs  # noqa: E402


RECORD = """
import torch, sparse_attn as sa
from bench import gpu_static as gs
from sparse_attn.backends.triton import flash_fwd
from sparse_attn.backends.triton.attention import triton_layout
from sparse_attn.backends.triton.tiles import tile_config
q, k, v = (torch.randn(1, h, 40, 64).bfloat16() for h in (4, 2, 2))
cfg = tile_config("cuda", "sm90", 64)
lay = triton_layout(q, k, sa.SlidingWindow(16), cfg)
calls = gs._record(lambda: flash_fwd.flash_forward(q, k, v, lay, scale=0.125, cfg=cfg, splits=1))
assert [fn.__name__ for fn, _, _ in calls] == ["_fwd_tile_kernel"], calls
_, args, kw = calls[0]
# the GPU's choices: bfloat16 products stay bfloat16 (no interpreter upcast), the sm_90 tiles
assert kw["UPCAST"] is False and kw["CAUSAL"] is True and kw["HAS_WINDOW"] is True, kw
assert kw["num_warps"] == cfg.num_warps and kw["num_stages"] == cfg.num_stages and kw["BLOCK_D"] == 64, kw
# outside the recorder the launchers take the CPU choices again
assert flash_fwd.upcast(q) is True
key, target, src, options = gs._bind(gs.topk_launches("ci")[0], 90)
assert target.arch == 90 and options.num_warps == 4
print("ok")
"""


def test_recorder_captures_the_gpu_launch_and_runs_nothing():
    """In a process without TRITON_INTERPRET (the suite sets it; the recorder needs compiled Triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", RECORD], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_recorder_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gs._record(lambda: None)


PTXAS = """\
ptxas info    : Compiling entry function '_ZN16sparse_attn_cuda12split_kernelI13__nv_bfloat16Li8EEEvNS_17PagedDecodeParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN16sparse_attn_cuda12split_kernelI13__nv_bfloat16Li8EEEvNS_17PagedDecodeParamsE
    24 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size, 33024 bytes smem
ptxas info    : Compiling entry function '_ZN16sparse_attn_cuda12merge_kernelIfEEvNS_17PagedDecodeParamsE' for 'sm_90'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""


def test_ptxas_parser_and_rules():
    rows = gs.parse_ptxas(PTXAS, 90)
    assert [(r["spec"], r["head_dim"], r["regs"], r["spill_bytes"], r["smem_bytes"]) for r in rows] == [
        ("split_kernel bf16 NC=8", 256, 255, 24, 33024), ("merge_kernel fp32", 0, 32, 0, 0)]
    assert gs._status(rows[0]) == "ok"  # a spill above head dim 128 is allowed
    assert gs._status(dict(rows[0], head_dim=128)) == "spill"
    assert gs._status(dict(rows[1], smem_bytes=gs.SMEM_LIMIT[90] + 1)) == "smem_over_limit"
    assert gs._status(dict(rows[1], arch=80, smem_bytes=101377)) == "smem_over_limit"  # sm86 / sm89's 99 KB
    assert gs._status(dict(rows[1], error="CompilationError")) == "compile_error"


def test_known_spills_are_reported_not_failed(monkeypatch):
    row = dict(family="topk_select", spec="_topk_select_kernel topk=64 bf16", arch=90, head_dim=128,
               error=None, smem_bytes=1000, spill_bytes=64)
    assert gs._status(row) == "spill"
    monkeypatch.setitem(gs.KNOWN_SPILLS, ("topk_select", "_topk_select_kernel", "bf16", 90, 128), "why")
    assert gs._status(row) == "known_spill"
    assert gs._status(dict(row, spill_bytes=0)) == "ok"
    assert gs._status(dict(row, arch=80)) == "spill"


def test_occupancy():
    # registers are allocated per warp in units of 256: 255 registers x 4 warps -> 2 CTAs of 65536
    assert gs.occupancy(90, 255, 0, 4) == 2
    assert gs.occupancy(90, 128, 0, 4) == 4
    assert gs.occupancy(80, 64, 100_000, 4) == 1  # shared memory bound
    assert gs.occupancy(90, 32, 0, 1) == 32  # the CTA limit


def test_bad_arch_is_refused(capsys):
    before = os.environ.get("TRITON_INTERPRET")
    with pytest.raises(SystemExit):
        gs.main(["--arch", "75"])
    assert "--arch" in capsys.readouterr().err
    # a refused call leaves the process alone (the suite's later Triton tests need the interpreter flag)
    assert os.environ.get("TRITON_INTERPRET") == before
