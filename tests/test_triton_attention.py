"""The Triton block-sparse flash attention (`triton.block_sparse`, sparse_attn/backends/triton/).

Runs on TRITON_DEVICE: "cuda" with a GPU, else CPU tensors in Triton's interpreter (slow: sizes
are small and the cases are a hand-made covering of the axes, not a product). Everything is
compared with the float64 oracle (tests/oracle.py) with the contract's bounds:

* every pattern, forward and backward (dq, dk, dv), through `attention(..., backend="triton")`:
  lengths that are not multiples of any tile, Sq < Sk (chunked prefill, decode Sq=1), GQA 1/2/3/4/8,
  head dims 32/48/64/80/96/128/192/200/256, float32 / float16 / bfloat16;
* as a layout consumer: built layouts with tiles that are not powers of two (query sub-tiles, key
  blocks walked in several chunks), strided inputs, forward and backward against `to_dense()`;
* BlockSparse rows with no visible key: zeros and finite (zero) gradients;
* split-K forward (the GPU decode path) and the Triton TopK selection;
* a TopK training step end to end; empty inputs; the transposed TopK token lists; the scheduler.
"""
from __future__ import annotations

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import TRITON_DEVICE, check_against_oracle, leaf64, make_pattern, make_qkv, make_qkv_for, pattern_on
from sparse_attn.layout import build_layout

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)

KERNEL = "triton.block_sparse"
DEV = TRITON_DEVICE


def _fwd():
    from sparse_attn.backends.triton import flash_fwd
    return flash_fwd


def _bwd():
    from sparse_attn.backends.triton import flash_bwd
    return flash_bwd


def _cfg():
    from sparse_attn.backends.triton.attention import TritonBlockSparse
    return TritonBlockSparse()._cfg(torch.empty(0, device=DEV))


def run_ours(q, k, v, pattern):
    """This kernel on a call, whichever Triton kernel the scheduler would prefer."""
    plan = sa.plan(q, k, v, pattern, backend="triton")
    cand = next(c for c in plan.candidates if c.kernel.name == KERNEL)
    assert cand.reasons == []
    return cand.kernel.run(q, k, v, plan.problem)


def to_dev(*xs, grad=True):
    return [x.detach().to(DEV).requires_grad_(grad) for x in xs]


# --------------------------------------------------------------------------------- public API
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # kind, B, Hq, Hkv, Sq, Sk, D, dtype
    ("dense_causal", 1, 2, 2, 37, 37, 64, F32),       # G=1
    ("dense_full", 1, 4, 2, 20, 45, 80, BF16),        # non-causal, Sq < Sk
    ("window", 1, 8, 2, 33, 70, 128, F16),            # G=4, chunked prefill
    ("window_sinks", 2, 8, 1, 1, 50, 64, F32),        # G=8, decode
    ("window_sinks", 1, 2, 1, 40, 40, 96, F16),
    ("blocksparse", 1, 4, 1, 45, 45, 96, F32),        # per-head random layout, empty rows likely
    ("blocksparse_bcast", 2, 2, 1, 30, 47, 64, BF16),
    ("topk", 1, 8, 1, 40, 40, 80, F32),               # G=8, per-token blocks
    ("topk", 1, 4, 2, 1, 53, 64, F16),                # decode
    ("topk_wide", 1, 2, 1, 19, 45, 128, BF16),        # 8-token blocks (padded tiles)
    ("dense_causal", 1, 3, 1, 20, 27, 192, F32),      # G=3 (not a power of two), D=192
    ("topk", 1, 4, 2, 30, 61, 64, F32),               # chunked prefill with selection
    ("dense_causal", 1, 4, 2, 30, 45, 32, BF16),      # head dims at the ends of 32..256 and between
    ("window_sinks", 1, 2, 1, 25, 41, 48, F32),
    ("topk", 1, 4, 1, 21, 50, 200, F16),
    ("blocksparse", 1, 2, 2, 19, 35, 256, F32),
]


def _ids(c):
    return f"{c[0]}-B{c[1]}-G{c[2] // c[3]}-{c[4]}x{c[5]}-D{c[6]}-{str(c[7]).replace('torch.', '')}"


@pytest.mark.parametrize("kind,b,hq,hkv,sq,sk,d,dtype", CASES, ids=[_ids(c) for c in CASES])
def test_against_oracle(kind, b, hq, hkv, sq, sk, d, dtype):
    pattern = make_pattern(kind, b=b, hkv=hkv, sk=sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dtype=dtype)
    q, k, v = to_dev(q, k, v)
    pattern = pattern_on(pattern, DEV)
    plan = sa.plan(q, k, v, pattern, backend="triton")
    assert plan.kernel.name == KERNEL

    def run(q, k, v):
        return sa.attention(q, k, v, pattern, backend="triton")

    def ref(q, k, v):
        return oracle.oracle_attention(q, k, v, pattern)

    def base(q, k, v):
        return oracle.masked_attention_in_dtype(q, k, v, pattern)

    check_against_oracle(run, ref, base, dict(q=q, k=k, v=v), dtype=dtype, device=DEV)


def test_rows_without_keys_are_zero_with_finite_grads():
    b, hq, hkv, s, d, bs = 1, 4, 2, 40, 64, 16
    lay = torch.ones(b, hkv, 3, 3, dtype=torch.bool).tril()
    lay[0, 1, 1] = False  # query block 1 of kv head 1 sees nothing
    pattern = pattern_on(sa.BlockSparse(lay, block_size=bs), DEV)
    q, k, v = to_dev(*make_qkv(b, hq, hkv, s, s, d))
    out = sa.attention(q, k, v, pattern, backend="triton")
    empty = out[0, 2:4, bs:2 * bs]  # heads 2, 3 read kv head 1
    assert torch.equal(empty, torch.zeros_like(empty))
    out.backward(torch.randn_like(out))
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(q.grad[0, 2:4, bs:2 * bs], torch.zeros_like(q.grad[0, 2:4, bs:2 * bs]))
    ref = oracle.oracle_attention(*(leaf64(x) for x in (q, k, v)), pattern)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV)


def test_topk_training_step():
    """A tiny attention layer with TopK trained one step: the parameter gradients equal the float64
    oracle's (the selection is part of the layout and has no gradient)."""
    torch.manual_seed(0)
    b, s, dm, hq, hkv, d = 1, 45, 64, 4, 2, 64
    pattern = sa.TopK(1, block_size=16)
    wq = torch.randn(dm, hq * d, device=DEV) * dm ** -0.5
    wk = torch.randn(dm, hkv * d, device=DEV) * dm ** -0.5
    wv = torch.randn(dm, hkv * d, device=DEV) * dm ** -0.5
    x = torch.randn(b, s, dm, device=DEV)

    def layer(x, ws, attn):
        q = (x @ ws[0]).view(b, s, hq, d).transpose(1, 2)
        k = (x @ ws[1]).view(b, s, hkv, d).transpose(1, 2)
        v = (x @ ws[2]).view(b, s, hkv, d).transpose(1, 2)
        return attn(q, k, v).square().mean()

    ws = [w.clone().requires_grad_() for w in (wq, wk, wv)]
    loss = layer(x, ws, lambda q, k, v: sa.attention(q, k, v, pattern, backend="triton"))
    loss.backward()
    ws64 = [w.double().requires_grad_() for w in (wq, wk, wv)]
    loss64 = layer(x.double(), ws64, lambda q, k, v: oracle.oracle_attention(q, k, v, pattern))
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())
    for w, w64 in zip(ws, ws64):
        oracle.assert_close_contract(w.grad, w64.grad, dtype=torch.float32, device=DEV, what="dW")
    opt = torch.optim.SGD(ws, lr=0.1)
    opt.step()  # the step runs and changes the weights
    assert not torch.equal(ws[0].detach(), wq)


def test_empty_inputs():
    for shape in ((0, 4, 2, 5, 9, 64), (1, 4, 2, 0, 9, 64)):
        q, k, v = to_dev(*make_qkv(*shape))
        out = sa.attention(q, k, v, sa.SlidingWindow(4), backend="triton")
        assert out.shape == (shape[0], 4, shape[3], 64)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
    q, k, v = to_dev(*make_qkv(1, 2, 1, 4, 0, 64), grad=False)
    out = sa.attention(q, k, v, sa.Dense(causal=False), backend="triton")  # no keys at all
    assert out.shape == (1, 2, 4, 64) and (out == 0).all()


def test_topk_decode_equals_prefill_row():
    """Decode of the last token gives row Sq-1 of prefill (per-token, causal selection)."""
    pattern = sa.TopK(2, block_size=8)
    q, k, v = make_qkv_for(pattern, 1, 4, 1, 43, 43, 64)
    q, k, v = to_dev(q, k, v, grad=False)
    full = run_ours(q, k, v, pattern)
    last = run_ours(q[:, :, -1:], k, v, pattern)  # (backend="triton" may pick the decode kernel)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ layout consumer
def _masked64(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    m = mask.expand(q.shape[0], k.shape[1], *mask.shape[2:]).repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ vv


@pytest.mark.parametrize("pattern,q_block,k_block", [
    (sa.Dense(), 80, 40),                     # 80-row tiles in sub-tiles, 40-key blocks in two chunks
    (sa.SlidingWindow(30, sinks=5), 48, 20),
    (sa.Dense(causal=False), 16, 72),
], ids=["dense-80x40", "window-sinks-48x20", "full-16x72"])
def test_built_layouts_any_tiling(pattern, q_block, k_block):
    b, hq, hkv, sq, sk, d, dv = 1, 4, 2, 50, 83, 80, 64
    q = torch.randn(b, sq, hq, d).transpose(1, 2)  # strided (B, S, H, D) views
    k = torch.randn(b, sk, hkv, d).transpose(1, 2)
    v = torch.randn(b, hkv, sk, 2 * dv)[..., ::2]
    q, k, v = (x.to(DEV) for x in (q, k, v))
    lay = build_layout(pattern, batch=b, kv_heads=hkv, sq=sq, sk=sk, q_block=q_block, k_block=k_block, device=DEV)
    scale = 0.11
    out, lse = _fwd().flash_forward(q, k, v, lay, scale=scale, cfg=_cfg())
    mask = lay.to_dense()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _masked64(q64, k64, v64, mask, scale)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV)
    ref_lse = torch.logsumexp((q64 @ k64.repeat_interleave(2, 1).transpose(-1, -2) * scale).masked_fill(
        ~mask, float("-inf")), -1)
    oracle.assert_close_contract(lse, ref_lse.detach(), dtype=torch.float32, device=DEV, what="lse")
    dout = torch.randn_like(out)
    dq, dk, dv_ = _bwd().flash_backward(q, k, v, out, lse, dout, lay, scale=scale, cfg=_cfg())
    g64 = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv_), g64):
        oracle.assert_close_contract(got, want, dtype=torch.float32, device=DEV, what=name)


@pytest.mark.parametrize("kind", ["dense_causal", "window_sinks", "blocksparse", "topk"])
def test_split_k_forward(kind):
    """Split-K (the GPU's decode / short-chunk path): the tile lists shared by 3 programs per tile,
    partial results merged by log-sum-exp; equals the float64 oracle, empty rows stay 0 / +inf."""
    from sparse_attn.backends.triton.attention import triton_layout
    b, hq, hkv, sq, sk, d = 1, 4, 2, 3, 150, 64
    pattern = pattern_on(make_pattern(kind, b=b, hkv=hkv, sk=sk), DEV)
    if kind == "blocksparse":  # the last query block of kv head 1 sees nothing
        lay = pattern.layout.clone()
        lay[:, 1, -1] = False
        pattern = sa.BlockSparse(lay, block_size=pattern.block_size)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d)
    q, k, v = to_dev(q, k, v, grad=False)
    lay = triton_layout(q, k, pattern, _cfg())
    out, lse = _fwd().flash_forward(q, k, v, lay, scale=d ** -0.5, cfg=_cfg(), splits=3)
    out1, lse1 = _fwd().flash_forward(q, k, v, lay, scale=d ** -0.5, cfg=_cfg(), splits=1)
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, pattern), dtype=torch.float32, device=DEV)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse1))
    torch.testing.assert_close(lse, lse1, rtol=1e-5, atol=1e-5)
    if kind == "blocksparse":
        assert torch.isinf(lse[0, 2:]).all() and (out[0, 2:] == 0).all()


# ------------------------------------------------------------------------------- TopK selection
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,pattern", [
    (1, 4, 2, 70, 70, 64, sa.TopK(2, block_size=8)),
    (2, 8, 1, 1, 130, 80, sa.TopK(3, block_size=16, sink_blocks=0, local_blocks=2)),  # decode
    (1, 2, 1, 40, 200, 128, sa.TopK(5, block_size=12, sink_blocks=2)),  # Sq < Sk, odd block
    (1, 4, 4, 33, 33, 64, sa.TopK(40, block_size=4)),  # topk > candidates: -1 padding
], ids=["prefill", "decode", "chunked", "wide"])
def test_topk_selection_kernel(b, hq, hkv, sq, sk, d, pattern):
    """The Triton selection equals the PyTorch one (inputs drawn so no choice hangs on rounding)
    and the float64 oracle's selection."""
    from sparse_attn.backends.triton.topk_select import topk_token_index_triton
    from sparse_attn.layout.block_layout import index_to_bool
    from sparse_attn.layout.topk_selection import topk_token_index
    q, k, _ = make_qkv_for(pattern, b, hq, hkv, sq, sk, d)
    got = topk_token_index_triton(q.to(DEV), k.to(DEV), pattern).cpu()
    assert got.dtype == torch.int32 and got.shape == (b, hkv, sq, pattern.topk)
    assert torch.equal(got, topk_token_index(q, k, pattern))
    nb = -(-sk // pattern.block_size)
    pos = torch.arange(sk - sq, sk)
    forced = pattern.forced_block_mask(pos // pattern.block_size, torch.arange(nb))
    assert torch.equal(index_to_bool(got, nb) | forced, oracle.oracle_select_blocks(q, k, pattern))


# ------------------------------------------------------------------------------------ scheduler
def test_scheduler():
    q, k, v = make_qkv(1, 8, 2, 1024, 1024, 64)
    q, k, v = (x.to(DEV) for x in (q, k, v))
    pats = [sa.Dense(), sa.SlidingWindow(128), sa.TopK(4, block_size=64),
            sa.BlockSparse(torch.rand(1, 2, 16, 16, device=DEV) < 0.3, block_size=64)]
    for pattern in pats:
        plan = sa.plan(q, k, v, pattern)
        cand = next(c for c in plan.candidates if c.kernel.name == KERNEL)
        assert cand.reasons == [] and cand.cost is not None and cand.cost > 0
        if DEV == "cpu":  # the interpreter is never the automatic choice
            assert plan.kernel.name != KERNEL and cand.cost > 1000
        assert sa.plan(q, k, v, pattern, backend="triton").kernel.name == KERNEL
    small = sa.plan(q[..., :24], k[..., :24], v[..., :24], sa.Dense(), backend=None)
    cand = next(c for c in small.candidates if c.kernel.name == KERNEL)
    assert any("head dims" in r for r in cand.reasons)
    if DEV == "cuda":  # sparser patterns cost less on the GPU
        costs = {type(p).__name__: next(c.cost for c in sa.plan(q, k, v, p, backend="triton").candidates
                                        if c.kernel.name == KERNEL) for p in pats[:2]}
        assert costs["SlidingWindow"] < costs["Dense"]


def test_unavailable_triton_is_a_reason(monkeypatch):
    from sparse_attn.backends.triton import attention as mod

    def broken():
        raise ImportError("no module named triton")
    monkeypatch.setattr(mod, "_triton_modules", broken)
    q, k, v = make_qkv(1, 2, 1, 8, 8, 64)
    with pytest.raises(ValueError, match="triton cannot be used here"):
        sa.plan(q.to(DEV), k.to(DEV), v.to(DEV), sa.Dense(), backend="triton")
