"""Decode (and chunked prefill) of the tokens of a sequence equals the matching rows of its prefill.

Queries are end-aligned, so query `t` of a prefill (Sq == Sk == S) sits at position `t`, and the
decode step `attention(q[:, :, t:t+1], k[:, :, :t+1], v[:, :, :t+1])` puts its single query at the
same position `t`. A BlockSparse layout is indexed by absolute positions, so the decode step uses
its top-left `ceil((t+1)/bs)` square corner.
"""
import math

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import BACKENDS, BLOCK, DTYPE_IDS, make_pattern, make_qkv_for, randn

CAUSAL_KINDS = ["dense_causal", "window", "window_sinks", "blocksparse", "blocksparse_bcast", "topk",
                "topk_wide", "window_linear"]
S = 45                                         # 3 blocks of 16, the last partial
POSITIONS = [0, 1, 15, 16, 17, 31, 32, 44]     # around every block boundary


def truncated(pattern, sk):
    """The pattern as seen by a call whose keys are the first `sk` ones."""
    if isinstance(pattern, sa.BlockSparse):
        n = math.ceil(sk / pattern.block_size)
        return sa.BlockSparse(pattern.layout[:, :, :n, :n].contiguous(), block_size=pattern.block_size)
    return pattern


def setup(kind, dtype, hq=4, hkv=2, d=64):
    pattern = make_pattern(kind, b=2, hkv=hkv, sk=S)
    q, k, v = make_qkv_for(pattern, 2, hq, hkv, S, S, d, dtype=dtype)
    gate = randn(hq, dtype=dtype) if kind == "window_linear" else None
    return pattern, q, k, v, gate


def check_rows(got, prefill, rows_ref, dtype, what):
    oracle.assert_close_contract(got, rows_ref, dtype=dtype, device="cpu", what=what + " vs oracle")
    if dtype in (torch.float32, torch.float64):
        oracle.assert_close_contract(got, prefill, dtype=dtype, device="cpu", what=what + " vs prefill")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_decode_equals_prefill_row(kind, dtype, backend):
    pattern, q, k, v, gate = setup(kind, dtype)
    prefill = sa.attention(q, k, v, pattern, gate=gate, backend=backend)
    ref = oracle.oracle_attention(q, k, v, pattern, gate=gate)
    for t in POSITIONS:
        step = sa.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], truncated(pattern, t + 1),
                            gate=gate, backend=backend)
        assert step.shape == (2, 4, 1, 64)
        check_rows(step, prefill[:, :, t:t + 1], ref[:, :, t:t + 1], dtype, f"decode of token {t}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_chunked_prefill_equals_prefill_rows(kind, backend):
    """Sq < Sk in the middle of a sequence: queries a..b-1 against keys 0..b-1."""
    pattern, q, k, v, gate = setup(kind, torch.float32, hq=8, hkv=1, d=80)
    prefill = sa.attention(q, k, v, pattern, gate=gate, backend=backend)
    ref = oracle.oracle_attention(q, k, v, pattern, gate=gate)
    for a, b in [(0, 7), (7, 23), (23, 40), (40, 45), (12, 13)]:
        part = sa.attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], truncated(pattern, b), gate=gate,
                            backend=backend)
        check_rows(part, prefill[:, :, a:b], ref[:, :, a:b], torch.float32, f"queries {a}..{b - 1}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_all_keys_is_last_prefill_row(backend):
    """Sq == 1 against the whole cache is the last row; TopK's block 2 is partial (45 = 2*16 + 13)."""
    pattern = sa.TopK(1, block_size=BLOCK)
    q, k, v = make_qkv_for(pattern, 1, 2, 2, S, S, 64)
    prefill = sa.attention(q, k, v, pattern, backend=backend)
    last = sa.attention(q[:, :, -1:], k, v, pattern, backend=backend)
    oracle.assert_close_contract(last, prefill[:, :, -1:], dtype=torch.float32, device="cpu")
