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


# ----------------------------------------------------------------------------------------------
# constant-memory decode
# ----------------------------------------------------------------------------------------------
from sparse_attn.backends.reference.window_linear import WindowLinearDecoder, window_linear_decode  # noqa: E402

DECODE = [  # (window, sinks, Hq, Hkv, S, prefill tokens, D)
    pytest.param(8, 0, 4, 4, 61, 0, 64, id="w8-from-empty-gqa1"),
    pytest.param(5, 3, 8, 2, 57, 20, 80, id="w5-sinks3-after-prefill-gqa4"),
    pytest.param(1, 1, 8, 1, 30, 0, 64, id="w1-sink1-gqa8"),
    pytest.param(16, 2, 4, 2, 70, 2, 128, id="w16-sinks2-prefill-in-sinks-gqa2"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window,sinks,hq,hkv,s,prefill,d", DECODE)
def test_decode_loop_with_window_buffer_equals_prefill(window, sinks, hq, hkv, s, prefill, d, dtype):
    """Decoding token by token while keeping only sinks + window keys and (M, z) gives the prefill rows."""
    pattern = sa.WindowLinear(window, sinks=sinks)
    q, k, v = make_qkv(2, hq, hkv, s, s, d, dtype=dtype)
    gate = randn(hq, scale=2.0)
    full = sa.attention(q, k, v, pattern, gate=gate)
    dec = (WindowLinearDecoder.from_prefill(k[:, :, :prefill], v[:, :, :prefill], pattern, gate=gate) if prefill
           else WindowLinearDecoder(pattern, gate=gate))
    outs = []
    for t in range(prefill, s):
        outs.append(dec.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
        assert dec.cached_tokens() <= window + sinks
        m, z = dec.memory
        assert m.shape == (2, hkv, d, d) and z.shape == (2, hkv, d)
    got = torch.cat(outs, dim=2)
    ref = oracle.oracle_attention(q, k, v, pattern, gate=gate)[:, :, prefill:]
    base = oracle.masked_attention_in_dtype(q, k, v, pattern, gate=gate.to(dtype))[:, :, prefill:]
    oracle.assert_close_contract(got, ref, dtype=dtype, device="cpu", what="decoded rows", lowp_baseline=base)
    assert oracle.rel_err(got, full[:, :, prefill:]) < (1e-5 if dtype == torch.float32 else 3e-2)


EXTEND = [  # (window, sinks, Hq, Hkv, prefill tokens, continuation chunk sizes, D)
    pytest.param(6, 2, 8, 2, 9, [3, 1, 7, 1, 2, 5], 64, id="w6-sinks2-gqa4"),
    pytest.param(5, 4, 4, 4, 2, [5, 1, 4, 140, 1], 80, id="w5-sinks4-filled-by-chunk-then-140"),
    pytest.param(30, 0, 4, 1, 0, [7, 1, 40, 3], 64, id="w30-from-empty-window-longer-than-history-gqa4"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window,sinks,hq,hkv,prefill,chunks,d", EXTEND)
def test_decoder_extend_by_chunks_equals_prefill(window, sinks, hq, hkv, prefill, chunks, d, dtype):
    """`extend` with several tokens at a time (before and after tokens are evicted, chunks longer
    than the window and than one piece) gives the prefill rows and keeps at most sinks + window keys."""
    pattern = sa.WindowLinear(window, sinks=sinks)
    s = prefill + sum(chunks)
    q, k, v = make_qkv(2, hq, hkv, s, s, d, dtype=dtype)
    gate = randn(hq, scale=2.0)
    dec = (WindowLinearDecoder.from_prefill(k[:, :, :prefill], v[:, :, :prefill], pattern, gate=gate) if prefill
           else WindowLinearDecoder(pattern, gate=gate))
    outs, t = [], prefill
    for c in chunks:
        outs.append(dec.extend(q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c]))
        t += c
        assert dec.length == t and dec.cached_tokens() <= window + sinks
    got = torch.cat(outs, dim=2)
    ref = oracle.oracle_attention(q, k, v, pattern, gate=gate)[:, :, prefill:]
    base = oracle.masked_attention_in_dtype(q, k, v, pattern, gate=gate.to(dtype))[:, :, prefill:]
    oracle.assert_close_contract(got, ref, dtype=dtype, device="cpu", what="extended rows", lowp_baseline=base)


def test_decode_function_memory_update():
    """window_linear_decode adds the evicted keys to (M, z) before reading them, and returns the update."""
    pattern = sa.WindowLinear(4, sinks=0)
    q, k, v = make_qkv(1, 2, 1, 10, 10, 64)
    gate = torch.tensor([0.5, -0.5])
    # token 9 sees keys 6..9; evicted: 0..5 (0..4 already in memory, 5 leaves now)
    from sparse_attn.backends.reference.window_linear import phi
    fk = phi(k[:, :, :5])
    mem = (fk.transpose(-1, -2) @ v[:, :, :5], fk.sum(2))
    o, (m, z) = window_linear_decode(q[:, :, 9:], k[:, :, 6:], v[:, :, 6:], mem, gate=gate,
                                     evict_k=k[:, :, 5:6], evict_v=v[:, :, 5:6])
    ref = oracle.oracle_attention(q, k, v, pattern, gate=gate)[:, :, 9:]
    oracle.assert_close_contract(o, ref, dtype=torch.float32, device="cpu")
    fk6 = phi(k[:, :, :6])
    oracle.assert_close_contract(m, fk6.transpose(-1, -2) @ v[:, :, :6], dtype=torch.float32, device="cpu", what="M")
    oracle.assert_close_contract(z, fk6.sum(2), dtype=torch.float32, device="cpu", what="z")


# ----------------------------------------------------------------------------------------------
# the fused Triton kernel, forward (interpreter on CPU-only machines; backward: test_window_linear_triton.py)
# ----------------------------------------------------------------------------------------------
from conftest import TRITON_DEVICE  # noqa: E402

TRITON_CONFIGS = [  # (window, sinks, B, Hq, Hkv, Sq, Sk, D)
    pytest.param(16, 0, 2, 4, 4, 37, 37, 64, id="w16-prefill-gqa1"),
    pytest.param(13, 2, 1, 8, 2, 5, 71, 80, id="w13-sinks2-chunk-gqa4"),
    pytest.param(1, 0, 1, 8, 1, 1, 50, 64, id="w1-decode-gqa8"),
    pytest.param(7, 5, 1, 2, 1, 100, 100, 32, id="w7-sinks5-gqa2"),
    pytest.param(40, 3, 1, 2, 2, 90, 90, 128, id="w40-sinks3-d128"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window,sinks,b,hq,hkv,sq,sk,d", TRITON_CONFIGS)
def test_triton_fused_forward_against_oracle(window, sinks, b, hq, hkv, sq, sk, d, dtype):
    pattern = sa.WindowLinear(window, sinks=sinks)
    q, k, v = (x.to(TRITON_DEVICE) for x in make_qkv(b, hq, hkv, sq, sk, d, dv=d - 16 if d > 64 else d,
                                                       dtype=dtype))
    gate = randn(hq, scale=2.0).to(TRITON_DEVICE)
    p = sa.plan(q, k, v, pattern, gate=gate, backend="triton")
    assert p.kernel.name == "triton.window_linear"
    out = p.run(q, k, v, gate=gate)
    ref = oracle.oracle_attention(q.cpu(), k.cpu(), v.cpu(), pattern, gate=gate.cpu())
    base = oracle.masked_attention_in_dtype(q.cpu(), k.cpu(), v.cpu(), pattern, gate=gate.cpu().to(dtype))
    oracle.assert_close_contract(out.cpu(), ref, dtype=dtype, device=TRITON_DEVICE, lowp_baseline=base)


@pytest.mark.gpu
def test_triton_fused_trains_and_is_not_chosen_on_cpu():
    """backend="triton" serves training calls (the fused backward: tests/test_window_linear_triton.py);
    under the interpreter the scheduler never picks it on its own."""
    pattern = sa.WindowLinear(8, sinks=1)
    q, k, v = (x.to(TRITON_DEVICE) for x in make_qkv(1, 2, 2, 20, 20, 64, requires_grad=True))
    gate = torch.zeros(2, device=TRITON_DEVICE)
    assert sa.plan(q, k, v, pattern, gate=gate, backend="triton").kernel.name == "triton.window_linear"
    if TRITON_DEVICE == "cpu":
        with torch.no_grad():
            assert sa.plan(q, k, v, pattern, gate=gate).kernel.backend == "reference"
    # nothing evicted (Sk <= window + sinks): the linear part is 0, o = sigmoid(0) * window softmax
    with torch.no_grad():
        q2, k2, v2 = q[:, :, :9], k[:, :, :9], v[:, :, :9]
        out = sa.attention(q2, k2, v2, pattern, gate=gate, backend="triton")
        oracle.assert_close_contract(out.cpu(), 0.5 * oracle.oracle_attention(q2.cpu(), k2.cpu(), v2.cpu(), sa.Dense()),
                                     dtype=torch.float32, device=TRITON_DEVICE)
