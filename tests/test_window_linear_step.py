"""The WindowLinear decode step (op "window_linear_step": `reference.window_linear_step`,
`cpu.window_linear_step`, `triton.window_linear_step`) through `WindowLinearDecoder`'s fixed-size
storage: long runs of steps (past the sinks and the window, with evictions) equal the rows of the
float64 prefill, the storage's bytes and tensors stay the same from step to step, and the
scheduler's choice is visible in `plan_step(...).explain()`."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import DTYPE_IDS, TRITON_DEVICE, make_qkv, randn
from sparse_attn.api.window_linear import WindowLinearDecoder
from sparse_attn.backends.cpu.window_linear_step import CpuWindowLinearStep

CPU_MISSING = CpuWindowLinearStep().unavailable()
KERNELS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(CPU_MISSING is not None, reason=f"{CPU_MISSING}")),
]

RUNS = [  # (window, sinks, Hq, Hkv, S, prefill, D, Dv)
    pytest.param(8, 0, 4, 4, 61, 0, 64, 64, id="w8-from-empty-gqa1"),
    pytest.param(5, 3, 8, 2, 57, 20, 80, 48, id="w5-sinks3-after-prefill-gqa4-odd-dv"),
    pytest.param(1, 1, 8, 1, 30, 0, 64, 64, id="w1-sink1-gqa8"),
    pytest.param(16, 2, 4, 2, 70, 2, 128, 128, id="w16-sinks2-prefill-in-sinks-gqa2"),
    pytest.param(7, 4, 2, 1, 45, 9, 17, 23, id="w7-sinks4-odd-dims"),
]


def decode_run(backend, window, sinks, hq, hkv, s, prefill, d, dv, dtype, device="cpu"):
    pattern = sa.WindowLinear(window, sinks=sinks)
    q, k, v = make_qkv(2, hq, hkv, s, s, d, dv=dv, dtype=dtype)
    gate = randn(hq, scale=2.0)
    qd, kd, vd, gd = (x.to(device) for x in (q, k, v, gate))
    dec = (WindowLinearDecoder.from_prefill(kd[:, :, :prefill], vd[:, :, :prefill], pattern, gate=gd, backend=backend)
           if prefill else WindowLinearDecoder(pattern, gate=gd, backend=backend))
    outs, sizes, ptrs = [], [], []
    for t in range(prefill, s):
        outs.append(dec.step(qd[:, :, t:t + 1], kd[:, :, t:t + 1], vd[:, :, t:t + 1]).cpu())
        assert dec.cached_tokens() <= window + sinks and dec.length == t + 1
        sizes.append(dec.state.nbytes())
        ptrs.append(tuple(x.data_ptr() for x in dec.tensors()))
    got = torch.cat(outs, dim=2)
    ref = oracle.oracle_attention(q, k, v, pattern, gate=gate)[:, :, prefill:]
    base = oracle.masked_attention_in_dtype(q, k, v, pattern, gate=gate.to(dtype))[:, :, prefill:]
    oracle.assert_close_contract(got, ref, dtype=dtype, device=device, what="decoded rows", lowp_baseline=base)
    # constant memory: once sinks + window tokens were seen, no byte and no tensor changes
    full = max(0, sinks + window - prefill)
    assert len(set(sizes[full:])) <= 1 and len(set(ptrs[full:])) <= 1
    return dec


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window,sinks,hq,hkv,s,prefill,d,dv", RUNS)
def test_step_run_equals_prefill_rows(window, sinks, hq, hkv, s, prefill, d, dv, dtype, backend):
    dec = decode_run(backend, window, sinks, hq, hkv, s, prefill, d, dv, dtype)
    assert dec.plan_step(torch.zeros(2, hq, 1, d, dtype=dtype)).kernel.backend == backend


@pytest.mark.skipif(CPU_MISSING is not None, reason=f"{CPU_MISSING}")
def test_cpu_step_float16_and_long_run():
    """float16 storage; 300 steps with window 24 and 3 sinks (12 times around the ring)."""
    decode_run("cpu", 3, 1, 4, 2, 40, 5, 32, 32, torch.float16)
    dec = decode_run("cpu", 24, 3, 4, 2, 330, 30, 64, 64, torch.float32)
    m, z = dec.memory
    assert m.shape == (2, 2, 64, 64) and z.shape == (2, 2, 64) and dec.cached_tokens() == 27


@pytest.mark.gpu
def test_triton_step_run_equals_prefill_rows():
    """The Triton step (interpreter on CPU-only machines): evictions, sinks, GQA, bf16."""
    decode_run("triton", 4, 2, 4, 2, 14, 3, 32, 16, torch.float32, device=TRITON_DEVICE)
    decode_run("triton", 3, 0, 2, 1, 9, 0, 16, 16, torch.bfloat16, device=TRITON_DEVICE)


@pytest.mark.skipif(CPU_MISSING is not None, reason=f"{CPU_MISSING}")
def test_scheduler_choice_is_visible():
    pattern = sa.WindowLinear(32, sinks=2)
    k, v = randn(1, 2, 50, 64), randn(1, 2, 50, 64)
    dec = WindowLinearDecoder.from_prefill(k, v, pattern, gate=torch.zeros(4))
    p = dec.plan_step(randn(1, 4, 1, 64))
    text = p.explain()
    assert p.kernel.name == "cpu.window_linear_step", text
    assert "reference.window_linear_step" in text and "triton.window_linear_step" in text
    assert p.problem.sk == 2 + 32 and p.problem.sq == 1
    with torch.enable_grad():
        qg = randn(1, 4, 1, 64, requires_grad=True)
        with pytest.raises(ValueError, match="no backward"):
            dec.step(qg, randn(1, 2, 1, 64), randn(1, 2, 1, 64))


@pytest.mark.parametrize("backend", KERNELS)
def test_steps_and_chunks_interleaved(backend):
    """Native steps mixed with multi-token chunks (the reference continuation) stay exact."""
    window, sinks, hq, hkv, d = 6, 2, 4, 2, 32
    pattern = sa.WindowLinear(window, sinks=sinks)
    chunks = [1, 1, 4, 1, 1, 1, 9, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 20, 1, 1]
    s = 5 + sum(chunks)
    q, k, v = make_qkv(1, hq, hkv, s, s, d)
    gate = randn(hq, scale=2.0)
    dec = WindowLinearDecoder.from_prefill(k[:, :, :5], v[:, :, :5], pattern, gate=gate, backend=backend)
    outs, t = [], 5
    for c in chunks:
        outs.append(dec.extend(q[:, :, t:t + c], k[:, :, t:t + c], v[:, :, t:t + c]))
        t += c
        assert dec.length == t and dec.cached_tokens() <= window + sinks
    ref = oracle.oracle_attention(q, k, v, pattern, gate=gate)[:, :, 5:]
    oracle.assert_close_contract(torch.cat(outs, 2), ref, dtype=torch.float32, device="cpu")


def test_huge_window_allocates_what_the_context_needs():
    """A window larger than any context is not allocated at its face value."""
    dec = WindowLinearDecoder(sa.WindowLinear(2 ** 40, sinks=2 ** 40), gate=torch.zeros(2))
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16)
    for t in range(40):
        dec.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert dec.state.sink_k.shape[2] <= 64 and dec.state.ring_capacity <= 64
    dec2 = WindowLinearDecoder.from_prefill(k, v, sa.WindowLinear(2 ** 40), gate=torch.zeros(2))
    assert dec2.state.ring_capacity <= 64 and dec2.cached_tokens() == 40


def test_decoder_rejects_mismatched_tokens():
    dec = WindowLinearDecoder.from_prefill(randn(1, 2, 9, 16), randn(1, 2, 9, 16), sa.WindowLinear(4),
                                           gate=torch.zeros(2))
    with pytest.raises(ValueError, match="storage"):
        dec.step(randn(1, 2, 1, 32), randn(1, 2, 1, 32), randn(1, 2, 1, 32))
    with pytest.raises(ValueError, match="gate"):
        dec.step(randn(1, 4, 1, 16), randn(1, 2, 1, 16), randn(1, 2, 1, 16))
    with pytest.raises(TypeError, match="WindowLinear"):
        WindowLinearDecoder(sa.SlidingWindow(4), gate=torch.zeros(2))
