"""The CPU delta-rule kernels (csrc/cpu/delta.cpp, delta_bwd.cpp) against the float64 step-by-step
evaluation: the chunked forward and backward (scalar decays), the step-by-step decode kernel (every
decay kind), a 4K-token run in the contract's extreme regimes, strides, threads and the scheduler."""
from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from conftest import DTYPE_IDS, needs_jit, pairwise
from delta_oracle import oracle_delta_rule
from oracle import rel_err
from test_delta_rule import check, make_inputs, run_and_compare

pytestmark = needs_jit


def _chunked():
    from sparse_attn.backends.cpu import delta
    return delta


AXES = {
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "decay": ["none", "per-token"],
    "s": [1, 37, 130],
    "heads": [(2, 2), (1, 4)],
    "state": [False, True],
    "l2": [False, True],
    "d": [(16, 24), (64, 64)],
}
CASES = pairwise(AXES)


def case_id(c):
    return (f"{DTYPE_IDS[c['dtype']]}-{c['decay']}-s{c['s']}-hk{c['heads'][0]}hv{c['heads'][1]}-"
            f"{'s0' if c['state'] else 'nos0'}{'-l2' if c['l2'] else ''}-d{c['d'][0]}dv{c['d'][1]}")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_cpu_chunked_matrix(case):
    hk, hv = case["heads"]
    d, dv = case["d"]
    ins = make_inputs(2, hk, hv, case["s"], d, dv, dtype=case["dtype"], decay=case["decay"], state=case["state"],
                      grad=True, unit_keys=not case["l2"])
    p = sa.plan_delta_rule(**ins, qk_l2norm=case["l2"], backend="cpu")
    assert p.kernel.name == "cpu.delta_chunked" or case["s"] <= 16, p.explain()
    run_and_compare(ins, dtype=case["dtype"], backend="cpu", qk_l2norm=case["l2"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("decay", ["none", "per-token", "per-channel"])
def test_cpu_step_kernel(decay, dtype):
    """The decode kernel, 1 and 5 tokens on a state (GQA-style value heads, qk_l2norm)."""
    delta = _chunked()
    for s in (1, 5):
        ins = make_inputs(2, 2, 4, s, 32, 16, dtype=dtype, decay=decay, state=True)
        o, st = delta.delta_step_cpu(**ins, scale=0.2, qk_l2norm=True)
        o64, st64 = oracle_delta_rule(**ins, scale=0.2, qk_l2norm=True)
        assert o.dtype == dtype
        check(o, o64, dtype, "output")
        check(st, st64, dtype, "state")


def test_cpu_chunked_forward_direct():
    """The forward entry without autograd, odd sizes (D, Dv not multiples of a vector), chunk 16."""
    delta = _chunked()
    ins = make_inputs(1, 1, 3, 77, 20, 12, decay="per-token", state=True)
    o, st = delta.delta_forward_cpu(**ins, scale=0.3, chunk=16)
    o64, st64 = oracle_delta_rule(**ins, scale=0.3)
    check(o, o64, torch.float32, "output")
    check(st, st64, torch.float32, "state")


@pytest.mark.slow
@pytest.mark.parametrize("glo,ghi,blo,bhi", [(-0.01, 0.0, 0.95, 1.0), (-5.0, -4.5, 0.0, 0.05),
                                             (-0.01, 0.0, 0.0, 0.05), (-5.0, -4.5, 0.95, 1.0)],
                         ids=["g~0-beta~1", "g~-5-beta~0", "g~0-beta~0", "g~-5-beta~1"])
def test_cpu_long_sequence_extreme_regimes(glo, ghi, blo, bhi):
    """4K+ tokens (not a multiple of the chunk), decays near 0 and near -5, beta near 0 and near 1."""
    ins = make_inputs(1, 1, 2, 4100, 32, 32, decay="per-token", glo=glo, ghi=ghi, blo=blo, bhi=bhi, state=True)
    with torch.no_grad():
        run_and_compare(ins, dtype=torch.float32, backend="cpu", qk_l2norm=True, grads=False)


def test_cpu_gradients_at_length_with_state_handoff():
    """Gradients through a chunked run longer than one chunk, chained through the returned state."""
    ins = make_inputs(1, 1, 2, 200, 16, 16, decay="per-token", state=True, grad=True)
    run_and_compare(ins, dtype=torch.float32, backend="cpu", qk_l2norm=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_strided_inputs_and_threads(threads):
    """q, k, v as views of a packed (T, H, D) layout (varlen's), any thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t, d = 90, 16
        q, k = torch.randn(t, 2, d), torch.randn(t, 2, d) * d ** -0.5
        v, beta, g = torch.randn(t, 4, d), torch.rand(t, 4), -torch.rand(t, 4)
        cu = torch.tensor([0, 40, 90], dtype=torch.int32)
        o = sa.delta_rule_varlen(q, k, v, beta, cu, decay=g, backend="cpu")
        for a, z in ((0, 40), (40, 90)):
            o64, _ = oracle_delta_rule(*(x[a:z].transpose(0, 1)[None] for x in (q, k, v, beta)),
                                       decay=g[a:z].transpose(0, 1)[None])
            check(o[a:z].transpose(0, 1)[None], o64, torch.float32, f"sequence {a}:{z}")
    finally:
        torch.set_num_threads(n)


def test_scheduler_picks_cpu_kernels():
    long = make_inputs(1, 2, 4, 300, 32, 32, decay="per-token")
    assert sa.plan_delta_rule(**long).kernel.name == "cpu.delta_chunked"
    one = make_inputs(1, 2, 4, 1, 32, 32, decay="per-channel", state=True)
    p = sa.plan_delta_rule(**one)
    assert p.kernel.name == "cpu.delta_step", p.explain()
    kda = make_inputs(1, 2, 4, 300, 32, 32, decay="per-channel")
    p = sa.plan_delta_rule(**kda)
    assert p.kernel.name == "reference.delta_chunked" and "decay per-channel not supported" in p.explain()
    train = make_inputs(1, 2, 4, 300, 32, 32, decay="per-token", grad=True)
    assert sa.plan_delta_rule(**train).kernel.name == "cpu.delta_chunked"
    with pytest.raises(ValueError, match="cpu.delta_chunked"):
        sa.delta_rule(**kda, backend="cpu")
    o = sa.delta_rule(**one)
    o64, _ = oracle_delta_rule(**one)
    assert rel_err(o, o64) <= 1e-4
