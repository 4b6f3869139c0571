"""The oracle checked against facts that do not depend on it: PyTorch's own SDPA, brute-force loops,
and identities of the definitions (a window wider than the sequence is dense, ...)."""
import math

import pytest
import torch
import torch.nn.functional as F

import oracle
from conftest import make_qkv, randn, random_layout
from sparse_attn.patterns import BlockSparse, Dense, SlidingWindow, TopK, WindowLinear

F64 = torch.float64


def qkv64(b=2, hq=4, hkv=2, sq=13, sk=13, d=8, dv=None, requires_grad=False):
    return make_qkv(b, hq, hkv, sq, sk, d, dv, dtype=F64, requires_grad=requires_grad)


def sdpa(q, k, v, **kw):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), **kw)


def loop_attention(q, k, v, visible, scale=None):
    """Attention by explicit loops over (b, h, t): `visible(b, h, p, j) -> bool`."""
    b_, hq, sq, d = q.shape
    sk = k.shape[2]
    g = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b_, hq, sq, v.shape[-1], dtype=F64)
    for b in range(b_):
        for h in range(hq):
            for t in range(sq):
                p = sk - sq + t
                js = [j for j in range(sk) if visible(b, h, p, j)]
                if js:
                    s = torch.stack([q[b, h, t] @ k[b, h // g, j] for j in js]) * scale
                    out[b, h, t] = torch.softmax(s, 0) @ v[b, h // g, js]
    return out


@pytest.mark.parametrize("gqa", [1, 2, 4])
def test_dense_causal_prefill_equals_sdpa(gqa):
    q, k, v = qkv64(hq=2 * gqa, hkv=2, requires_grad=True)
    out = oracle.oracle_attention(q, k, v, Dense())
    ref = sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sq,sk", [(13, 13), (5, 13), (17, 9)], ids=["sq=sk", "sq<sk", "sq>sk"])
def test_dense_noncausal_equals_sdpa(sq, sk):
    q, k, v = qkv64(sq=sq, sk=sk, dv=6)
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, Dense(causal=False), scale=0.3),
                               sdpa(q, k, v, scale=0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sq", [1, 4, 13])
def test_dense_causal_is_end_aligned(sq):
    q, k, v = qkv64(sq=13, sk=13)
    full = oracle.oracle_attention(q, k, v, Dense())
    part = oracle.oracle_attention(q[:, :, 13 - sq:], k, v, Dense())
    torch.testing.assert_close(part, full[:, :, 13 - sq:], rtol=1e-13, atol=1e-14)
    # decode: the last query sees every key
    torch.testing.assert_close(oracle.oracle_attention(q[:, :, -1:], k, v, Dense()),
                               sdpa(q[:, :, -1:], k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window,sinks", [(1, 0), (4, 0), (5, 2), (3, 20)])
@pytest.mark.parametrize("sq", [1, 6, 17])
def test_sliding_window_matches_loops(window, sinks, sq):
    q, k, v = qkv64(sq=sq, sk=17)
    out = oracle.oracle_attention(q, k, v, SlidingWindow(window, sinks))
    ref = loop_attention(q, k, v, lambda b, h, p, j: j <= p and (p - j < window or j < sinks))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_sliding_window_one_sees_only_itself():
    q, k, v = qkv64(hq=2, hkv=2, sq=9, sk=9)
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, SlidingWindow(1)), v, rtol=0, atol=1e-15)


@pytest.mark.parametrize("window,sinks", [(13, 0), (40, 0), (2, 13)])
def test_wide_sliding_window_is_dense_causal(window, sinks):
    q, k, v = qkv64(sq=7, sk=13)
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, SlidingWindow(window, sinks)),
                               oracle.oracle_attention(q, k, v, Dense()), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("bcast", [False, True], ids=["full-layout", "broadcast-layout"])
def test_block_sparse_matches_loops(bcast):
    bs, sk = 4, 19
    q, k, v = qkv64(sq=11, sk=sk)
    layout = random_layout(1 if bcast else 2, 1 if bcast else 2, sk, bs)
    layout[..., 0, :] = False  # query block 0 sees nothing: its rows are 0
    out = oracle.oracle_attention(q, k, v, BlockSparse(layout, block_size=bs))

    def vis(b, h, p, j):
        lay = layout[0 if bcast else b, 0 if bcast else h // 2]
        return j <= p and bool(lay[p // bs, j // bs])
    torch.testing.assert_close(out, loop_attention(q, k, v, vis), rtol=1e-12, atol=1e-12)


def test_block_sparse_full_layout_is_dense_causal_and_empty_rows_are_zero():
    q, k, v = qkv64(sq=10, sk=10)
    full = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, BlockSparse(full, block_size=4)),
                               oracle.oracle_attention(q, k, v, Dense()), rtol=1e-14, atol=1e-14)
    empty = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    out = oracle.oracle_attention(q.requires_grad_(), k, v, BlockSparse(empty, block_size=4))
    assert (out == 0).all()
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(gq).all() and (gq == 0).all()


def brute_select(q, k, pat):
    """TopK selection with Python lists, one (b, hkv, t) at a time."""
    b_, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g, bs = hq // hkv, pat.block_size
    nb = math.ceil(sk / bs)
    sel = torch.zeros(b_, hkv, sq, nb, dtype=torch.bool)
    for b in range(b_):
        for kh in range(hkv):
            kbar = [k[b, kh, n * bs:(n + 1) * bs].sum(0) / len(range(n * bs, min(sk, (n + 1) * bs)))
                    for n in range(nb)]
            for t in range(sq):
                p = sk - sq + t
                pb = p // bs
                forced = {n for n in range(pb + 1) if n < pat.sink_blocks or n > pb - pat.local_blocks}
                score = {n: sum(float(q[b, kh * g + i, t] @ kbar[n]) for i in range(g)) / g
                         for n in range(pb) if n not in forced}
                chosen = sorted(score, key=score.get, reverse=True)[:pat.topk]
                for n in forced | set(chosen):
                    sel[b, kh, t, n] = True
    return sel


@pytest.mark.parametrize("pat", [TopK(1, 4), TopK(2, 3, sink_blocks=2, local_blocks=2),
                                 TopK(0, 5, sink_blocks=0), TopK(3, 4, sink_blocks=0, local_blocks=3)],
                         ids=["k1", "k2-sinks2-local2", "k0-nosink", "k3-local3"])
@pytest.mark.parametrize("gqa", [1, 4])
def test_select_blocks_matches_brute_force(pat, gqa):
    q, k, _ = qkv64(hq=2 * gqa, hkv=2, sq=9, sk=23)
    sel = oracle.oracle_select_blocks(q, k, pat)
    assert torch.equal(sel, brute_select(q, k, pat))
    p = torch.arange(23 - 9, 23)
    own = p // pat.block_size
    assert sel.gather(-1, own.expand(2, 2, 9)[..., None]).all(), "own block always selected"
    future = torch.arange(sel.shape[-1])[None, :] > own[:, None]
    assert not (sel & future).any(), "no block after the query's own"


@pytest.mark.parametrize("sq", [1, 8, 29])
def test_topk_with_enough_blocks_is_dense_causal(sq):
    q, k, v = qkv64(sq=sq, sk=29)
    dense = oracle.oracle_attention(q, k, v, Dense())
    for pat in (TopK(8, 4), TopK(0, 4, sink_blocks=0, local_blocks=8), TopK(1, 32)):
        torch.testing.assert_close(oracle.oracle_attention(q, k, v, pat), dense, rtol=1e-13, atol=1e-14)


def test_topk_without_selection_is_block_diagonal():
    q, k, v = qkv64(sq=15, sk=15)
    diag = torch.eye(4, dtype=torch.bool)[None, None]
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, TopK(0, 4, sink_blocks=0)),
                               oracle.oracle_attention(q, k, v, BlockSparse(diag, block_size=4)),
                               rtol=1e-13, atol=1e-14)


def test_window_linear_limits_and_loop():
    q, k, v = qkv64(hq=4, hkv=2, sq=6, sk=14)
    gate = torch.tensor([-0.5, 0.0, 0.7, 2.0], dtype=F64)
    pat = WindowLinear(4, sinks=2)
    out = oracle.oracle_attention(q, k, v, pat, gate=gate)
    window = oracle.oracle_attention(q, k, v, SlidingWindow(4, sinks=2))
    # gate -> +inf: the window alone
    torch.testing.assert_close(oracle.oracle_attention(q, k, v, pat, gate=torch.full((4,), 60.0, dtype=F64)),
                               window, rtol=1e-12, atol=1e-12)
    # loops for the linear part
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    lin = torch.zeros_like(out)
    for b in range(2):
        for h in range(4):
            for t in range(6):
                p = 14 - 6 + t
                js = [j for j in range(2, p - 4 + 1)]  # evicted: j <= p, j >= sinks, p - j >= window
                if js:
                    w = torch.stack([phi(q[b, h, t]) @ phi(k[b, h // 2, j]) for j in js])
                    lin[b, h, t] = (w @ v[b, h // 2, js]) / w.sum()
    sg = torch.sigmoid(gate)[None, :, None, None]
    torch.testing.assert_close(out, sg * window + (1 - sg) * lin, rtol=1e-12, atol=1e-12)
    # nothing evicted (Sk <= window): L = 0
    short = oracle.oracle_attention(q[:, :, :3], k[:, :, :4], v[:, :, :4], pat, gate=gate)
    torch.testing.assert_close(short, sg * oracle.oracle_attention(q[:, :, :3], k[:, :, :4], v[:, :, :4],
                                                                   Dense()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["none", "per-head", "per-token"])
def test_linear_attention_recurrence_equals_quadratic_form(kind):
    b, h, s, d, dv = 2, 3, 21, 5, 4
    q, k, v = randn(b, h, s, d, dtype=F64), randn(b, h, s, d, dtype=F64), randn(b, h, s, dv, dtype=F64)
    decay = {"none": None, "per-head": -torch.rand(h, dtype=F64),
             "per-token": -3 * torch.rand(b, h, s, dtype=F64)}[kind]
    s0 = randn(b, h, d, dv, dtype=F64)
    o, st = oracle.oracle_linear_attention(q, k, v, decay=decay, scale=0.4, initial_state=s0)
    quad = oracle.masked_linear_attention_in_dtype(q, k, v, decay=decay, scale=0.4, initial_state=s0)
    torch.testing.assert_close(o, quad, rtol=1e-10, atol=1e-10)
    if kind == "none":  # causal unnormalised attention, by hand
        ref = (q @ k.transpose(-1, -2)).tril() @ v * 0.4 + 0.4 * q @ s0
        torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st, s0 + k.transpose(-1, -2) @ v, rtol=1e-12, atol=1e-12)
    # chaining two halves through the state equals one run
    dec = lambda a, z: decay if decay is None or decay.dim() == 1 else decay[..., a:z]  # noqa: E731
    o1, s1 = oracle.oracle_linear_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], decay=dec(0, 8),
                                            scale=0.4, initial_state=s0)
    o2, s2 = oracle.oracle_linear_attention(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], decay=dec(8, s),
                                            scale=0.4, initial_state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, st, rtol=1e-12, atol=1e-12)


def test_linear_attention_default_scale():
    q, k, v = (randn(1, 1, 5, 9, dtype=F64) for _ in range(3))
    o, _ = oracle.oracle_linear_attention(q, k, v)
    o3, _ = oracle.oracle_linear_attention(q, k, v, scale=1 / 3)
    torch.testing.assert_close(o, o3, rtol=1e-14, atol=0)


@pytest.mark.parametrize("pat", [Dense(), SlidingWindow(5, 1), TopK(1, 4), WindowLinear(5)],
                         ids=["dense", "window", "topk", "window_linear"])
def test_in_dtype_evaluation_in_float64_is_the_oracle(pat):
    q, k, v = qkv64(sq=6, sk=18)
    gate = torch.randn(4, dtype=F64)
    torch.testing.assert_close(oracle.masked_attention_in_dtype(q, k, v, pat, gate=gate),
                               oracle.oracle_attention(q, k, v, pat, gate=gate), rtol=1e-13, atol=1e-14)
    lo = oracle.masked_attention_in_dtype(*(x.half() for x in (q, k, v)), pat, gate=gate.half())
    assert lo.dtype == torch.float16
    assert 0 < oracle.rel_err(lo, oracle.oracle_attention(q, k, v, pat, gate=gate)) < 2e-3


def test_rel_err_and_bounds():
    ref = torch.ones(10, dtype=F64)
    assert oracle.rel_err(ref, ref) == 0
    assert oracle.rel_err(torch.zeros(3), torch.zeros(3)) == 0
    assert oracle.rel_err(torch.ones(4), torch.zeros(4)) == 2.0
    assert math.isclose(oracle.rel_err(ref * 1.01, ref), 0.01, rel_tol=1e-9)
    oracle.assert_close_contract((ref * (1 + 1e-6)).float(), ref, dtype=torch.float32, device="cpu")
    with pytest.raises(AssertionError, match="relative error"):
        oracle.assert_close_contract((ref * (1 + 1e-4)).float(), ref, dtype=torch.float32, device="cpu")
    oracle.assert_close_contract((ref * (1 + 1e-4)).float(), ref, dtype=torch.float32, device="cuda")
    bad = ref.clone().float()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        oracle.assert_close_contract(bad, ref, dtype=torch.float32, device="cpu")
    out = (ref * (1 + 1e-3)).half()
    oracle.assert_close_contract(out, ref, dtype=torch.float16, device="cpu", lowp_baseline=6e-4)
    with pytest.raises(AssertionError, match="baseline"):
        oracle.assert_close_contract(out, ref, dtype=torch.float16, device="cpu", lowp_baseline=1e-4)
    with pytest.raises(AssertionError, match="dtype"):
        oracle.assert_close_contract(ref.float(), ref, dtype=torch.float16, device="cpu")


@pytest.mark.parametrize("kind", ["none", "per-head", "per-token"])
def test_linear_recurrence_backward_gradcheck(kind):
    """The oracle's hand-written adjoint recurrence against finite differences, and against
    autograd through the quadratic form."""
    b, h, s, d, dv = 2, 2, 7, 3, 4
    q, k, v = (randn(b, h, s, n, dtype=F64, requires_grad=True) for n in (d, d, dv))
    decay = {"none": None, "per-head": -torch.rand(h, dtype=F64),
             "per-token": -2 * torch.rand(b, h, s, dtype=F64)}[kind]
    if decay is not None:
        decay.requires_grad_()
    s0 = randn(b, h, d, dv, dtype=F64, requires_grad=True)
    ins = [x for x in (q, k, v, decay, s0) if x is not None]

    def f(q, k, v, *rest):
        dec, st = (rest[0], rest[1]) if decay is not None else (None, rest[0])
        return oracle.oracle_linear_attention(q, k, v, decay=dec, scale=0.7, initial_state=st)
    assert torch.autograd.gradcheck(f, ins)
    o, st = f(*ins)
    quad = oracle.masked_linear_attention_in_dtype(q, k, v, decay=decay, scale=0.7, initial_state=s0)
    go = torch.randn_like(o)
    for a, c in zip(torch.autograd.grad(o, ins, go), torch.autograd.grad(quad, ins, go)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
