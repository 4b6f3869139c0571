"""The CPU kernels flush underflowing results to zero while they run (csrc/cpu/flush_to_zero.h:
MXCSR's FTZ bit, set per worker thread) and give the caller its floating-point mode back: after a
forward, a backward and a decode run on the calling thread (one thread: at::parallel_for runs the
work inline), a float32 product that underflows into the denormal range is still denormal there.
"""
from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from conftest import needs_jit, make_qkv_for

pytestmark = needs_jit

TINY = 1e-38  # a normal float32; half of it is denormal


def _denormals_kept() -> bool:
    return float((torch.tensor([TINY]) * 0.5).item()) != 0.0


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_caller_mode_restored(one_thread, dtype):
    assert _denormals_kept()
    q, k, v = make_qkv_for(sa.Dense(), 1, 4, 2, 130, 130, 64, dtype=dtype)
    q.requires_grad_(True)
    out = sa.attention(q, k, v, sa.Dense(), backend="cpu")  # cpu.block_sparse forward
    assert _denormals_kept()
    out.float().sum().backward()  # its backward
    assert _denormals_kept()
    step = sa.attention(q.detach()[:, :, -1:], k, v, sa.Dense(), backend="cpu")  # cpu.decode
    assert step.shape[2] == 1 and _denormals_kept()
