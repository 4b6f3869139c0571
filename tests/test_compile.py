"""`torch.compile(fullgraph=True)` over `sparse_attn.attention` (api/ops.py custom ops).

Every pattern, forward and gradients: the compiled call must equal the eager call (same kernel,
same numbers) and meet the contract against the float64 oracle; dynamo must see no graph break;
the custom ops pass `torch.library.opcheck` (schema, fake implementation, autograd registration).
"""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import oracle
import sparse_attn as sa
from conftest import make_pattern, make_qkv_for, randn
from sparse_attn.api.ops import attention_op, encode_pattern

KINDS = ["dense_causal", "dense_full", "window_sinks", "blocksparse", "blocksparse_bcast", "topk",
         "topk_dense", "window_linear"]
F32 = dict(dtype=torch.float32, device="cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pattern(kind, b, hkv, sk):
    if kind == "topk_dense":  # topk covers every block: the scheduler routes it to SDPA (no lse)
        return sa.TopK(16, block_size=16)
    return make_pattern(kind, b=b, hkv=hkv, sk=sk)


def _inputs(kind, *, b=2, hq=4, hkv=2, sq=23, sk=41, d=64):
    pattern = _pattern(kind, b, hkv, sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, requires_grad=True)
    gate = randn(hq, requires_grad=True) if isinstance(pattern, sa.WindowLinear) else None
    return pattern, q, k, v, gate


def _grads(out, ins, go):
    return torch.autograd.grad(out, ins, go)


def _assert_same(a, b, what):
    # same kernel on the same inputs: equal up to the float32 reassociation a compiler may do
    assert a.dtype == b.dtype and a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


# dynamo alone ("eager": autograd runs the ops' registered formula eagerly) and dynamo + AOTAutograd
# ("aot_eager": the backward op is traced through its fake implementation too). backend="reference"
# only where the scheduler's own choice is another kernel (the C++ one): elsewhere it is the same.
CASES = ([pytest.param(kind, None, "eager", id=f"{kind}-auto-eager") for kind in KINDS]
         + [pytest.param(kind, None, "aot_eager", id=f"{kind}-auto-aot_eager") for kind in KINDS]
         + [pytest.param(kind, "reference", "aot_eager", id=f"{kind}-ref-aot_eager")
            for kind in ("window_sinks", "blocksparse", "blocksparse_bcast")])


@pytest.mark.parametrize("kind, backend, compile_backend", CASES)
def test_compiled_equals_eager_and_oracle(kind, backend, compile_backend):
    pattern, q, k, v, gate = _inputs(kind)
    ins = [x for x in (q, k, v, gate) if x is not None]

    def fn(q, k, v, gate):
        return sa.attention(q, k, v, pattern, gate=gate, backend=backend)

    counter = torch._dynamo.testing.CompileCounterWithBackend(compile_backend)
    out_c = torch.compile(fn, fullgraph=True, backend=counter)(q, k, v, gate)
    out_e = fn(q, k, v, gate)
    assert counter.frame_count == 1, "one graph: no graph break"
    _assert_same(out_c, out_e, "output")
    ref = oracle.oracle_attention(*(x.detach().double() for x in (q, k, v)), pattern,
                                  gate=None if gate is None else gate.detach().double())
    oracle.assert_close_contract(out_c, ref, **F32)
    go = randn(*out_c.shape)
    for name, gc, ge in zip("qkvg", _grads(out_c, ins, go), _grads(out_e, ins, go)):
        assert torch.isfinite(gc).all(), f"d{name}"
        _assert_same(gc, ge, f"d{name}")


@pytest.mark.parametrize("kind", ["topk", "window_linear", "blocksparse"])
def test_op_path_eager_matches_oracle_gradients(kind):
    """The op path called eagerly (what the compiled graph runs), GQA 4, decode-like Sq < Sk."""
    pattern, q, k, v, gate = _inputs(kind, b=1, hq=8, hkv=2, sq=5, sk=50, d=80)
    ins = [x for x in (q, k, v, gate) if x is not None]
    out = attention_op(q, k, v, pattern, gate=gate)
    ins64 = [x.detach().double().requires_grad_() for x in ins]
    ref = oracle.oracle_attention(*ins64[:3], pattern, gate=ins64[3] if gate is not None else None)
    oracle.assert_close_contract(out, ref, **F32)
    go = randn(*out.shape)
    for name, g, g64 in zip("qkvg", _grads(out, ins, go), _grads(ref, ins64, go.double())):
        oracle.assert_close_contract(g, g64, **F32, what=f"d{name}")


def test_no_graph_break_reported_by_explain():
    pattern, q, k, v, _ = _inputs("topk")

    def fn(q, k, v):
        return sa.attention(q, k, v, pattern).square().sum()

    ex = torch._dynamo.explain(fn)(q, k, v)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_graph_holds_the_custom_op():
    pattern, q, k, v, _ = _inputs("window_sinks")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch.compile(lambda q, k, v: sa.attention(q, k, v, pattern), fullgraph=True, backend=backend)(q, k, v)
    assert any("sparse_attn.attention_fwd" in t for t in seen), seen


@pytest.mark.parametrize("sq", [1, 7])
def test_compiled_inference_decode_and_chunked_prefill(sq):
    """No grad: the forward op only; Sq = 1 (decode) and 1 < Sq < Sk, under torch.no_grad."""
    pattern = sa.TopK(1, block_size=16)
    q, k, v = make_qkv_for(pattern, 1, 4, 1, sq, 70, 64)
    f = torch.compile(lambda q, k, v: sa.attention(q, k, v, pattern), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = f(q, k, v)
    oracle.assert_close_contract(out, oracle.oracle_attention(q.double(), k.double(), v.double(), pattern), **F32)


def test_dynamic_lengths_compile_once():
    """A decode loop: Sk grows every step; with dynamic shapes one graph serves every length."""
    pattern = sa.SlidingWindow(9, sinks=2)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda q, k, v: sa.attention(q, k, v, pattern), fullgraph=True, backend=counter,
                      dynamic=True)
    for sk in (30, 41, 53):
        q, k, v = make_qkv_for(pattern, 1, 4, 2, 1, sk, 64)
        oracle.assert_close_contract(f(q, k, v), oracle.oracle_attention(q.double(), k.double(), v.double(),
                                                                          pattern), **F32)
    assert counter.frame_count == 1


@pytest.mark.parametrize("kind", ["topk", "window_linear"])
def test_inductor(kind):
    """Inductor (C++ codegen on CPU) around the op: forward and gradients equal eager."""
    pattern, q, k, v, gate = _inputs(kind, b=1, hq=4, hkv=2, sq=19, sk=37, d=64)
    ins = [x for x in (q, k, v, gate) if x is not None]

    def fn(q, k, v, gate):
        return (sa.attention(q, k, v, pattern, gate=gate) * 2.0).square().sum()

    loss_c = torch.compile(fn, fullgraph=True, backend="inductor")(q, k, v, gate)
    loss_e = fn(q, k, v, gate)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name, gc, ge in zip("qkvg", torch.autograd.grad(loss_c, ins), torch.autograd.grad(loss_e, ins)):
        _assert_same(gc, ge, f"d{name}")


class _TinyBlock(torch.nn.Module):
    """Projections + SparseAttention + output projection: what a model author writes."""

    def __init__(self, pattern, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(dim, dim)
        self.attn = sa.SparseAttention(pattern, num_heads=heads)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        return self.o(self.attn(q, k, v).transpose(1, 2).reshape(b, s, -1)) + x


@pytest.mark.parametrize("pattern", [sa.WindowLinear(6, sinks=1), sa.TopK(1, block_size=8)], ids=["wl", "topk"])
def test_small_model_compiled_fullgraph(pattern):
    torch.manual_seed(1)
    model = torch.nn.Sequential(_TinyBlock(pattern), _TinyBlock(pattern))
    if isinstance(pattern, sa.WindowLinear):
        with torch.no_grad():
            for blk in model:
                blk.attn.gate.uniform_(-2, 2)
    x = randn(2, 29, 64)
    loss_e = model(x).square().mean()
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cmodel = torch.compile(model, fullgraph=True, backend=counter)
    loss_c = cmodel(x).square().mean()
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    assert counter.frame_count == 1
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, _), gc, ge in zip(model.named_parameters(), grads_c, grads_e):
        _assert_same(gc, ge, f"d{name}")


@pytest.mark.parametrize("kind", ["topk", "window_linear", "blocksparse", "dense_causal"])
def test_opcheck(kind):
    pattern, q, k, v, gate = _inputs(kind, b=1, hq=4, hkv=2, sq=9, sk=21, d=16)
    kind_s, params, layout = encode_pattern(pattern)
    torch.library.opcheck(torch.ops.sparse_attn.attention_fwd.default,
                          (q, k, v, layout, gate, kind_s, params, 0.25, "", True))


def test_compiled_bad_input_still_raises():
    """Validation runs while dynamo traces. fullgraph=True: dynamo's error carries the contract's
    message; without fullgraph dynamo falls back to eager and the ValueError itself comes out."""
    q, k, v = make_qkv_for(sa.Dense(), 1, 4, 2, 5, 9, 16)

    def fn(q, k, v):
        return sa.attention(q, k, v, sa.WindowLinear(4))

    with pytest.raises(Exception, match="WindowLinear needs gate="):
        torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="WindowLinear needs gate="):
        torch.compile(fn, backend="eager")(q, k, v)


def test_select_blocks_compiled():
    pattern = sa.TopK(2, block_size=16)
    q, k, _ = make_qkv_for(pattern, 2, 4, 2, 9, 70, 64)
    got = torch.compile(lambda q, k: sa.select_blocks(q, k, pattern), fullgraph=True, backend="eager")(q, k)
    assert got.dtype == torch.bool and got.shape == (2, 2, 9, 5)
    assert torch.equal(got, oracle.oracle_select_blocks(q.double(), k.double(), pattern))
    torch.library.opcheck(torch.ops.sparse_attn.select_blocks.default, (q, k, [2, 16, 1, 1]))
