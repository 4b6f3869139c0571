"""The scheduler: reasons, costs, the dense/sparse switch, named backends and explain()."""
from __future__ import annotations

import math

import pytest
import torch

import sparse_attn as sa
from sparse_attn.api.functional import plan_varlen
from sparse_attn.scheduler import Kernel, device_info, kernels, register
from sparse_attn.scheduler import registry as registry_mod
import oracle
from conftest import check_against_oracle, make_qkv, needs_jit


def _qkv(sq, sk, *, hq=4, hkv=2, d=16, dtype=torch.float32, grad=False):
    return make_qkv(1, hq, hkv, sq, sk, d, dtype=dtype, requires_grad=grad)


def test_explain_lists_every_kernel_with_a_reason_or_a_cost():
    q, k, v = _qkv(300, 300)
    p = sa.plan(q, k, v, sa.TopK(2, block_size=16))
    text = p.explain()
    for kern in kernels():
        assert kern.name in text
    assert f"chosen: {p.kernel.name}" in text
    for c in p.candidates:
        assert c.reasons or (c.cost is not None and math.isfinite(c.cost) and c.cost > 0)
    assert str(p) == text


@pytest.mark.parametrize("pattern,sk,dense", [
    (sa.TopK(16, block_size=64), 1000, True),   # 16 blocks: top-16 + sink + local cover them all
    (sa.TopK(16, block_size=64), 1300, False),  # 21 blocks: 21 - 1 sink - 1 local = 19 candidates > 16
    (sa.TopK(2, block_size=16), 300, False),
    (sa.SlidingWindow(512), 400, True),
    (sa.SlidingWindow(100, sinks=4), 400, False),
    (sa.Dense(), 400, True),
])
def test_dense_kernel_exactly_where_the_pattern_is_dense(pattern, sk, dense):
    assert pattern.is_dense_causal_for(sk, sk) == dense
    q, k, v = _qkv(sk, sk)
    p = sa.plan(q, k, v, pattern)
    sdpa = next(c for c in p.candidates if c.kernel.name == "reference.sdpa")
    if dense:
        assert not sdpa.reasons
    else:
        assert any("sparse at this length" in r for r in sdpa.reasons)
        assert p.kernel.name != "reference.sdpa"


@needs_jit
@pytest.mark.parametrize("pattern,sq,sk,runs_dense", [
    (sa.TopK(16, block_size=64), 1000, 1000, True),     # every query selects all its causal blocks
    (sa.TopK(16, block_size=64), 200, 1000, True),      # end-aligned chunk, Sq < Sk
    (sa.TopK(16, block_size=64), 1300, 1300, False),    # 19 candidates > 16: a real selection
    (sa.TopK(3, block_size=16, sink_blocks=0, local_blocks=2), 77, 77, True),  # 5 blocks: 3 + 2
    (sa.TopK(3, block_size=16, sink_blocks=0, local_blocks=2), 81, 81, False),  # 6 blocks
    (sa.SlidingWindow(512, sinks=3), 300, 400, True),
    (sa.SlidingWindow(100, sinks=4), 400, 400, False),
])
def test_a_pattern_that_sees_every_causal_key_runs_as_dense_and_says_so(pattern, sq, sk, runs_dense):
    """Contract: a short sequence degrades exactly to dense causal attention. Such a call runs as
    Dense (no selection, no window rule), `explain()` names the caller's pattern and the one run,
    and the output and gradients are the float64 evaluation of the caller's pattern."""
    q, k, v = _qkv(sq, sk, grad=True)
    plan = sa.plan(q, k, v, pattern, backend="cpu")
    first = plan.explain().splitlines()[0]
    if runs_dense:
        assert plan.problem.pattern == sa.Dense() and plan.problem.requested == pattern
        assert f"{pattern.describe()} sees every causal key at Sk={sk}: run as Dense(causal=True)" in first
    else:
        assert type(plan.problem.pattern) is type(pattern) and plan.problem.requested is None
        assert "sees every causal key" not in first
    check_against_oracle(lambda q, k, v: sa.attention(q, k, v, pattern, backend="cpu"),
                         lambda q, k, v: oracle.oracle_attention(q, k, v, pattern),
                         lambda q, k, v: oracle.masked_attention_in_dtype(q, k, v, pattern),
                         dict(q=q, k=k, v=v), dtype=torch.float32)


@needs_jit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 8, 16])
def test_a_prompt_of_a_few_tokens_runs_the_compiled_kernel(n, dtype):
    """The reference loop's setup costs 180-250 us a call at a few tokens, the C++ kernel 17-34 us
    (2 Zen 4 threads): its cost once counted 40 us and chose it for float32 prompts of up to 16
    tokens (vLLM's short prompts, each layer)."""
    q, k, v = make_qkv(1, 4, 2, n, n, 64, dtype=dtype)
    p = sa.plan(q, k, v, sa.Dense())
    assert p.kernel.name == "cpu.block_sparse", p.explain()


@needs_jit
def test_packed_varlen_topk_that_selects_every_block_runs_packed_as_dense():
    """The longest sequence decides: TopK(4, bs 16) over sequences of at most 90 keys (6 blocks:
    1 sink + 1 local + 4) is dense causal for every sequence, so the packed Dense kernel may run (a
    real TopK selection is per sequence and is refused packed)."""
    lens = [90, 33, 61]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    tot = int(cu[-1])
    q, k, v = (torch.randn(tot, h, 16) for h in (4, 2, 2))
    plan, packed = plan_varlen(q, k, v, cu, cu, sa.TopK(4, block_size=16), max_seqlen_q=90, max_seqlen_k=90,
                               backend="cpu")
    assert plan.problem.pattern == sa.Dense() and "per-token selection is per sequence" not in plan.explain()
    if packed:
        assert plan.kernel.name == "cpu.block_sparse" and plan.problem.varlen
    out = sa.attention_varlen(q, k, v, cu, cu, sa.TopK(4, block_size=16), max_seqlen_q=90, max_seqlen_k=90,
                              backend="cpu")
    for i, n in enumerate(lens):
        s = slice(int(cu[i]), int(cu[i + 1]))
        one = [x[s].transpose(0, 1)[None].double() for x in (q, k, v)]
        ref = oracle.oracle_attention(*one, sa.TopK(4, block_size=16))[0].transpose(0, 1)
        assert oracle.rel_err(out[s], ref) <= 1e-5


def test_chunked_prefill_never_uses_top_left_causal_sdpa():
    q, k, v = _qkv(7, 40)
    p = sa.plan(q, k, v, sa.Dense())
    assert p.kernel.name != "reference.sdpa"
    assert "top-left" in p.explain()


@pytest.mark.parametrize("backend", ["triton", "cuda", "npu"])
def test_named_backend_that_cannot_run_raises_with_reasons(backend):
    q, k, v = _qkv(40, 40)
    with pytest.raises(ValueError, match=f"backend='{backend}'"):
        sa.attention(q, k, v, sa.Dense(), backend=backend)


def test_unknown_backend_string():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="backend must be"):
        sa.plan(q, k, v, backend="tpu")


def test_training_excludes_forward_only_kernels():
    q, k, v = _qkv(64, 64, grad=True)
    p = sa.plan(q, k, v, sa.SlidingWindow(16))
    assert p.problem.phase == "training"
    assert p.kernel.supports_backward
    for c in p.candidates:
        if not c.kernel.supports_backward:  # refused for that, for its device, or unavailable here altogether
            assert (any("no backward" in r for r in c.reasons) or c.reasons == [c.kernel.unavailable()]
                    or c.reasons == [f"device cpu not in {c.kernel.devices}"]), c


def test_phase_is_visible():
    q, k, v = _qkv(1, 64)
    assert sa.plan(q, k, v).problem.phase == "decode"
    q, k, v = _qkv(5, 64)
    assert sa.plan(q, k, v).problem.phase == "chunked-prefill"
    q, k, v = _qkv(64, 64)
    assert sa.plan(q, k, v).problem.phase == "prefill"


def test_cpu_device_info():
    info = device_info(torch.device("cpu"))
    assert info.type == "cpu" and info.units >= 1 and info.generation
    assert info.peak_tflops(torch.bfloat16) >= info.peak_tflops(torch.float32) > 0


class _Fake(Kernel):
    backend = "reference"
    patterns = (sa.SlidingWindow,)
    supports_backward = True

    def __init__(self, name, seconds, why=()):
        self.name, self.seconds, self.why = name, seconds, list(why)

    def extra_reasons(self, p):
        return self.why

    def cost(self, p):
        return self.seconds

    def run(self, q, k, v, p, *, gate=None):
        return torch.full((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), 7.0, dtype=q.dtype)


def test_cheapest_supporting_kernel_wins_and_reasons_are_listed(monkeypatch):
    monkeypatch.setattr(registry_mod, "_KERNELS", {k: list(v) for k, v in registry_mod._KERNELS.items()})
    register(_Fake("fake.cheap-but-refuses", 1e-12, ["refuses for the test"]))
    register(_Fake("fake.cheap", 2e-12))
    q, k, v = _qkv(64, 64)
    p = sa.plan(q, k, v, sa.SlidingWindow(16))
    assert p.kernel.name == "fake.cheap"
    assert "refuses for the test" in p.explain()
    assert (sa.attention(q, k, v, sa.SlidingWindow(16)) == 7.0).all()


def test_error_lists_every_reason_when_nothing_runs(monkeypatch):
    monkeypatch.setattr(registry_mod, "_KERNELS", {"attention": [_Fake("fake.only", 1.0, ["not today"])]})
    q, k, v = _qkv(64, 64)
    with pytest.raises(ValueError, match="fake.only.*not today"):
        sa.attention(q, k, v, sa.SlidingWindow(16))
    with pytest.raises(ValueError, match="pattern Dense not supported"):
        sa.attention(q, k, v, sa.Dense())


def test_kernel_for_another_device_is_refused_before_its_availability_is_asked(monkeypatch):
    """A CPU kernel asked about a CUDA problem says "device" and never builds its extension to answer
    (on a GPU machine the CPU builds took the whole budget of the first GPU check)."""
    import dataclasses

    from sparse_attn.scheduler.problem import Problem

    class _CpuOnly(_Fake):
        devices = ("cpu",)

        def unavailable(self):
            raise AssertionError("unavailable() asked for a problem on another device")

    q, k, v = _qkv(64, 64)
    p = sa.plan(q, k, v, sa.SlidingWindow(16)).problem
    assert isinstance(p, Problem)
    gpu = dataclasses.replace(p, device=dataclasses.replace(p.device, type="cuda"))
    assert _CpuOnly("fake.cpu", 1.0).not_supported_reasons(gpu) == ["device cuda not in ('cpu',)"]
    with pytest.raises(AssertionError, match="another device"):  # a CPU problem still asks
        _CpuOnly("fake.cpu", 1.0).not_supported_reasons(p)


@needs_jit
@pytest.mark.parametrize("pattern, names", [(sa.Dense(), {"cpu", "cpu_decode"}),
                                            (sa.InfLLMv2(), {"cpu", "cpu_decode", "cpu_infllmv2",
                                                             "cpu_infllmv2_pages"})])
def test_preload_loads_the_extensions_the_pattern_will_call(monkeypatch, pattern, names):
    from sparse_attn._build import jit
    from sparse_attn.scheduler import preload

    for name in names:
        monkeypatch.delitem(jit._LOADED, name, raising=False)
    ready = preload(pattern, "cpu")
    assert names <= set(jit._LOADED), sorted(jit._LOADED)
    assert ready[("attention", "cpu.block_sparse")] is None
    assert ready[("attention_with_cache", "cpu.decode")] is None
    # only kernels for the device and the pattern's class (Triton's run on the CPU under its interpreter)
    assert all(kernels_by_name()[key].devices is None or "cpu" in kernels_by_name()[key].devices
               for key in ready), ready
    assert ("attention", "cuda.splitkv_decode") not in ready
    if isinstance(pattern, sa.InfLLMv2):
        assert ("attention", "cpu.decode") not in ready  # its patterns do not include InfLLMv2


def kernels_by_name():
    return {(op, k.name): k for op in ("attention", "attention_with_cache") for k in kernels(op)}


def test_preload_says_why_a_kernel_cannot_run(monkeypatch):
    from sparse_attn.scheduler import preload

    kern = kernels_by_name()[("attention", "cpu.block_sparse")]
    monkeypatch.setattr(type(kern), "unavailable", lambda self: "cpu: the build failed (test)")
    ready = preload(sa.Dense(), "cpu", ops=("attention",))
    assert ready[("attention", "cpu.block_sparse")] == "cpu: the build failed (test)"
    assert ready[("attention", "reference.chunked")] is None
    assert not any(name.startswith("cpu.") for _, name in preload(sa.Dense(), "cuda"))
