"""The contract's test matrix for `attention`: forward and gradients against the float64 oracle.

Axes: pattern x dtype x GQA ratio x Sk (never a multiple of the block size 16) x Sq (1, 5, Sk) x head
dim. Not the full product: an all-pairs covering design (every pair of values of any two axes
appears in some case), plus the combinations that matter most listed by hand. Each case runs on the
reference backend and on the scheduler's choice (backend=None).
"""
import itertools

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import (BACKENDS, DTYPE_IDS, DTYPES, PATTERN_KINDS, check_against_oracle, make_pattern,
                      make_qkv_for, pairwise, randn)

AXES = {
    "kind": PATTERN_KINDS,
    "dtype": DTYPES,
    "gqa": [1, 2, 4, 8],
    "sk": [37, 50, 71],
    "sq": [1, 5, "Sk"],
    "d": [32, 64, 80, 128],
}

EXTRA = [  # the important combinations, and Dv != D / explicit scale in a few
    dict(kind="topk", dtype=torch.bfloat16, gqa=8, sk=71, sq=5, d=128),
    dict(kind="topk_wide", dtype=torch.float16, gqa=4, sk=50, sq="Sk", d=80),
    dict(kind="topk_wide", dtype=torch.float32, gqa=2, sk=71, sq="Sk", d=64),
    dict(kind="window_linear", dtype=torch.float16, gqa=2, sk=71, sq=1, d=64),
    dict(kind="window_linear", dtype=torch.bfloat16, gqa=8, sk=50, sq="Sk", d=128),
    dict(kind="blocksparse_bcast", dtype=torch.float32, gqa=4, sk=50, sq=5, d=80),
    dict(kind="blocksparse", dtype=torch.bfloat16, gqa=2, sk=71, sq="Sk", d=64),
    dict(kind="dense_causal", dtype=torch.float32, gqa=2, sk=37, sq=5, d=64, dv=32),
    dict(kind="window_sinks", dtype=torch.bfloat16, gqa=1, sk=50, sq="Sk", d=128, dv=64),
    dict(kind="window_linear", dtype=torch.float64, gqa=4, sk=71, sq=5, d=80, dv=128),
    dict(kind="topk", dtype=torch.float32, gqa=1, sk=71, sq="Sk", d=80, dv=48),
    dict(kind="dense_full", dtype=torch.float32, gqa=8, sk=50, sq=5, d=64, scale=0.05),
    dict(kind="window", dtype=torch.float16, gqa=4, sk=71, sq=5, d=80, scale=0.2),
]

CASES = pairwise(AXES) + EXTRA


def case_id(c):
    parts = [c["kind"], DTYPE_IDS[c["dtype"]], f"gqa{c['gqa']}", f"sq{c['sq']}", f"sk{c['sk']}", f"d{c['d']}"]
    if c.get("dv"):
        parts.append(f"dv{c['dv']}")
    if c.get("scale"):
        parts.append(f"scale{c['scale']}")
    return "-".join(parts)


def test_design_covers_every_pair_of_values():
    for a, b in itertools.combinations(AXES, 2):
        for x, y in itertools.product(AXES[a], AXES[b]):
            assert any(c[a] == x and c[b] == y for c in CASES), (a, x, b, y)
    assert any(c.get("dv") for c in CASES) and all(c["sk"] % 16 for c in CASES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_attention_forward_backward(case, backend):
    dtype, sk, gqa, d = case["dtype"], case["sk"], case["gqa"], case["d"]
    sq = sk if case["sq"] == "Sk" else case["sq"]
    b, hkv = 2, 2 if gqa <= 2 else 1
    hq = hkv * gqa
    pattern = make_pattern(case["kind"], b=b, hkv=hkv, sk=sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, case.get("dv"), dtype=dtype, requires_grad=True)
    inputs = dict(q=q, k=k, v=v)
    if case["kind"] == "window_linear":
        inputs["gate"] = randn(hq, dtype=dtype, requires_grad=True)
    scale = case.get("scale")

    out = check_against_oracle(
        lambda **t: sa.attention(t["q"], t["k"], t["v"], pattern, scale=scale, gate=t.get("gate"),
                                 backend=backend),
        lambda **t: oracle.oracle_attention(t["q"], t["k"], t["v"], pattern, scale=scale, gate=t.get("gate")),
        lambda **t: oracle.masked_attention_in_dtype(t["q"], t["k"], t["v"], pattern, scale=scale,
                                                     gate=t.get("gate")),
        inputs, dtype=dtype)
    assert out.shape == (b, hq, sq, v.shape[-1]) and out.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_rows_without_keys_are_zero(backend):
    b, h, s, d = 1, 2, 37, 64
    layout = torch.ones(1, h, 3, 3, dtype=torch.bool)
    layout[:, 0, 1, :] = False          # head 0: query block 1 sees no key
    layout[:, 1, 0, 0] = False          # head 1: query block 0 sees no key (rows 0..15)
    pattern = sa.BlockSparse(layout, block_size=16)
    q, k, v = (randn(b, h, s, d, requires_grad=True) for _ in range(3))
    out = sa.attention(q, k, v, pattern, backend=backend)
    assert (out[:, 0, 16:32] == 0).all() and (out[:, 1, :16] == 0).all()
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, pattern), dtype=torch.float32,
                                 device="cpu")
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[:, 0, 16:32] == 0).all() and (q.grad[:, 1, :16] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_no_grad_inference(backend, dtype):
    """Inference (no autograd) gives the same numbers as the training path."""
    pattern = sa.SlidingWindow(9, sinks=1)
    q, k, v = make_qkv_for(pattern, 1, 4, 2, 5, 41, 64, dtype=dtype)
    with torch.no_grad():
        out = sa.attention(q, k, v, pattern, backend=backend)
    base = oracle.masked_attention_in_dtype(q, k, v, pattern)
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, pattern), dtype=dtype, device="cpu",
                                 lowp_baseline=base)
