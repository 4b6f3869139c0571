"""InfLLMv2 (contract, "InfLLMv2 semantics"): the pattern, its selection and its attention, against
the float64 step-by-step evaluation of tests/infllmv2_oracle.py. Small block and kernel sizes so
that short sequences exercise every part of the rule (init blocks, window, picks, the switch)."""
import math

import pytest
import torch

import infllmv2_oracle as O
import oracle
import sparse_attn as sa
from conftest import make_qkv, needs_jit

# (ks = 2 * stride as the models; ks != 2 * stride; pool ratio 2) x both variants x both normalisers
CONFIGS = {
    "41-coarse": sa.InfLLMv2(topk=6, block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1,
                             local_blocks=2, dense_len=-1),
    "41-exact": sa.InfLLMv2(topk=5, block_size=16, kernel_size=8, kernel_stride=4, init_blocks=2,
                            local_blocks=1, dense_len=-1, normalizer="exact"),
    "4-exact": sa.InfLLMv2(topk=3, block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1,
                           local_blocks=2, dense_len=-1, variant="minicpm4"),
    "4-coarse-ks12": sa.InfLLMv2(topk=4, block_size=16, kernel_size=12, kernel_stride=8, init_blocks=1,
                                 local_blocks=1, dense_len=-1, variant="minicpm4", normalizer="coarse"),
    "41-coarse-bs8-local0": sa.InfLLMv2(topk=5, block_size=8, kernel_size=4, kernel_stride=2, init_blocks=1,
                                        local_blocks=0, dense_len=-1),
}
SHAPES = [  # (B, Hq, Hkv, Sq, Sk): odd lengths, Sq < Sk, GQA 1 .. 16
    (1, 2, 1, 101, 101),
    (2, 4, 2, 23, 133),
    (1, 16, 1, 9, 141),
    (1, 8, 8, 5, 170),
]


def shape_id(s):
    return "b{}-hq{}-hkv{}-sq{}-sk{}".format(*s)


#: every config and every shape at least once (the oracle is slow: a few cases, not the product)
CASES = [pytest.param(name, SHAPES[i % len(SHAPES)], id=f"{name}-{shape_id(SHAPES[i % len(SHAPES)])}")
         for i, name in enumerate(CONFIGS)] + [pytest.param("41-coarse", SHAPES[2], id="41-coarse-gqa16")]


def draw(pattern, shape, d, *, dtype=torch.float32, min_margin=1e-5, requires_grad=False):
    """Inputs whose selection is not decided by rounding (deterministic redraws)."""
    b, hq, hkv, sq, sk = shape
    for _ in range(60):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, requires_grad=requires_grad)
        if O.margin(q.detach(), k.detach(), pattern) > min_margin:
            return q, k, v
    raise RuntimeError("could not draw a well-separated InfLLMv2 input")


def full_selection(index, pattern, sq, sk):
    """Forced blocks plus the picks, bool `(B, Hkv, Sq, nb)`, as select_blocks returns them."""
    from sparse_attn.layout.block_layout import index_to_bool
    nb = -(-sk // pattern.block_size)
    pos = torch.arange(sk - sq, sk)[None]
    return pattern.candidate_blocks(pos, nb, pattern.block_size, selected=index_to_bool(index, nb))


def check_selection(select, i, name, *, device="cpu"):
    """A fast selection `select(q, k, pattern)` (picks, int32 `(B, Hkv, Sq, topk)`) on config `name`
    and the `i`-th shape (cycled): index for index the PyTorch selection's, and with the forced blocks
    the float64 oracle's."""
    from sparse_attn.layout.infllmv2_selection import infllmv2_token_index
    pattern = CONFIGS[name]
    shape = SHAPES[i % len(SHAPES)]
    q, k, _ = draw(pattern, shape, 32, min_margin=1e-5)
    p = pattern.clamped(shape[4])
    got = select(q.to(device), k.to(device), p).cpu()
    assert torch.equal(got, infllmv2_token_index(q, k, p))
    sel = full_selection(got, p, shape[3], shape[4]).expand(shape[0], shape[2], -1, -1)
    assert torch.equal(sel, O.select_blocks(q, k, pattern))


# ------------------------------------------------------------------------------------ the pattern
def test_defaults_follow_the_variant():
    p = sa.InfLLMv2()
    assert (p.topk, p.normalizer, p.block_size, p.kernel_size, p.kernel_stride, p.init_blocks, p.local_blocks,
            p.dense_len) == (96, "coarse", 64, 32, 16, 1, 32, 8192)
    assert p == sa.InfLLMv2(topk=96, normalizer="coarse")
    p4 = sa.InfLLMv2(variant="minicpm4")
    assert (p4.topk, p4.normalizer) == (64, "exact")


@pytest.mark.parametrize("kw, exc, word", [
    (dict(variant="minicpm5"), ValueError, "variant"),
    (dict(normalizer="softmax"), ValueError, "normalizer"),
    (dict(topk=-1), ValueError, "topk"),
    (dict(topk=2.0), TypeError, "topk"),
    (dict(block_size=48, kernel_stride=32), ValueError, "block_size"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(dense_len=-2), ValueError, "dense_len"),
    (dict(local_blocks=0, variant="minicpm4"), ValueError, "local_blocks"),
    (dict(init_blocks=True), TypeError, "init_blocks"),
])
def test_bad_parameters_name_the_argument(kw, exc, word):
    with pytest.raises(exc, match=word):
        sa.InfLLMv2(**kw)


# ------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("name, shape", CASES)
def test_select_blocks_equals_oracle(name, shape):
    pattern = CONFIGS[name]
    q, k, _ = draw(pattern, shape, 32, dtype=torch.float64, min_margin=1e-9)
    sel = sa.select_blocks(q, k, pattern)
    ref = O.select_blocks(q, k, pattern)
    assert sel.shape == ref.shape == (shape[0], shape[2], shape[3], math.ceil(shape[4] / pattern.block_size))
    diff = (sel != ref).nonzero()
    assert diff.numel() == 0, f"{len(diff)} entries differ, first (b, hkv, t, block): {diff[:5].tolist()}"
    # the rule really picks: some row has fewer blocks than its causal ones
    assert (sel.sum(-1) < (torch.arange(shape[4] - shape[3], shape[4]) // pattern.block_size + 1)).any()


@pytest.mark.parametrize("dense_len, sparse", [(134, True), (135, False), (-1, True)])
def test_dense_len_switch_follows_the_total_key_length(dense_len, sparse):
    pattern = sa.InfLLMv2(topk=3, block_size=16, kernel_size=8, kernel_stride=4, local_blocks=1, dense_len=dense_len)
    shape = (1, 4, 2, 9, 134)
    q, k, v = draw(pattern, shape, 32, dtype=torch.float64, min_margin=1e-9)
    sel = sa.select_blocks(q, k, pattern)
    assert torch.equal(sel, O.select_blocks(q, k, pattern))
    causal = torch.arange(shape[4] - shape[3], shape[4]) // 16 + 1
    assert (sel.sum(-1) < causal).any() == sparse
    out = sa.attention(q, k, v, pattern, backend="reference")
    torch.testing.assert_close(out, O.attention(q, k, v, pattern), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit)])
@pytest.mark.parametrize("name, shape", [("41-coarse", SHAPES[1]), ("4-exact", SHAPES[2]),
                                         ("41-coarse-bs8-local0", SHAPES[3])], ids=["41", "4-gqa16", "41-bs8"])
def test_attention_equals_oracle(name, shape, backend):
    pattern = CONFIGS[name]
    q, k, v = draw(pattern, shape, 64, min_margin=1e-5)
    out = sa.attention(q, k, v, pattern, backend=backend)
    oracle.assert_close_contract(out, O.attention(q, k, v, pattern), dtype=q.dtype, device="cpu")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit)])
def test_attention_bfloat16(backend):
    pattern = CONFIGS["41-exact"]
    shape = (1, 8, 2, 16, 157)
    q, k, v = draw(pattern, shape, 128, dtype=torch.bfloat16, min_margin=1e-3)
    out = sa.attention(q, k, v, pattern, backend=backend)
    mask = O.visibility_mask(q.double(), k.double(), pattern)
    base = oracle._masked_softmax_attention(q, k, v, mask, 128 ** -0.5)
    oracle.assert_close_contract(out, O.attention(q, k, v, pattern, mask=mask), dtype=q.dtype, device="cpu",
                                 lowp_baseline=base)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit)])
@pytest.mark.parametrize("name", ["41-coarse", "4-coarse-ks12"])
def test_gradients_equal_oracle(name, backend):
    pattern = CONFIGS[name]
    q, k, v = draw(pattern, (1, 4, 2, 33, 117), 64, min_margin=1e-5, requires_grad=True)
    dout = torch.randn(1, 4, 33, 64)
    out = sa.attention(q, k, v, pattern, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = O.attention(q64, k64, v64, pattern)
    refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name_, g, r in zip("qkv", grads, refs):
        oracle.assert_close_contract(g, r, dtype=torch.float32, device="cpu", what=f"d{name_}")


@needs_jit
def test_decode_equals_the_prefill_row():
    pattern = CONFIGS["41-coarse"]
    q, k, v = draw(pattern, (1, 8, 2, 131, 131), 32, min_margin=1e-5)
    full = sa.attention(q, k, v, pattern, backend="reference")
    for t in [0, 16, 47, 100, 130]:
        step = sa.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], pattern, backend="cpu")
        torch.testing.assert_close(step[:, :, 0], full[:, :, t], rtol=1e-5, atol=1e-5)


def test_varlen_module_and_scheduler():
    pattern = CONFIGS["4-exact"]
    lens = [40, 1, 100]
    qs, ks, vs = zip(*(draw(pattern, (1, 4, 2, n, n), 32, min_margin=1e-5) for n in lens))
    packed = [torch.cat([x[0].transpose(0, 1) for x in xs]) for xs in (qs, ks, vs)]
    cu = torch.tensor([0, 40, 41, 141], dtype=torch.int32)
    out = sa.attention_varlen(*packed, cu, cu, pattern)
    for i, n in enumerate(lens):
        ref = O.attention(qs[i], ks[i], vs[i], pattern)[0].transpose(0, 1)
        oracle.assert_close_contract(out[cu[i]:cu[i + 1]], ref, dtype=torch.float32, device="cpu")
    mod = sa.SparseAttention(pattern)
    torch.testing.assert_close(mod(qs[2], ks[2], vs[2]), sa.attention(qs[2], ks[2], vs[2], pattern))
    text = sa.plan(qs[2], ks[2], vs[2], pattern).explain()
    assert "InfLLMv2" in text
    # below dense_len the call is dense causal: the plan says so
    short = sa.InfLLMv2(dense_len=8192)
    assert "Dense" in sa.plan(qs[2], ks[2], vs[2], short).problem.pattern.describe()


def test_transformers_registration_accepts_it():
    pytest.importorskip("transformers")
    from sparse_attn.integrations.transformers import register_transformers

    assert register_transformers("sparse_attn_infllmv2_test", sa.InfLLMv2()) == "sparse_attn_infllmv2_test"


def test_custom_op_encoding_round_trips():
    """torch.compile passes patterns to the custom ops as ints: InfLLMv2's strings travel as indices."""
    from sparse_attn.api.ops import decode_pattern, encode_pattern

    for p in list(CONFIGS.values()) + [sa.InfLLMv2(), sa.InfLLMv2(variant="minicpm4", normalizer="coarse")]:
        assert decode_pattern(*encode_pattern(p)) == p


def test_huge_parameters_mean_the_sequence():
    """Contract: integers beyond the sequence behave as its length would; nothing sized by them."""
    q, k, v = make_qkv(1, 4, 2, 30, 90, 32)
    every = sa.InfLLMv2(topk=2**40, block_size=16, kernel_size=8, kernel_stride=4, dense_len=-1)
    torch.testing.assert_close(sa.attention(q, k, v, every, backend="reference"),
                               sa.attention(q, k, v, sa.Dense(), backend="reference"))
    assert isinstance(sa.InfLLMv2(dense_len=2**62).clamped(90), sa.Dense)
    sel = sa.select_blocks(q, k, sa.InfLLMv2(local_blocks=2**50, block_size=16, kernel_stride=4, dense_len=-1))
    assert sel.all(dim=-1)[..., -1].all()  # the window covers every causal block
