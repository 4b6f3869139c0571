"""Head dims 32..256 (multiples of 8, FlashAttention's range) on every Triton family, at a few odd
ones (40, 72, 200, 256; two per family) and D != Dv, against the float64 oracles, in Triton's interpreter:
block-sparse attention forward + backward, split-KV decode, the TopK selection, chunked linear
attention forward + backward, WindowLinear forward + backward, the delta rule forward. Compiled on
TRITON_DEVICE where there is a GPU (`bash bench/gpu_check.sh` runs them)."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import TRITON_DEVICE, leaf64, randn
from delta_oracle import oracle_delta_rule

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)
DEV = TRITON_DEVICE


def rnd(*shape, grad=False):
    """A fresh normal tensor on DEV (drawn on the CPU: the same values on every machine)."""
    return randn(*shape).to(DEV).requires_grad_(grad)

# each family at two of the odd head dims 40, 72, 200, 256 (together: all four per kind of kernel)


def _grads_close(out, ref, ins, ins64, what):
    go = torch.randn_like(out)
    for name, g, gr in zip("qkvg", torch.autograd.grad(out, ins, go), torch.autograd.grad(ref, ins64, go.double())):
        oracle.assert_close_contract(g, gr, dtype=torch.float32, device=DEV, what=f"{what} d{name}")


@pytest.mark.parametrize("d", [40, 256])
def test_block_sparse_fwd_bwd(d):
    q, k, v = rnd(1, 2, 19, d, grad=True), rnd(1, 1, 37, d, grad=True), rnd(1, 1, 37, d + 8 if d < 256 else d, grad=True)
    pat = sa.SlidingWindow(17, sinks=2)
    assert sa.plan(q, k, v, pat, backend="triton").kernel.name == "triton.block_sparse"
    out = sa.attention(q, k, v, pat, backend="triton")
    ins64 = [leaf64(x) for x in (q, k, v)]
    ref = oracle.oracle_attention(*ins64, pat)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV)
    _grads_close(out, ref, (q, k, v), ins64, f"D={d}")


@pytest.mark.parametrize("d", [72, 200])
def test_decode_and_topk_selection(d):
    q, k, v = rnd(1, 4, 1, d), rnd(1, 2, 90, d), rnd(1, 2, 90, d)
    pat = sa.TopK(2, block_size=16, sink_blocks=1, local_blocks=1)
    plan = sa.plan(q, k, v, pat, backend="triton")
    assert plan.kernel.name == "triton.splitkv_decode", plan.explain()
    oracle.assert_close_contract(plan.run(q, k, v), oracle.oracle_attention(q.double(), k.double(), v.double(), pat),
                                 dtype=torch.float32, device=DEV)
    from sparse_attn.backends.triton.topk_select import topk_token_index_triton
    from sparse_attn.layout.topk_selection import topk_token_index
    q2 = rnd(1, 4, 24, d)
    assert torch.equal(topk_token_index_triton(q2, k, pat), topk_token_index(q2, k, pat))


@pytest.mark.parametrize("d", [72, 256])
def test_linear_fwd_bwd(d):
    q, k, v = (rnd(1, 2, 21, d, grad=True) for _ in range(3))
    dec = torch.full((2,), -0.2, device=DEV)
    out = sa.linear_attention(q, k, v, decay=dec, backend="triton")
    ins64 = [leaf64(x) for x in (q, k, v)]
    ref = oracle.oracle_linear_attention(*ins64, decay=dec.double())[0]
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV)
    _grads_close(out, ref, (q, k, v), ins64, f"linear D={d}")


@pytest.mark.parametrize("d", [40, 200])
def test_window_linear_fwd_bwd(d):
    q, k, v = rnd(1, 2, 23, d, grad=True), rnd(1, 1, 23, d, grad=True), rnd(1, 1, 23, d, grad=True)
    gate = rnd(2, grad=True)
    pat = sa.WindowLinear(7, sinks=1)
    assert sa.plan(q, k, v, pat, gate=gate, backend="triton").kernel.name == "triton.window_linear"
    out = sa.attention(q, k, v, pat, gate=gate, backend="triton")
    ins64 = [leaf64(x) for x in (q, k, v, gate)]
    ref = oracle.oracle_attention(*ins64[:3], pat, gate=ins64[3])
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV)
    _grads_close(out, ref, (q, k, v, gate), ins64, f"window-linear D={d}")


@pytest.mark.parametrize("d", [40, 256])
def test_delta_rule_forward(d):
    q, k, v = rnd(1, 2, 20, d), rnd(1, 2, 20, d), rnd(1, 2, 20, d)
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(1, 2, 20).to(DEV)
    out = sa.delta_rule(q, k, v, beta, backend="triton")
    ref = oracle_delta_rule(q.double(), k.double(), v.double(), beta.double())[0]
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV)
