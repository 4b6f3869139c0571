"""WindowLinear: `o = sigmoid(gate) * A + (1 - sigmoid(gate)) * L`, A the SlidingWindow output and L
the normalised linear memory (phi = elu + 1) of the keys the window evicted (not the sinks)."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import BACKENDS, DTYPE_IDS, check_against_oracle, make_qkv, randn

CONFIGS = [  # (window, sinks, B, Hq, Hkv, Sq, Sk, D)
    pytest.param(16, 0, 2, 4, 4, 37, 37, 64, id="w16-prefill-gqa1"),
    pytest.param(13, 2, 1, 8, 2, 5, 71, 80, id="w13-sinks2-chunk-gqa4"),
    pytest.param(1, 0, 2, 8, 1, 1, 50, 64, id="w1-decode-gqa8"),
    pytest.param(7, 5, 1, 2, 1, 300, 300, 32, id="w7-sinks5-long-gqa2"),
    pytest.param(20, 0, 1, 4, 2, 1, 301, 128, id="w20-decode-long-context"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window,sinks,b,hq,hkv,sq,sk,d", CONFIGS)
def test_window_linear_against_oracle(window, sinks, b, hq, hkv, sq, sk, d, dtype, backend):
    pattern = sa.WindowLinear(window, sinks=sinks)
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, requires_grad=True)
    gate = randn(hq, dtype=dtype, requires_grad=True, scale=2.0)
    check_against_oracle(
        lambda q, k, v, gate: sa.attention(q, k, v, pattern, gate=gate, backend=backend),
        lambda q, k, v, gate: oracle.oracle_attention(q, k, v, pattern, gate=gate),
        lambda q, k, v, gate: oracle.masked_attention_in_dtype(q, k, v, pattern, gate=gate),
        dict(q=q, k=k, v=v, gate=gate), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_limits(backend):
    """A large positive gate leaves the window alone; a large negative one the linear memory alone."""
    pattern = sa.WindowLinear(9, sinks=1)
    q, k, v = make_qkv(1, 4, 2, 12, 40, 64)
    window = sa.attention(q, k, v, sa.SlidingWindow(9, sinks=1), backend=backend)
    high = sa.attention(q, k, v, pattern, gate=torch.full((4,), 40.0), backend=backend)
    oracle.assert_close_contract(high, window.detach(), dtype=torch.float32, device="cpu", what="gate=+40")
    low = sa.attention(q, k, v, pattern, gate=torch.full((4,), -40.0), backend=backend)
    oracle.assert_close_contract(low, oracle.oracle_attention(q, k, v, pattern, gate=torch.full((4,), -40.0)),
                                 dtype=torch.float32, device="cpu", what="gate=-40")
    # the pure linear memory differs from the window (the test would not notice a missing L otherwise)
    assert oracle.rel_err(low, window) > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sk", [1, 9, 10], ids=lambda s: f"sk{s}")
def test_nothing_evicted_means_no_linear_part(sk, backend):
    """With Sk <= window + sinks every key is in the window or a sink: L = 0, o = sigmoid(gate) * A."""
    pattern = sa.WindowLinear(8, sinks=2)
    q, k, v = make_qkv(2, 2, 2, sk, sk, 64)
    gate = torch.tensor([0.3, -1.2])
    out = sa.attention(q, k, v, pattern, gate=gate, backend=backend)
    expect = torch.sigmoid(gate)[None, :, None, None] * oracle.oracle_attention(q, k, v, sa.Dense())
    oracle.assert_close_contract(out, expect, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_are_not_in_the_linear_memory(backend):
    """Changing only the value of a sink key changes the output exactly through the softmax part."""
    pattern = sa.WindowLinear(4, sinks=3)
    q, k, v = make_qkv(1, 2, 2, 3, 30, 64)
    gate = torch.zeros(2)
    v2 = v.clone()
    v2[:, :, 1] += 5.0                                                  # a sink key's value
    delta = sa.attention(q, k, v2, pattern, gate=gate, backend=backend) - sa.attention(
        q, k, v, pattern, gate=gate, backend=backend)
    window_delta = 0.5 * (oracle.oracle_attention(q, k, v2, sa.SlidingWindow(4, sinks=3))
                          - oracle.oracle_attention(q, k, v, sa.SlidingWindow(4, sinks=3)))
    assert oracle.rel_err(delta, window_delta) < 1e-4
