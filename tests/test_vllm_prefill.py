"""The vLLM plugin's prefill call without vLLM (`sparse_attn.integrations.vllm.prefill.run_prefill`).

It writes `attention(q, k, v, pattern, **opts)` into vLLM's `(T, Hq, Dv)` output rows through a
plan kept per shape (every layer of a step shares it): the same bits as `attention`, the float64
evaluation of the contract within its tolerance, one plan for a repeated shape, a new one for a new
length, scale, soft-cap or sinks, and the plan's own input checks still in force.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit
from sparse_attn.integrations.vllm import prefill


def _call(pattern, t, s, *, hq=4, hkv=2, d=32, dtype=torch.bfloat16, seed=0, **opts):
    """As the plugin calls it: vLLM's query rows (T, Hq, D); a first chunk's new key rows (S, Hkv,
    D), or a later chunk's keys gathered from the pages (1, Hkv, S, D); NaN output rows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(s, hkv, d, generator=g).to(dtype)
    v = torch.randn(s, hkv, d, generator=g).to(dtype)
    if t != s:
        k, v = _heads(k), _heads(v)
    out = torch.full((t, hq, d), float("nan"), dtype=dtype)
    return q, k, v, out


def _heads(t):
    """(S, H, D) rows as (1, H, S, D); 4-D as it is."""
    return t.transpose(0, 1)[None] if t.dim() == 3 else t


def _attention(q, k, v, pattern, **opts):
    """`sa.attention` on the call's tensors, as (T, Hq, Dv) rows."""
    return sa.attention(_heads(q), _heads(k), _heads(v), pattern, **opts)[0].transpose(0, 1)


@pytest.mark.parametrize("pattern", [sa.Dense(), sa.TopK(2, block_size=16), sa.SlidingWindow(40, sinks=3)],
                         ids=["dense", "topk", "window"])
@pytest.mark.parametrize("t,s", [(70, 70), (33, 150)], ids=["first_chunk", "later_chunk"])
def test_same_bits_as_attention_and_close_to_float64(pattern, t, s):
    q, k, v, out = _call(pattern, t, s)
    opts = {"scale": 0.2}
    got = prefill.run_prefill(q, k, v, pattern, opts, out)
    assert got is out
    assert torch.equal(out, _attention(q, k, v, pattern, **opts))
    q4, k4, v4 = _heads(q), _heads(k), _heads(v)
    ref = sa.attention(q4.double(), k4.double(), v4.double(), pattern, backend="reference", **opts)
    if not isinstance(pattern, sa.TopK):  # TopK's selection may hang on rounding: bits above suffice
        oracle.assert_close_contract(out.transpose(0, 1)[None], ref, dtype=torch.bfloat16, device="cpu",
                                     lowp_baseline=oracle.masked_attention_in_dtype(q4, k4, v4, pattern, scale=0.2))


def test_one_plan_per_shape_and_options():
    prefill._PLANS.clear()
    pattern = sa.Dense()
    q, k, v, out = _call(pattern, 50, 50)
    prefill.run_prefill(q, k, v, pattern, {"scale": 0.1}, out)
    first = dict(prefill._PLANS)
    for layer in range(3):  # the next layers of the step: the same plan, no new one
        prefill.run_prefill(q, k, v, pattern, {"scale": 0.1}, out)
    assert prefill._PLANS == first and len(first) == 1
    prefill.run_prefill(q, k, v, pattern, {"scale": 0.2}, out)  # another scale
    prefill.run_prefill(q, k, v, pattern, {"scale": 0.1, "softcap": 5.0}, out)
    sinks = torch.randn(4)
    prefill.run_prefill(q, k, v, pattern, {"scale": 0.1, "sink_logits": sinks}, out)
    assert torch.equal(out, _attention(q, k, v, pattern, scale=0.1, sink_logits=sinks))
    q2, k2, v2, out2 = _call(pattern, 51, 51)  # another length
    prefill.run_prefill(q2, k2, v2, pattern, {"scale": 0.1}, out2)
    assert len(prefill._PLANS) == 5


def test_plans_are_bounded(monkeypatch):
    prefill._PLANS.clear()
    monkeypatch.setattr(prefill, "MAX_PLANS", 2)
    for t in (10, 11, 12):
        q, k, v, out = _call(sa.Dense(), t, t)
        prefill.run_prefill(q, k, v, sa.Dense(), {"scale": 0.1}, out)
        assert torch.equal(out, _attention(q, k, v, sa.Dense(), scale=0.1))
    assert len(prefill._PLANS) <= 2


def test_a_kept_plan_still_checks_its_inputs():
    """A call the kept plan was not made for (here: inputs that require grad, same shapes and
    options) raises the plan's `ValueError`, not a silent run of an inference plan."""
    prefill._PLANS.clear()
    q, k, v, out = _call(sa.Dense(), 20, 20)
    prefill.run_prefill(q, k, v, sa.Dense(), {"scale": 0.1}, out)
    with pytest.raises(ValueError, match="require grad"):
        prefill.run_prefill(q.detach().requires_grad_(), k, v, sa.Dense(), {"scale": 0.1}, out)


@needs_jit  # the kept plans' kernel is asserted to be cpu.block_sparse
@pytest.mark.parametrize("t,s", [(300, 300), (33, 150)], ids=["first_chunk", "later_chunk"])
def test_inference_calls_take_the_prepared_path(t, s):
    """As vLLM calls it (grad off): Dense and SlidingWindow run through the plan's `prepared()`
    re-run, TopK (a selection per call) through `run(out=)`; the same bits as `attention` each."""
    prefill._PLANS.clear()
    patterns = [sa.Dense(), sa.SlidingWindow(40, sinks=3), sa.TopK(2, block_size=16)]
    with torch.inference_mode():
        for pattern in patterns:
            q, k, v, out = _call(pattern, t, s)
            for _ in range(2):  # the first call plans, the second runs the kept entry
                prefill.run_prefill(q, k, v, pattern, {"scale": 0.2}, out)
                assert torch.equal(out, _attention(q, k, v, pattern, scale=0.2))
    kept = list(prefill._PLANS.values())
    assert [p.kernel.name for p, _ in kept[:2]] == ["cpu.block_sparse"] * 2
    assert [fast is not None for _, fast in kept] == [True, True, False]
