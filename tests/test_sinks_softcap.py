"""Learned sinks (`sink_logits`) and logit soft-capping (`softcap`) against the float64 oracle.

Contract, "Learned sinks and logit soft-capping": every softmax pattern, forward and backward
(d sink_logits included), every cache and decode. Each case runs on the reference backend, the CPU
backend and the scheduler's choice; the Triton kernels (interpreter) have their own cases at the end.
A kernel that does not compute an option must say so in its reasons (checked here for SDPA).
"""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import (TRITON_DEVICE, check_against_oracle, make_pattern, make_qkv_for, needs_jit, pattern_on,
                      randn)
from sparse_attn.backends.reference.softmax import softmax_forward
from sparse_attn.backends.sinks import apply_sinks, sink_grad

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
SOFTMAX_KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "topk"]


def sink_logits_for(hq, dtype=F32, requires_grad=True):
    """Sinks around log(keys): large enough to take a real share of each row's denominator."""
    return (torch.randn(hq) * 1.5 + 2.5).to(dtype).requires_grad_(requires_grad)


def run_case(kind, backend, *, sinks, softcap, dtype, gqa, sq, sk, d, b=2, device="cpu"):
    hkv = 2 if gqa <= 2 else 1
    hq = hkv * gqa
    pattern = make_pattern(kind, b=b, hkv=hkv, sk=sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dtype=dtype, requires_grad=True)
    inputs = dict(q=q, k=k, v=v)
    if sinks:
        inputs["sink_logits"] = sink_logits_for(hq, dtype)
    if device != "cpu":
        inputs = {n: x.detach().to(device).requires_grad_() for n, x in inputs.items()}
        pattern = pattern_on(pattern, device)
    opts = dict(softcap=softcap)
    return check_against_oracle(
        lambda **t: sa.attention(t["q"], t["k"], t["v"], pattern, backend=backend, sink_logits=t.get("sink_logits"),
                                 **opts),
        lambda **t: oracle.oracle_attention(t["q"], t["k"], t["v"], pattern, sink_logits=t.get("sink_logits"), **opts),
        lambda **t: oracle.masked_attention_in_dtype(t["q"], t["k"], t["v"], pattern,
                                                     sink_logits=t.get("sink_logits"), **opts),
        inputs, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------ the oracle
def test_oracle_sinks_formula_and_limits():
    """The oracle against the contract's formula written out, and the options' limits."""
    b, hq, hkv, sq, sk, d = 1, 4, 2, 5, 9, 8
    q, k, v = (randn(b, hq, sq, d, dtype=F64), randn(b, hkv, sk, d, dtype=F64), randn(b, hkv, sk, d, dtype=F64))
    c = torch.randn(hq, dtype=F64)
    pat = sa.Dense()
    out = oracle.oracle_attention(q, k, v, pat, sink_logits=c)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) * d ** -0.5
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    e = torch.exp(s).masked_fill(~mask, 0)
    want = (e @ vv) / (torch.exp(c)[None, :, None, None] + e.sum(-1, keepdim=True))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    plain = oracle.oracle_attention(q, k, v, pat)
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, pat, sink_logits=torch.full((hq,), -1e4, dtype=F64)),
                               plain)
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, pat, softcap=1e9), plain)
    capped = oracle.oracle_attention(q * 1e3, k, v, pat, softcap=1.0)  # scores pinned near +-1
    assert torch.isfinite(capped).all()


def test_sink_gradient_derivation():
    """d c_h = -sum over rows of P_sink * (dO . o) (backends/sinks.py) against autograd of the oracle."""
    b, hq, hkv, sq, sk, d = 2, 4, 2, 6, 11, 8
    q, k, v = (randn(b, hq, sq, d, dtype=F64), randn(b, hkv, sk, d, dtype=F64), randn(b, hkv, sk, d, dtype=F64))
    c = torch.randn(hq, dtype=F64, requires_grad=True)
    pat = sa.SlidingWindow(4)
    out = oracle.oracle_attention(q, k, v, pat, sink_logits=c)
    go = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, [c], go)
    plain, lse = softmax_forward(q, k, v, pat, scale=d ** -0.5)
    o, lse_s = apply_sinks(plain, lse, c)
    torch.testing.assert_close(o, out.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sink_grad(o, lse_s, go, c), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- every pattern
BACKENDS = [pytest.param("reference", id="ref"), pytest.param("cpu", id="cpu", marks=needs_jit),
            pytest.param(None, id="auto")]
#: (kind, sinks, softcap, dtype, gqa, sq, sk, d): every kind with both options, and each option alone
CASES = [
    ("dense_causal", True, 2.0, F32, 4, 5, 37, 32),
    ("dense_full", True, 1.5, F32, 2, 9, 50, 64),
    ("window", True, 2.0, BF16, 1, 71, 71, 64),
    ("window_sinks", True, 1.5, F32, 2, 50, 50, 80),
    ("blocksparse", True, 2.0, F32, 2, 37, 37, 32),
    ("topk", True, 3.0, F16, 4, 5, 71, 64),
    ("dense_causal", True, None, F16, 2, 37, 37, 64),
    ("topk", True, None, F32, 1, 50, 50, 32),
    ("window", False, 1.0, F32, 8, 1, 50, 64),
    ("blocksparse", False, 2.5, BF16, 4, 5, 71, 32),
]


def _cid(c):
    kind, sinks, cap, dtype, gqa, sq, sk, d = c
    return f"{kind}-{'sinks' if sinks else 'nosinks'}-cap{cap}-{str(dtype)[6:]}-g{gqa}-{sq}x{sk}-d{d}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_cid(c) for c in CASES])
def test_forward_backward(case, backend):
    kind, sinks, cap, dtype, gqa, sq, sk, d = case
    run_case(kind, backend, sinks=sinks, softcap=cap, dtype=dtype, gqa=gqa, sq=sq, sk=sk, d=d)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit)])
def test_rows_without_keys_are_zero(backend):
    """A row that sees no key outputs zeros, sinks or not, and its gradients are finite."""
    b, hq, hkv, sk, d, bs = 1, 2, 1, 40, 16, 8
    lay = torch.ones(b, hkv, 5, 5, dtype=torch.bool).tril()
    lay[:, :, 2, :] = False  # query block 2 (tokens 16..23) sees nothing
    pat = sa.BlockSparse(lay, block_size=bs)
    q, k, v = (randn(b, hq, sk, d, requires_grad=True), randn(b, hkv, sk, d, requires_grad=True),
               randn(b, hkv, sk, d, requires_grad=True))
    c = sink_logits_for(hq)
    out = sa.attention(q, k, v, pat, sink_logits=c, softcap=2.0, backend=backend)
    assert torch.equal(out[:, :, 16:24], torch.zeros_like(out[:, :, 16:24])), backend
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, pat, sink_logits=c, softcap=2.0),
                                 dtype=F32, device="cpu")
    grads = torch.autograd.grad(out.sum(), [q, k, v, c])
    assert all(torch.isfinite(g).all() for g in grads), backend


# ----------------------------------------------------------------------------------- decode
DECODE_KINDS = ["dense_causal", "window_sinks", "blocksparse", "topk"]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit), None])
@pytest.mark.parametrize("kind", DECODE_KINDS)
def test_decode_equals_prefill_rows(kind, backend):
    """The last rows of a prefill, computed over a cache (contiguous and paged) and by `attention`
    with Sq = 1 / 3 (the decode kernels), equal the oracle's rows of the full prefill."""
    b, hq, hkv, sk, d = 2, 4, 2, 45, 32
    pattern = make_pattern(kind, b=b, hkv=hkv, sk=sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sk, sk, d)
    c, cap = sink_logits_for(hq, requires_grad=False), 2.0
    ref = oracle.oracle_attention(q, k, v, pattern, sink_logits=c, softcap=cap)
    pool = pattern.block_size if kind == "topk" else 16
    caches = [sa.KVCache(b, hkv, d, 64, pool_block_size=pool),
              sa.PagedKVCache(b, hkv, d, num_pages=2 * 8, page_size=8, max_len=64, pool_block_size=pool)]
    for cache in caches:
        cache.append(k, v)
    for rows in (1, 3):
        want = ref[:, :, -rows:]
        got = sa.attention(q[:, :, -rows:], k, v, pattern, sink_logits=c, softcap=cap, backend=backend)
        oracle.assert_close_contract(got, want, dtype=F32, device="cpu", what=f"attention Sq={rows}")
        for cache in caches:
            got = sa.attention_with_cache(q[:, :, -rows:], cache, pattern, sink_logits=c, softcap=cap, backend=backend)
            oracle.assert_close_contract(got, want, dtype=F32, device="cpu", what=f"{type(cache).__name__} Sq={rows}")
    plan = sa.plan_with_cache(q[:, :, -1:], caches[0], pattern, sink_logits=c, softcap=cap, backend=backend)
    assert "learned sinks, softcap=2" in plan.explain()
    oracle.assert_close_contract(plan.run(q[:, :, -1:], caches[0], sink_logits=c), ref[:, :, -1:], dtype=F32,
                                 device="cpu")


def test_cache_gradient_of_sinks():
    """The reference cache path is differentiable in q and sink_logits."""
    b, hq, hkv, sk, d = 1, 4, 2, 30, 16
    q, k, v = randn(b, hq, 3, d, requires_grad=True), randn(b, hkv, sk, d), randn(b, hkv, sk, d)
    c = sink_logits_for(hq)
    cache = sa.KVCache(b, hkv, d, 32)
    cache.append(k, v)
    out = sa.attention_with_cache(q, cache, sa.Dense(), sink_logits=c, softcap=1.5, backend="reference")
    q64, c64 = q.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    ref = oracle.oracle_attention(q64, k, v, sa.Dense(), sink_logits=c64, softcap=1.5)
    go = torch.randn_like(out)
    for g, r, n in zip(torch.autograd.grad(out, [q, c], go), torch.autograd.grad(ref, [q64, c64], go.double()),
                       ("dq", "dsink")):
        oracle.assert_close_contract(g, r, dtype=F32, device="cpu", what=n)


# ------------------------------------------------------------------------- the other entries
def test_varlen_module_and_plan():
    hq, hkv, d = 4, 2, 16
    lens = [7, 19]
    cu = torch.tensor([0, 7, 26], dtype=torch.int32)
    q, k, v = randn(26, hq, d), randn(26, hkv, d), randn(26, hkv, d)
    c = sink_logits_for(hq, requires_grad=False)
    pat = sa.SlidingWindow(5)
    out = sa.attention_varlen(q, k, v, cu, cu, pat, sink_logits=c, softcap=2.0)
    for i, n in enumerate(lens):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        want = oracle.oracle_attention(*(x[sl].transpose(0, 1)[None] for x in (q, k, v)), pat, sink_logits=c,
                                       softcap=2.0)[0].transpose(0, 1)
        oracle.assert_close_contract(out[sl], want, dtype=F32, device="cpu")
    # the module owns learnable sinks; its gradient reaches them
    mod = sa.SparseAttention(sa.Dense(), num_heads=hq, sinks=True, softcap=3.0)
    assert mod.sink_logits.shape == (hq,) and "sinks=True" in repr(mod)
    qb, kb, vb = randn(1, hq, 9, d), randn(1, hkv, 9, d), randn(1, hkv, 9, d)
    mod(qb, kb, vb).sum().backward()
    assert mod.sink_logits.grad is not None and torch.isfinite(mod.sink_logits.grad).all()
    # a plan made with sinks runs only with them
    p = sa.plan(qb, kb, vb, sa.Dense(), sink_logits=c, softcap=3.0)
    oracle.assert_close_contract(p.run(qb, kb, vb, sink_logits=c),
                                 oracle.oracle_attention(qb, kb, vb, sa.Dense(), sink_logits=c, softcap=3.0),
                                 dtype=F32, device="cpu")
    with pytest.raises(ValueError, match="sink_logits"):
        p.run(qb, kb, vb)


def test_custom_op_path_gradients():
    """The torch.compile path (custom ops, run eagerly) computes the same values and d sink_logits."""
    from sparse_attn.api.ops import attention_op

    b, hq, hkv, s, d = 1, 4, 2, 21, 16
    q, k, v = randn(b, hq, s, d, requires_grad=True), randn(b, hkv, s, d), randn(b, hkv, s, d)
    c = sink_logits_for(hq)
    pat = sa.TopK(1, block_size=8)
    out = attention_op(q, k, v, pat, sink_logits=c, softcap=2.0)
    q64, c64 = q.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    ref = oracle.oracle_attention(q64, k, v, pat, sink_logits=c64, softcap=2.0)
    oracle.assert_close_contract(out, ref, dtype=F32, device="cpu")
    go = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, [q, c], go), torch.autograd.grad(ref, [q64, c64], go.double())):
        oracle.assert_close_contract(g, r, dtype=F32, device="cpu")


def test_compiled_fullgraph_and_opcheck():
    """Under torch.compile(fullgraph=True) the options travel through the custom ops: same values and
    gradients as eager; `opcheck` on the forward op with them."""
    b, hq, hkv, s, d = 1, 4, 2, 13, 16
    pat = sa.SlidingWindow(5)
    q, k, v = randn(b, hq, s, d, requires_grad=True), randn(b, hkv, s, d, requires_grad=True), randn(b, hkv, s, d)
    c = sink_logits_for(hq)

    def fn(q, k, v, c):
        return sa.attention(q, k, v, pat, sink_logits=c, softcap=2.0)

    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, c)
    out_e = fn(q, k, v, c)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    go = torch.randn_like(out_e)
    for gc, ge in zip(torch.autograd.grad(out_c, [q, k, c], go), torch.autograd.grad(out_e, [q, k, c], go)):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.sparse_attn.attention_fwd.default,
                          (q, k, v, None, None, "window", [5, 0], 0.25, "", True, c, 2.0))


# ------------------------------------------------------------------------ declared and refused
def test_sdpa_declares_what_it_cannot_do():
    q, k, v = randn(1, 2, 8, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16)
    text = sa.plan(q, k, v, sa.Dense(), softcap=5.0, sink_logits=torch.zeros(2)).explain()
    line = next(ln for ln in text.splitlines() if "reference.sdpa" in ln)
    assert "learned sinks (sink_logits) not implemented" in line and "softcap not implemented" in line


@pytest.mark.parametrize("bad,exc,match", [
    (dict(softcap=0.0), ValueError, "softcap"), (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"), (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap="50"), TypeError, "softcap"), (dict(softcap=True), TypeError, "softcap"),
    (dict(sink_logits=torch.zeros(3)), ValueError, r"sink_logits must have shape \(Hq,\) = \(4,\)"),
    (dict(sink_logits=torch.zeros(1, 4)), ValueError, "sink_logits"),
    (dict(sink_logits=torch.zeros(4, dtype=torch.int64)), TypeError, "sink_logits"),
    (dict(sink_logits=[0.0] * 4), TypeError, "sink_logits"),
    (dict(sink_logits=torch.zeros(4, device="meta")), ValueError, "sink_logits is on meta"),
])
def test_bad_options(bad, exc, match):
    q, k, v = randn(1, 4, 6, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8)
    with pytest.raises(exc, match=match):
        sa.attention(q, k, v, sa.Dense(), **bad)
    cache = sa.KVCache(1, 2, 8, 8)
    cache.append(k, v)
    with pytest.raises(exc, match=match):
        sa.attention_with_cache(q[:, :, -1:], cache, sa.Dense(), **bad)


def test_window_linear_refuses_the_options():
    q, k, v = randn(1, 2, 6, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="not to WindowLinear"):
        sa.attention(q, k, v, sa.WindowLinear(4), gate=torch.zeros(2), softcap=2.0)
    with pytest.raises(ValueError, match="not to WindowLinear"):
        sa.SparseAttention(sa.WindowLinear(4), num_heads=2, sinks=True)


# -------------------------------------------------------------- Triton (interpreter on a CPU)
TRITON_CASES = [  # kind, sinks, softcap, dtype, gqa, sq, sk, d
    ("window_sinks", True, 2.0, F32, 2, 20, 37, 32),
    ("topk", True, 1.5, F32, 4, 9, 45, 32),
    ("blocksparse", False, 2.0, BF16, 2, 9, 40, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", TRITON_CASES, ids=[_cid(c) for c in TRITON_CASES])
def test_triton_forward_backward(case):
    pytest.importorskip("triton")
    kind, sinks, cap, dtype, gqa, sq, sk, d = case
    run_case(kind, "triton", sinks=sinks, softcap=cap, dtype=dtype, gqa=gqa, sq=sq, sk=sk, d=d, b=1,
             device=TRITON_DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["window_sinks", "topk"])
def test_triton_decode_equals_prefill_rows(kind):
    pytest.importorskip("triton")
    b, hq, hkv, sk, d = 1, 4, 2, 45, 32
    pattern = make_pattern(kind, b=b, hkv=hkv, sk=sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sk, sk, d)
    c, cap = sink_logits_for(hq, requires_grad=False), 2.0
    ref = oracle.oracle_attention(q, k, v, pattern, sink_logits=c, softcap=cap)
    dev = TRITON_DEVICE
    qd, kd, vd, cd = (x.to(dev) for x in (q, k, v, c))
    cache = sa.PagedKVCache(b, hkv, d, num_pages=8, page_size=8, max_len=64, device=dev,
                            pool_block_size=pattern.block_size if kind == "topk" else 16)
    cache.append(kd, vd)
    for rows in (1, 3):
        got = sa.attention_with_cache(qd[:, :, -rows:], cache, pattern, sink_logits=cd, softcap=cap, backend="triton")
        oracle.assert_close_contract(got, ref[:, :, -rows:], dtype=F32, device=dev, what=f"cache Sq={rows}")
        got = sa.attention(qd[:, :, -rows:], kd, vd, pattern, sink_logits=cd, softcap=cap, backend="triton")
        oracle.assert_close_contract(got, ref[:, :, -rows:], dtype=F32, device=dev, what=f"attention Sq={rows}")
