"""The `cpu` backend's C++ kernel (`cpu.block_sparse`, csrc/cpu/): forward, lse and backward.

* through the public API, against a float64 evaluation: `attention(q.double(), ..., backend="reference")`
  (itself checked against the independent oracle in test_oracle.py), for every softmax pattern,
  GQA 1/2/4/8, head dims 64/80/128 (and odd ones), lengths that are not multiples of any block,
  Sq < Sk, float32 / bfloat16 / float16 with the contract's bounds;
* as a layout consumer: hand-made and built `BlockLayout`s (q_block != k_block, broadcast
  batch/heads, per-token blocks, empty lists) against a float64 masked evaluation of
  `layout.to_dense()`;
* the backward pass: dq, dk, dv against the float64 oracle (tests/oracle.py) for every softmax
  pattern, GQA 1/2/4/8, head dims 64/80/128, odd lengths, Sq < Sk, the three dtypes (bfloat16 and
  float16 also within twice the plain in-dtype evaluation's error), for both schedules (two-pass
  and fused: `block_sparse_backward_layout(mode=...)`), also over built layouts of any tiling;
  the schedules against each other; the forward's lse; a TopK training step of a small model
  against the same step on the float64 reference;
* the scheduler: chosen for training, and a failed build is reported, not fatal.

The first test in a fresh cache compiles the extension (~30 s on the 2-core CPU machine).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparse_attn as sa
from sparse_attn.layout import BlockLayout, build_layout, compact, index_to_bool
from sparse_attn.layout.topk_selection import topk_token_index
from conftest import needs_jit

KERNEL = "cpu.block_sparse"
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="f16")]

pytestmark = needs_jit


def _kernel_module():
    from sparse_attn.backends.cpu import kernels
    return kernels


def run_cpu(q, k, v, pattern, **kw):
    """This kernel through its `run` (what the scheduler calls; autograd included) on the plan's
    problem, whichever `cpu` kernel the scheduler prefers (cpu.decode for short Sq, say)."""
    p = sa.plan(q, k, v, pattern, backend="cpu", **kw)
    cand = next(c for c in p.candidates if c.kernel.name == KERNEL)
    assert cand.reasons == [], cand.reasons
    return cand.kernel.run(q, k, v, p.problem)


def rel_err(out, ref) -> float:
    out, ref = out.to(torch.float64), ref.to(torch.float64)
    assert not torch.isnan(out).any(), "NaN in the output"
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def masked_in_dtype(q, k, v, mask, scale):
    """Plain masked attention evaluated in the inputs' dtype (the contract's low-precision baseline)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    m = mask.expand(q.shape[0], k.shape[1], *mask.shape[2:]).repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return p @ vv


def masked_f64(q, k, v, mask, scale):
    return masked_in_dtype(q.double(), k.double(), v.double(), mask, scale)


def check(out, ref, dtype, baseline=None):
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= BOUND[dtype], f"relative error {err:.3g} > {BOUND[dtype]:.3g}"
    if baseline is not None:  # float16 / bfloat16: at most twice the plain evaluation's error
        base = rel_err(baseline, ref)
        assert err <= 2 * base + 1e-6, f"relative error {err:.3g} > 2 x baseline {base:.3g}"


def qkv(b, hq, hkv, sq, sk, d, dv=None, dtype=torch.float32):
    dv = d if dv is None else dv
    return (torch.randn(b, hq, sq, d).to(dtype), torch.randn(b, hkv, sk, d).to(dtype),
            torch.randn(b, hkv, sk, dv).to(dtype))


def random_layout(b, hkv, sq, sk, bs, density=0.5):
    """Random BlockSparse layout; one query block inside the query range sees nothing."""
    nb = -(-sk // bs)
    lay = torch.rand(b, hkv, nb, nb) < density
    first = (sk - sq) // bs
    lay[..., torch.randint(first, nb, ()).item(), :] = False
    return lay


# ------------------------------------------------------------------------------------ public API
CONFIGS = [  # kind, B, Hq, Hkv, Sq, Sk, D, Dv
    ("dense", 1, 4, 4, 37, 37, 64, 64),
    ("dense", 2, 8, 4, 5, 71, 80, 80),
    ("dense", 1, 8, 1, 1, 71, 128, 128),
    ("dense", 1, 8, 2, 300, 300, 128, 128),  # several 64-row tiles, dynamic scheduling
    ("dense_full", 1, 8, 2, 20, 50, 64, 32),
    ("dense_full", 1, 2, 1, 30, 10, 33, 17),  # non-causal allows Sq > Sk; odd head dims
    ("window", 1, 4, 1, 71, 71, 128, 128),
    ("window", 1, 4, 2, 5, 300, 80, 80),
    ("window_sinks", 2, 8, 1, 1, 71, 64, 64),
    ("window_sinks", 1, 4, 2, 300, 300, 64, 64),
    ("window_big_sinks", 1, 2, 2, 37, 37, 64, 64),
    ("blocksparse", 2, 4, 2, 37, 37, 80, 80),
    ("blocksparse", 1, 8, 8, 5, 71, 64, 64),
    ("blocksparse_bcast", 2, 8, 1, 71, 71, 128, 128),
    ("blocksparse_big_blocks", 1, 4, 2, 250, 250, 64, 80),  # block 100: 112 columns (64 + 48)
    ("topk", 1, 8, 1, 71, 71, 64, 64),
    ("topk", 2, 4, 2, 1, 50, 128, 128),
    ("topk", 1, 2, 1, 20, 71, 80, 80),
    ("topk", 1, 8, 2, 200, 200, 128, 128),  # tokens of a tile share selected blocks
    ("topk_wide", 1, 4, 1, 5, 71, 80, 80),
]


def make_pattern(kind, b, hkv, sq, sk):
    return {
        "dense": lambda: sa.Dense(),
        "dense_full": lambda: sa.Dense(causal=False),
        "window": lambda: sa.SlidingWindow(20),
        "window_sinks": lambda: sa.SlidingWindow(13, sinks=3),
        "window_big_sinks": lambda: sa.SlidingWindow(7, sinks=20),
        "blocksparse": lambda: sa.BlockSparse(random_layout(b, hkv, sq, sk, 16), block_size=16),
        "blocksparse_bcast": lambda: sa.BlockSparse(random_layout(1, 1, sq, sk, 16), block_size=16),
        "blocksparse_big_blocks": lambda: sa.BlockSparse(random_layout(1, hkv, sq, sk, 100, 0.7), block_size=100),
        "topk": lambda: sa.TopK(1 if sk < 100 else 3, block_size=16),
        "topk_wide": lambda: sa.TopK(2, block_size=8, sink_blocks=0, local_blocks=2),
    }[kind]()


def draw_inputs(pattern, shape, dtype):
    """Random inputs; for TopK, redrawn until the selection does not hang on rounding (the float32
    selection of the dtype's values equals the float64 one)."""
    for _ in range(50):
        q, k, v = qkv(*shape, dtype=dtype)
        if not isinstance(pattern, sa.TopK):
            return q, k, v
        if torch.equal(sa.select_blocks(q, k, pattern), sa.select_blocks(q.double(), k.double(), pattern)):
            return q, k, v
    raise RuntimeError("no well-separated TopK input")


def visibility(q, k, pattern):
    """The token-level mask of `pattern`, from the package's layout (for the low-precision baseline)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    ti = topk_token_index(q, k, pattern) if isinstance(pattern, sa.TopK) else None
    return build_layout(pattern, batch=b, kv_heads=hkv, sq=sq, sk=sk, token_index=ti).to_dense()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,b,hq,hkv,sq,sk,d,dv", CONFIGS,
                         ids=[f"{c[0]}-gqa{c[2] // c[3]}-sq{c[4]}-sk{c[5]}-d{c[6]}" for c in CONFIGS])
def test_against_float64_reference(kind, b, hq, hkv, sq, sk, d, dv, dtype):
    pattern = make_pattern(kind, b, hkv, sq, sk)
    q, k, v = draw_inputs(pattern, (b, hq, hkv, sq, sk, d, dv), dtype)
    out = run_cpu(q, k, v, pattern)
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    base = None
    if dtype != torch.float32:
        base = masked_in_dtype(q, k, v, visibility(q, k, pattern), d ** -0.5)
    check(out, ref, dtype, base)
    if kind.startswith("blocksparse"):  # query blocks that see nothing output exact zeros
        lay = pattern.layout.expand(b, hkv, -1, -1)
        pos = torch.arange(sk - sq, sk)
        empty = ~lay[:, :, pos // pattern.block_size].any(-1)  # (B, Hkv, Sq)
        empty = empty.repeat_interleave(hq // hkv, 1)
        assert empty.any() and (out[empty] == 0).all()


def test_scale_and_strided_inputs():
    """Non-default scale; q/k/v as (B, S, H, D) transposed views (read through their strides)."""
    b, hq, hkv, s, d = 2, 8, 2, 70, 64
    q = torch.randn(b, s, hq, d).transpose(1, 2)
    k = torch.randn(b, s, hkv, d).transpose(1, 2)
    v = torch.randn(b, s, hkv, 2 * d)[..., ::2].transpose(1, 2)  # strided head dim too
    for pattern in (sa.Dense(), sa.SlidingWindow(9, sinks=2)):
        out = run_cpu(q, k, v, pattern, scale=0.3)
        ref = sa.attention(q.double(), k.double(), v.double(), pattern, scale=0.3, backend="reference")
        check(out, ref, torch.float32)


def test_empty_inputs():
    for shape in ((0, 4, 2, 5, 9, 16), (1, 4, 2, 0, 9, 16)):
        q, k, v = qkv(*shape)
        out = run_cpu(q, k, v, sa.SlidingWindow(4))
        assert out.shape == (shape[0], 4, shape[3], 16)
    q, k, v = qkv(1, 2, 1, 4, 0, 16)
    out = run_cpu(q, k, v, sa.Dense(causal=False))  # no keys at all
    assert out.shape == (1, 2, 4, 16) and (out == 0).all()


# -------------------------------------------------------------------------------- layout consumer
def run_layout(q, k, v, lay, scale):
    return _kernel_module().block_sparse_forward_layout(q, k, v, lay, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern,q_block,k_block", [
    (sa.Dense(), 32, 48),
    (sa.Dense(), 7, 5),
    (sa.Dense(causal=False), 64, 16),
    (sa.SlidingWindow(40, sinks=5), 16, 40),
    (sa.SlidingWindow(3), 128, 8),
], ids=["dense-32x48", "dense-7x5", "full-64x16", "window-sinks-16x40", "window-128x8"])
def test_built_layouts_any_tiling(pattern, q_block, k_block, dtype):
    b, hq, hkv, sq, sk, d = 2, 4, 2, 90, 131, 80
    q, k, v = qkv(b, hq, hkv, sq, sk, d, dtype=dtype)
    lay = build_layout(pattern, batch=b, kv_heads=hkv, sq=sq, sk=sk, q_block=q_block, k_block=k_block)
    out = run_layout(q, k, v, lay, 0.125)
    mask = lay.to_dense()
    check(out, masked_f64(q, k, v, mask, 0.125), dtype,
          masked_in_dtype(q, k, v, mask, 0.125) if dtype != torch.float32 else None)


@pytest.mark.parametrize("lb,lh", [(1, 1), (2, 1), (1, 3), (2, 3)], ids=["bcast", "per-batch", "per-head", "full"])
def test_hand_made_layout_with_token_blocks(lb, lh):
    """Random full / partial lists (broadcast over batch and/or heads), an arbitrary token rule,
    and random per-token blocks (some rows with none): the kernel visits exactly what it is told."""
    b, g, hkv, sq, sk, d, qb, kb = 2, 2, 3, 45, 100, 64, 16, 12
    q, k, v = qkv(b, g * hkv, hkv, sq, sk, d)
    m0, m1 = (sk - sq) // qb, -(-sk // qb)
    nb = -(-sk // kb)
    grid = torch.rand(lb, lh, m1 - m0, nb)
    full, part = grid < 0.3, (grid >= 0.3) & (grid < 0.5)
    full[..., 1, :] = False  # a tile with partial blocks only
    part[..., 1, :3] = True
    full[..., 2, :], part[..., 2, :] = False, False  # a tile with no blocks
    fc, fi = compact(full, nb)
    pc, pi = compact(part, 6)  # narrower than the candidates: lists are cut at `width`
    token = torch.rand(b, hkv, sq, nb) < 0.15
    token[:, :, ::3] = False
    # per-token blocks come on top of the tile's lists (the format never lists a block twice)
    tile_of_row = (torch.arange(sk - sq, sk) // qb) - m0
    listed = (index_to_bool(fi, nb) | index_to_bool(pi, nb))[:, :, tile_of_row]  # (lb, lh, Sq, nb)
    token &= ~listed
    tc, ti = compact(token, 4)
    ti = torch.where(torch.arange(4) < tc[..., None], ti, torch.full_like(ti, -1))
    lay = BlockLayout(sq=sq, sk=sk, q_block=qb, k_block=kb, causal=True, window=30, sink_tokens=4,
                      full_count=torch.minimum(fc, torch.tensor(nb, dtype=torch.int32)), full_index=fi,
                      partial_count=torch.minimum(pc, torch.tensor(6, dtype=torch.int32)), partial_index=pi,
                      token_index=ti)
    out = run_layout(q, k, v, lay, d ** -0.5)
    mask = lay.to_dense()
    check(out, masked_f64(q, k, v, mask, d ** -0.5), torch.float32)
    empty = ~mask.expand(b, hkv, sq, sk).any(-1).repeat_interleave(g, 1)
    assert empty.any() and (out[empty] == 0).all()


def test_bad_layout_raises_not_crashes():
    q, k, v = qkv(1, 2, 1, 20, 20, 16)
    lay = build_layout(sa.Dense(), batch=1, kv_heads=1, sq=20, sk=20, q_block=8, k_block=8)
    bad = lay.full_index.clone()
    bad[0, 0, -1, 0] = 99
    with pytest.raises(RuntimeError, match="full_index"):
        _kernel_module()._ext().block_sparse_fwd(q, k, v, lay.full_count, bad, lay.partial_count, lay.partial_index,
                                                 None, 20, 20, 8, 8, True, -1, 0, 0.25)
    with pytest.raises(RuntimeError, match="counts"):
        _kernel_module()._ext().block_sparse_fwd(q, k, v, lay.full_count[..., :1], lay.full_index[..., :1, :],
                                                 lay.partial_count[..., :1], lay.partial_index[..., :1, :],
                                                 None, 20, 20, 8, 8, True, -1, 0, 0.25)


# ------------------------------------------------------------------------------------- scheduler
def test_trainable_and_chosen_by_name():
    q, k, v = (x.requires_grad_() for x in qkv(1, 4, 2, 40, 40, 16))
    p = sa.plan(q, k, v, sa.SlidingWindow(8), backend="cpu")
    assert p.kernel.name == KERNEL and p.problem.phase == "training"
    out = sa.attention(q, k, v, sa.SlidingWindow(8), backend="cpu")
    assert out.requires_grad
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_supported_and_costed_for_inference():
    q, k, v = qkv(1, 8, 2, 1024, 1024, 64)
    for pattern in (sa.Dense(), sa.SlidingWindow(128), sa.TopK(4, block_size=64),
                    sa.BlockSparse(random_layout(1, 2, 1024, 1024, 64), block_size=64)):
        cpu = next(c for c in sa.plan(q, k, v, pattern).candidates if c.kernel.name == KERNEL)
        assert cpu.reasons == [] and cpu.cost is not None and cpu.cost > 0
    cpu = next(c for c in sa.plan(q, k, v, sa.WindowLinear(16), gate=torch.zeros(8)).candidates
               if c.kernel.name == KERNEL)
    assert any("WindowLinear" in r for r in cpu.reasons)


def test_failed_build_is_reported_not_fatal(tmp_path):
    """A broken source tree (or toolchain): import works, the kernel says why, the reference runs."""
    code = (
        "import torch, sparse_attn as sa\n"
        "q = torch.randn(1, 2, 30, 16); k = torch.randn(1, 1, 30, 16)\n"
        "p = sa.plan(q, k, k, sa.SlidingWindow(8))\n"
        "print(p.kernel.name)\n"
        "print(p.explain())\n"
        "out = sa.attention(q, k, k, sa.SlidingWindow(8))\n"
        "assert out.shape == (1, 2, 30, 16)\n"
        "try:\n"
        "    sa.attention(q, k, k, sa.SlidingWindow(8), backend='cpu')\n"
        "except ValueError as e:\n"
        "    print('refused:', 'unavailable' in str(e))\n"
    )
    env = dict(os.environ, SPARSE_ATTN_CSRC=str(tmp_path / "no-such-csrc"), SPARSE_ATTN_CACHE=str(tmp_path / "cache"))
    env.pop("SPARSE_ATTN_DISABLE_JIT", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    first, rest = res.stdout.split("\n", 1)
    assert first.startswith("reference.")
    assert "C++ extension 'cpu' unavailable" in rest and "missing source" in rest
    assert "refused: True" in rest


# -------------------------------------------------------------------------------------- backward
BWD_CONFIGS = [  # kind, B, Hq, Hkv, Sq, Sk, D, Dv
    ("dense", 1, 4, 4, 37, 37, 64, 64),
    ("dense", 2, 8, 4, 29, 71, 80, 80),  # Sq < Sk
    ("dense", 1, 8, 1, 150, 150, 128, 128),  # several query tiles and key blocks
    ("dense_full", 1, 4, 1, 20, 50, 64, 32),
    ("dense_full", 1, 2, 1, 30, 10, 33, 17),  # Sq > Sk without a causal rule; odd head dims
    ("window", 1, 4, 1, 71, 71, 128, 128),
    ("window_sinks", 1, 4, 2, 130, 130, 64, 64),
    ("window_sinks", 2, 8, 1, 9, 71, 80, 80),
    ("blocksparse", 2, 4, 2, 37, 37, 80, 80),
    ("blocksparse_bcast", 1, 8, 1, 71, 71, 128, 128),
    ("blocksparse_big_blocks", 1, 4, 2, 250, 250, 64, 80),
    ("topk", 1, 8, 1, 71, 71, 64, 64),
    ("topk", 1, 8, 2, 200, 200, 128, 128),
    ("topk", 1, 2, 1, 20, 71, 80, 80),
    ("topk_wide", 1, 4, 1, 33, 71, 80, 80),
]


#: the backward's schedules (block_sparse_backward_layout's `mode`); auto picks one of them
BWD_MODES = [pytest.param(1, id="two_pass"), pytest.param(2, id="fused")]


def force_backward_mode(monkeypatch, mode):
    """Make the kernel's backward (CpuBlockSparse.backward) run schedule `mode` in this test."""
    import functools
    km = _kernel_module()
    monkeypatch.setattr(km, "block_sparse_backward_layout",
                        functools.partial(km.block_sparse_backward_layout, mode=mode))


@pytest.mark.parametrize("mode", BWD_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,b,hq,hkv,sq,sk,d,dv", BWD_CONFIGS,
                         ids=[f"{c[0]}-gqa{c[2] // c[3]}-sq{c[4]}-sk{c[5]}-d{c[6]}" for c in BWD_CONFIGS])
def test_backward_against_float64_oracle(kind, b, hq, hkv, sq, sk, d, dv, dtype, mode, monkeypatch):
    """out, dq, dk, dv of the C++ kernel vs the float64 oracle (bounds of the contract; float16 /
    bfloat16 also at most twice the error of the masked evaluation in that dtype), for each of
    the backward's schedules (two-pass, fused)."""
    import oracle
    from conftest import check_against_oracle, make_qkv_for

    force_backward_mode(monkeypatch, mode)
    pattern = make_pattern(kind, b, hkv, sq, sk)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, dv, dtype=dtype, requires_grad=True)

    def run(q, k, v):
        return run_cpu(q, k, v, pattern)

    def ref(q, k, v):
        return oracle.oracle_attention(q, k, v, pattern)

    def base(q, k, v):
        return oracle.masked_attention_in_dtype(q, k, v, pattern)

    check_against_oracle(run, ref, base, dict(q=q, k=k, v=v), dtype=dtype)


@pytest.mark.parametrize("mode", BWD_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern,q_block,k_block", [
    (sa.Dense(), 32, 48),
    (sa.Dense(), 7, 5),
    (sa.SlidingWindow(40, sinks=5), 16, 40),
], ids=["dense-32x48", "dense-7x5", "window-sinks-16x40"])
def test_backward_built_layouts_any_tiling(pattern, q_block, k_block, dtype, mode):
    """dq, dk, dv over built layouts with q_block != k_block, odd key blocks (bfloat16 pairs with
    a missing half) and Sq < Sk, for each schedule, against float64 autograd of the masked
    evaluation (bfloat16 / float16: also at most twice that evaluation's error in the dtype)."""
    km = _kernel_module()
    b, hq, hkv, sq, sk, d = 2, 4, 2, 90, 131, 80
    q, k, v = qkv(b, hq, hkv, sq, sk, d, dtype=dtype)
    go = torch.randn(b, hq, sq, d).to(dtype)
    lay = build_layout(pattern, batch=b, kv_heads=hkv, sq=sq, sk=sk, q_block=q_block, k_block=k_block)
    out, lse = km.block_sparse_forward_layout(q, k, v, lay, scale=0.125, return_lse=True)
    got = km.block_sparse_backward_layout(q, k, v, out, lse, go, lay, scale=0.125, mode=mode)
    mask = lay.to_dense()

    def grads(cast):
        xs = [cast(x).requires_grad_() for x in (q, k, v)]
        return torch.autograd.grad(masked_in_dtype(*xs, mask, 0.125), xs, cast(go))

    ref = grads(torch.Tensor.double)
    base = grads(lambda x: x.clone()) if dtype != torch.float32 else [None] * 3
    for g, r, bl in zip(got, ref, base):
        check(g, r, dtype, bl)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_schedules_agree(dtype):
    """The fused and the two-pass schedules on one random case (TopK, GQA 4, B=2, Sq < Sk, lengths
    off the blocks, non-default scale): dk and dv come from the same per-key-block code, so they
    are equal; dq is summed in another order, so it agrees to float32 rounding (bfloat16 / float16
    outputs: to a rounding of the output dtype). The fused schedule is deterministic: 2 threads
    give the same bits as 1. A bad `mode` is refused."""
    km = _kernel_module()
    b, hq, hkv, sq, sk, d = 2, 8, 2, 83, 141, 64
    pattern = sa.TopK(3, block_size=16)
    q, k, v = qkv(b, hq, hkv, sq, sk, d, dtype=dtype)
    go = torch.randn(b, hq, sq, d).to(dtype)
    lay = km.cpu_layout(q, k, pattern)
    out, lse = km.block_sparse_forward_layout(q, k, v, lay, scale=0.2, return_lse=True)

    def grads(mode):
        return km.block_sparse_backward_layout(q, k, v, out, lse, go, lay, scale=0.2, mode=mode)

    two, fused = grads(1), grads(2)
    assert torch.equal(two[1], fused[1]) and torch.equal(two[2], fused[2])
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert rel_err(fused[0], two[0]) <= tol, rel_err(fused[0], two[0])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        again = grads(2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(fused, again))
    with pytest.raises(RuntimeError, match="mode"):
        km._ext().block_sparse_bwd(q, k, v, out, lse, go, lay.full_count, lay.full_index, lay.partial_count,
                                   lay.partial_index, *lay.transpose(), lay.token_index,
                                   *lay.transpose_tokens(), sq, sk, lay.q_block, lay.k_block, True, -1, 0, 0.2, 3)
    with pytest.raises(ValueError, match="mode"):
        grads(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_backward_strided_inputs_and_scale(dtype):
    """(B, S, H, D) views read through their strides, a non-default scale, gradients of one input;
    bfloat16 also with a non-unit head-dim stride (the bf16 dot-product path's element-wise packing)."""
    b, hq, hkv, s, d = 2, 8, 2, 70, 64
    q = torch.randn(b, s, hq, d).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hkv, d).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, hkv, d).to(dtype).transpose(1, 2)
    if dtype == torch.bfloat16:  # head dim with stride 2: every other element of a wider tensor
        k = torch.randn(b, s, hkv, 2 * d).to(dtype)[..., ::2].transpose(1, 2).requires_grad_()
    pattern = sa.SlidingWindow(9, sinks=2)
    out = run_cpu(q, k, v, pattern, scale=0.3)
    go = torch.randn_like(out)
    dq, dk = torch.autograd.grad(out, [q, k], go)
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    ref = sa.attention(q64, k64, v.double(), pattern, scale=0.3, backend="reference")
    rq, rk = torch.autograd.grad(ref, [q64, k64], go.double())
    check(dq, rq, dtype)
    check(dk, rk, dtype)


def test_forward_lse():
    """lse = natural-log log-sum-exp of each row's scaled visible scores, +inf for rows with none."""
    km = _kernel_module()
    b, hq, hkv, sq, sk, d = 2, 4, 2, 45, 83, 64
    q, k, v = qkv(b, hq, hkv, sq, sk, d)
    for pattern in (sa.Dense(), sa.SlidingWindow(11, sinks=2), sa.TopK(2, block_size=16),
                    sa.BlockSparse(random_layout(b, hkv, sq, sk, 16), block_size=16)):
        lay = km.cpu_layout(q, k, pattern)
        out, lse = km.block_sparse_forward_layout(q, k, v, lay, scale=0.2, return_lse=True)
        assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
        mask = lay.to_dense().expand(b, hkv, sq, sk).repeat_interleave(hq // hkv, 1)
        s = (q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * 0.2
        ref = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
        seen = mask.any(-1)
        assert torch.equal(torch.isinf(lse), ~seen) and (lse[~seen] == float("inf")).all()
        assert torch.allclose(lse[seen].double(), ref[seen], rtol=1e-6, atol=1e-5)
        if isinstance(pattern, sa.BlockSparse):
            assert (~seen).any()


def test_topk_training_step():
    """Three SGD steps of a tiny attention layer with TopK on the C++ kernel equal the same steps
    on the float64 reference (same selection: inputs redrawn until it does not hang on rounding)."""
    from conftest import topk_margin

    bsz, s, e, hq, hkv, d = 1, 150, 48, 4, 2, 16
    pattern = sa.TopK(2, block_size=16)

    def heads(x, w, h):
        return (x @ w).view(bsz, s, h, d).transpose(1, 2)

    for _ in range(20):
        x = torch.randn(bsz, s, e)
        w0 = [torch.randn(e, hq * d) / e ** 0.5, torch.randn(e, hkv * d) / e ** 0.5,
              torch.randn(e, hkv * d) / e ** 0.5, torch.randn(hq * d, e) / (hq * d) ** 0.5]
        if topk_margin(heads(x, w0[0], hq), heads(x, w0[1], hkv), pattern) > 1e-2:
            break

    def train(backend, dtype):
        ws = [w.detach().to(dtype).clone().requires_grad_() for w in w0]
        opt = torch.optim.SGD(ws, lr=0.5)
        losses, grads = [], None
        for _ in range(3):
            xx = x.to(dtype)
            out = sa.attention(heads(xx, ws[0], hq), heads(xx, ws[1], hkv), heads(xx, ws[2], hkv), pattern,
                               backend=backend)
            loss = ((out.transpose(1, 2).reshape(bsz, s, hq * d) @ ws[3] - xx) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            grads = grads or [w.grad.clone() for w in ws]
            opt.step()
            losses.append(loss.item())
        return losses, grads, ws

    losses, grads, ws = train("cpu", torch.float32)
    ref_losses, ref_grads, ref_ws = train("reference", torch.float64)
    assert losses[-1] < losses[0]
    assert all(abs(a - r) <= 1e-5 * abs(r) for a, r in zip(losses, ref_losses)), (losses, ref_losses)
    for g, rg in zip(grads, ref_grads):
        check(g, rg, torch.float32)
    for w, rw in zip(ws, ref_ws):
        check(w.detach(), rw.detach(), torch.float32)


def test_jit_cache_key_names_the_cpu(monkeypatch, tmp_path):
    """-march=native builds land in a folder keyed by the CPU model and flags: a cache shared with
    another machine never loads a build that uses instructions this CPU lacks."""
    import torch.utils.cpp_extension as cpp
    from sparse_attn._build import jit

    seen = []
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.append(kw["build_directory"]))
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
    args = ("cpu", ["cpu/block_sparse_fwd.cpp"], ["-fopenmp"], [], ["cpu/vec.h"], False)
    for sig in ("x86_64|A|avx2", "x86_64|B|avx2 avx512f avx512_bf16", "x86_64|A|avx2"):
        monkeypatch.setattr(jit, "cpu_signature", lambda s=sig: s)
        jit._jit(args[0], args[1], args[2] + ["-march=native"], *args[3:])
        jit._jit(*args)  # no -march=native: portable, one folder for every CPU
    assert seen[0] != seen[2] and seen[0] == seen[4]
    assert seen[1] == seen[3] == seen[5] and seen[1] not in (seen[0], seen[2])
    monkeypatch.undo()
    import platform
    assert jit.cpu_signature().startswith(platform.machine() + "|")


def _cpu_flags() -> set[str]:
    from conftest import cpu_flags
    return cpu_flags()


def test_bf16_dot_path_follows_the_cpu():
    """The JIT build (-march=native) uses vdpbf16ps products for bfloat16 exactly where the CPU has
    AVX-512 BF16, so the bfloat16 tests above run that path on such machines (CI's included)."""
    ext = _kernel_module()._ext()
    flags = _cpu_flags()
    if not flags or ext.__name__.startswith("sparse_attn._ext_"):
        pytest.skip("no /proc/cpuinfo, or an ahead-of-time build (no -march=native)")
    assert bool(ext.bf16_dot) == ({"avx512_bf16", "avx512bw"} <= flags)
    assert ext.vector_width == (16 if "avx512f" in flags else 8 if "avx" in flags else 4)


SELECT_CASES = [  # B, Hq, Hkv, Sq, Sk, D, TopK(topk, block_size, sink_blocks, local_blocks)
    (1, 4, 2, 100, 100, 64, (3, 8, 1, 1)),
    (2, 8, 2, 37, 300, 64, (5, 16, 2, 3)),  # Sq < Sk
    (1, 4, 1, 1, 1000, 128, (16, 64, 1, 1)),  # a decode row
    (1, 2, 2, 513, 513, 80, (40, 4, 0, 1)),  # topk > 16 (the generic running minimum), no sinks
    (1, 3, 3, 70, 70, 33, (2, 16, 1, 2)),  # odd head dim
    (1, 4, 2, 20, 20, 64, (8, 64, 1, 1)),  # shorter than the forced blocks: nothing to select
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,tk", SELECT_CASES)
def test_topk_selection_in_cpp_equals_the_pytorch_selection(b, hq, hkv, sq, sk, d, tk, dtype):
    """csrc/cpu/topk_select.cpp picks the same blocks, in the same order and padding, as the
    contract's PyTorch selection (layout/topk_selection.py), from a strided q too."""
    from sparse_attn.backends.cpu.kernels import topk_select

    pattern = sa.TopK(tk[0], block_size=tk[1], sink_blocks=tk[2], local_blocks=tk[3])
    q = torch.randn(b, sq, hq, d).to(dtype).transpose(1, 2)  # (B, Hq, Sq, D) view, strided
    k = torch.randn(b, hkv, sk, d).to(dtype)
    want = topk_token_index(q, k, pattern)
    got = topk_select(q, k, pattern)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want)


def test_dense_float32_small_heads_key_block():
    """A Dense float32 forward at D <= 64 runs 128-key blocks (kernels.K_BLOCK_SMALL_F32: less
    per-block work per score) from K_BLOCK_SMALL_F32_MIN_KEYS keys on, 64-key blocks below; bfloat16
    (without AMX tiles: K_BLOCK_AMX with them), D = 128 and training keep K_BLOCK. Exact either way:
    lengths that are no multiple of either block, Sq < Sk, GQA."""
    import oracle
    from sparse_attn.backends.cpu.kernels import (K_BLOCK, K_BLOCK_AMX, K_BLOCK_SMALL_F32,
                                                  K_BLOCK_SMALL_F32_MIN_KEYS, amx_forward)
    torch.manual_seed(0)
    for sk, want in [(K_BLOCK_SMALL_F32_MIN_KEYS + 77, K_BLOCK_SMALL_F32), (K_BLOCK_SMALL_F32_MIN_KEYS - 1, K_BLOCK)]:
        q, k, v = torch.randn(1, 4, 300, 64), torch.randn(1, 2, sk, 64), torch.randn(1, 2, sk, 64)
        p = sa.plan(q, k, v, sa.Dense(), backend="cpu")
        assert p.kernel.name == KERNEL, p.explain()
        assert p.kernel.prepare(q, k, p.problem).k_block == want
        ref = sa.attention(q.double(), k.double(), v.double(), sa.Dense(), backend="reference")
        oracle.assert_close_contract(p.run(q, k, v), ref, dtype=torch.float32, device="cpu")
    assert K_BLOCK_SMALL_F32 != K_BLOCK
    q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, K_BLOCK_SMALL_F32_MIN_KEYS + 77, 64)
    for qq, kk in [(q.bfloat16(), k.bfloat16()), (torch.randn(1, 4, 300, 128), torch.randn(1, 2, 777, 128)),
                   (q.clone().requires_grad_(), k)]:
        pp = sa.plan(qq, kk, kk, sa.Dense(), backend="cpu")
        assert pp.kernel.name == KERNEL, pp.explain()
        bf16_amx = qq.dtype == torch.bfloat16 and amx_forward()
        assert pp.kernel.prepare(qq, kk, pp.problem).k_block == (K_BLOCK_AMX if bf16_amx else K_BLOCK)


@pytest.mark.parametrize("sq,sk,bs,tk", [(300, 300, 4, 16), (600, 2400, 4, 16), (90, 2400, 4, 40)],
                         ids=["short_rows", "rows_across_512", "topk_40"])
def test_topk_select_ties_and_signed_zeros(sq, sk, bs, tk):
    """The C++ selection's rule on scores with many exact ties (small integers: exact in any summation
    order), -0 against +0 and a NaN block: the `topk` highest scores, ties to the lower block, NaN
    first, ascending. Rows short and long (csrc/cpu/topk_select.cpp picks short rows by a bitwise
    threshold search, long ones by a running top-k)."""
    from sparse_attn.backends.cpu.kernels import _ext
    g = torch.Generator().manual_seed(1)
    d, nb, w = 8, -(-sk // bs), _ext().vector_width
    q = torch.randint(-2, 3, (1, 1, sq, d), generator=g).float()
    q[0, 0, ::7] = -torch.rand(d, generator=g).add(1)  # all-negative rows: a zero block scores -0
    kbar = torch.randint(-3, 4, (nb, d), generator=g).float()
    kbar[5] = 0.0
    kbar[nb // 2] = float("nan")
    kbar_t = torch.zeros(1, 1, d, -(-nb // w) * w)
    kbar_t[0, 0, :, :nb] = kbar.t()
    sinks, local = 1, 1
    got = _ext().topk_select(q, kbar_t, 1, sk, nb, bs, tk, sinks, local)
    scores = (q[0, 0] @ kbar.t()).nan_to_num(nan=float("inf"))
    for t in range(sq):
        hi = min(nb - 1, (sk - sq + t) // bs - local)
        cand = torch.arange(sinks, max(sinks, hi + 1))
        row = got[0, 0, t]
        if len(cand) <= tk:
            want = cand
        else:
            order = torch.sort(-scores[t, cand], stable=True).indices[:tk]  # ties: the lower block first
            want = torch.sort(cand[order]).values
        assert torch.equal(row[:len(want)], want.int()) and (row[len(want):] == -1).all(), t
