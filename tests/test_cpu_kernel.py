"""The `cpu` backend's C++ forward kernel against the float64 oracle, over the shared layout."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sparse_attn as sa
from conftest import BLOCK, DTYPE_IDS, check_against_oracle, make_pattern, make_qkv_for
import oracle

CONFIGS = [  # pattern, B, Hq, Hkv, Sq, Sk, D, Dv
    ("dense_causal", 1, 4, 4, 37, 37, 64, 64),
    ("dense_causal", 2, 8, 2, 5, 71, 80, 80),
    ("dense_full", 1, 8, 1, 20, 50, 64, 32),
    ("window", 1, 4, 1, 71, 71, 128, 128),
    ("window_sinks", 2, 8, 1, 1, 71, 64, 64),
    ("blocksparse", 2, 4, 2, 37, 37, 80, 80),
    ("blocksparse", 1, 8, 8, 5, 71, 64, 64),
    ("topk", 1, 8, 1, 71, 71, 64, 64),
    ("topk", 2, 4, 2, 1, 50, 128, 128),
    ("topk", 1, 2, 1, 20, 71, 80, 80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind,b,hq,hkv,sq,sk,d,dv", CONFIGS,
                         ids=[f"{c[0]}-gqa{c[2] // c[3]}-sq{c[4]}-sk{c[5]}-d{c[6]}" for c in CONFIGS])
def test_cpu_forward_against_oracle(kind, b, hq, hkv, sq, sk, d, dv, dtype):
    pattern = make_pattern(kind, b=b, hkv=hkv, sk=sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dv, dtype=dtype)
    check_against_oracle(lambda q, k, v: sa.attention(q, k, v, pattern, backend="cpu"),
                         lambda q, k, v: oracle.oracle_attention(q, k, v, pattern),
                         lambda q, k, v: oracle.masked_attention_in_dtype(q, k, v, pattern),
                         dict(q=q, k=k, v=v), dtype=dtype, grads=False)


def test_rows_with_no_visible_key_are_zero():
    lay = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    lay[0, 0, 2, 1] = True
    q, k, v = make_qkv_for(sa.Dense(), 1, 2, 1, 40, 40, 16)
    out = sa.attention(q, k, v, sa.BlockSparse(lay, block_size=BLOCK), backend="cpu")
    assert (out[:, :, :32] == 0).all() and out[:, :, 32:].abs().sum() > 0


def test_not_chosen_for_training():
    q, k, v = make_qkv_for(sa.Dense(), 1, 2, 1, 40, 40, 16, requires_grad=True)
    p = sa.plan(q, k, v, sa.SlidingWindow(8))
    cpu = next(c for c in p.candidates if c.kernel.name == "cpu.block_sparse_fwd")
    assert any("no backward" in r for r in cpu.reasons)
    with pytest.raises(ValueError, match="no backward"):
        sa.attention(q, k, v, sa.SlidingWindow(8), backend="cpu")


def test_failed_build_is_reported_not_fatal(tmp_path):
    """A broken toolchain or source tree: import works, the kernel says why, the reference runs."""
    code = (
        "import torch, sparse_attn as sa\n"
        "q = torch.randn(1, 2, 30, 16); k = torch.randn(1, 1, 30, 16)\n"
        "p = sa.plan(q, k, k, sa.SlidingWindow(8))\n"
        "print(p.kernel.name)\n"
        "print(p.explain())\n"
        "sa.attention(q, k, k, sa.SlidingWindow(8))\n"
    )
    env = {"SPARSE_ATTN_CSRC": str(tmp_path / "no-such-csrc"), "SPARSE_ATTN_CACHE": str(tmp_path / "cache"),
           "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    first, rest = res.stdout.split("\n", 1)
    assert first == "reference.chunked"
    assert "C++ extension 'cpu' unavailable" in rest and "missing source" in rest
