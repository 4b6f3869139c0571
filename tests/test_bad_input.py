"""Bad input raises ValueError / TypeError naming the argument (contract, "Bad input"); empty input
returns empty output of the right shape."""
import pytest
import torch

import sparse_attn as sa
from conftest import make_qkv

ERR = (ValueError, TypeError)


def qkv(b=2, hq=4, hkv=2, sq=5, sk=37, d=64, dv=None, dtype=torch.float32):
    return make_qkv(b, hq, hkv, sq, sk, d, dv, dtype=dtype)


def swap(i, x):
    """qkv() with argument i (0 = q, 1 = k, 2 = v) replaced by x."""
    t = list(qkv())
    t[i] = x
    return t


ATTENTION_CASES = [
    # (id, (q, k, v), kwargs, exception, regex naming the argument)
    ("q-3d", swap(0, torch.randn(2, 4, 64)), {}, ERR, r"\bq\b"),
    ("k-5d", swap(1, torch.randn(2, 2, 37, 64, 1)), {}, ERR, r"\bk\b"),
    ("v-2d", swap(2, torch.randn(37, 64)), {}, ERR, r"\bv\b"),
    ("batch-mismatch", swap(1, torch.randn(3, 2, 37, 64)), {}, ValueError, r"\b(k|batch|B)\b"),
    ("kv-heads-mismatch", swap(2, torch.randn(2, 1, 37, 64)), {}, ValueError, r"\b(v|head|heads|Hkv)\b"),
    ("hq-not-multiple-of-hkv", swap(0, torch.randn(2, 3, 5, 64)), {}, ValueError, r"(Hq|Hkv|head)"),
    ("kv-length-mismatch", swap(2, torch.randn(2, 2, 36, 64)), {}, ValueError, r"\b(v|Sk|length)\b"),
    ("head-dim-mismatch", swap(1, torch.randn(2, 2, 37, 32)), {}, ValueError, r"\b(k|D|head_dim|head dim)\b"),
    ("mixed-dtypes", swap(1, torch.randn(2, 2, 37, 64, dtype=torch.float16)), {}, ERR, r"dtype"),
    ("integer-dtype", [x.to(torch.int32) for x in qkv()], {}, ERR, r"\bq\b"),
    ("bool-dtype", [x > 0 for x in qkv()], {}, ERR, r"\bq\b"),
    ("q-not-a-tensor", swap(0, [[1.0]]), {}, TypeError, r"\bq\b"),
    ("v-numpy", swap(2, torch.randn(2, 2, 37, 64).numpy()), {}, TypeError, r"\bv\b"),
    ("k-on-meta-device", swap(1, torch.empty(2, 2, 37, 64, device="meta")), {}, ERR, r"device"),
    ("unknown-backend", qkv(), dict(backend="tpu"), ValueError, r"backend"),
    ("backend-not-a-string", qkv(), dict(backend=3), ERR, r"backend"),
    ("cuda-backend-on-cpu-tensors", qkv(), dict(backend="cuda"), ValueError, r"(cuda|device)"),
    ("scale-not-a-number", qkv(), dict(scale="big"), ERR, r"scale"),
    ("pattern-not-a-pattern", qkv(), dict(pattern="dense"), TypeError, r"pattern"),
    ("sq-gt-sk-dense-causal", qkv(sq=40, sk=37), {}, ValueError, r"(Sq|Sk|\bq\b|causal)"),
    ("sq-gt-sk-window", qkv(sq=40, sk=37), dict(pattern=sa.SlidingWindow(8)), ValueError, r"(Sq|Sk|\bq\b|causal)"),
    ("sq-gt-sk-topk", qkv(sq=40, sk=37), dict(pattern=sa.TopK(1, 16)), ValueError, r"(Sq|Sk|\bq\b|causal)"),
    ("gate-missing", qkv(), dict(pattern=sa.WindowLinear(8)), ValueError, r"gate"),
    ("gate-wrong-shape", qkv(), dict(pattern=sa.WindowLinear(8), gate=torch.zeros(2)), ValueError, r"gate"),
    ("gate-2d", qkv(), dict(pattern=sa.WindowLinear(8), gate=torch.zeros(1, 4)), ValueError, r"gate"),
    ("gate-not-a-tensor", qkv(), dict(pattern=sa.WindowLinear(8), gate=0.5), TypeError, r"gate"),
    ("layout-wrong-blocks", qkv(), dict(pattern=sa.BlockSparse(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16)),
     ValueError, r"layout"),
    ("layout-not-square", qkv(), dict(pattern=sa.BlockSparse(torch.ones(1, 1, 3, 2, dtype=torch.bool), 16)),
     ValueError, r"layout"),
    ("layout-wrong-batch", qkv(), dict(pattern=sa.BlockSparse(torch.ones(3, 1, 3, 3, dtype=torch.bool), 16)),
     ValueError, r"layout"),
    ("layout-wrong-heads", qkv(), dict(pattern=sa.BlockSparse(torch.ones(1, 4, 3, 3, dtype=torch.bool), 16)),
     ValueError, r"layout"),
]


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "ref"])
@pytest.mark.parametrize("tensors,kwargs,exc,match", [c[1:] for c in ATTENTION_CASES],
                         ids=[c[0] for c in ATTENTION_CASES])
def test_attention_rejects(tensors, kwargs, exc, match, backend):
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend)
    pattern = kwargs.pop("pattern", sa.Dense())
    with pytest.raises(exc, match=match):
        sa.attention(*tensors, pattern, **kwargs)


def test_triton_backend_on_cpu_tensors_without_interpreter(monkeypatch):
    """CPU tensors reach Triton kernels only in its interpreter (TRITON_INTERPRET=1, which the test
    suite sets on machines without a GPU); without it, backend="triton" names why it cannot run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"(triton|device)"):
        sa.attention(*qkv(), sa.Dense(), backend="triton")


PATTERN_CASES = [
    ("window-0", lambda: sa.SlidingWindow(0), ValueError, r"window"),
    ("window-negative", lambda: sa.SlidingWindow(-3), ValueError, r"window"),
    ("window-float", lambda: sa.SlidingWindow(2.5), TypeError, r"window"),
    ("sinks-negative", lambda: sa.SlidingWindow(4, sinks=-1), ValueError, r"sinks"),
    ("topk-negative", lambda: sa.TopK(-1), ValueError, r"topk"),
    ("topk-block-size-0", lambda: sa.TopK(2, block_size=0), ValueError, r"block_size"),
    ("topk-local-blocks-0", lambda: sa.TopK(2, local_blocks=0), ValueError, r"local_blocks"),
    ("topk-sink-blocks-negative", lambda: sa.TopK(2, sink_blocks=-1), ValueError, r"sink_blocks"),
    ("blocksparse-block-size-0", lambda: sa.BlockSparse(torch.ones(1, 1, 1, 1, dtype=torch.bool), 0),
     ValueError, r"block_size"),
    ("blocksparse-int-layout", lambda: sa.BlockSparse(torch.ones(1, 1, 2, 2, dtype=torch.int64), 16),
     TypeError, r"layout"),
    ("blocksparse-float-layout", lambda: sa.BlockSparse(torch.ones(1, 1, 2, 2), 16), TypeError, r"layout"),
    ("blocksparse-3d-layout", lambda: sa.BlockSparse(torch.ones(1, 2, 2, dtype=torch.bool), 16),
     ValueError, r"layout"),
    ("blocksparse-list-layout", lambda: sa.BlockSparse([[True]], 16), TypeError, r"layout"),
    ("window-linear-window-0", lambda: sa.WindowLinear(0), ValueError, r"window"),
    ("dense-causal-not-bool", lambda: sa.Dense(causal="yes"), TypeError, r"causal"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in PATTERN_CASES], ids=[c[0] for c in PATTERN_CASES])
def test_bad_pattern_fields(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_select_blocks_rejects():
    q, k, _ = qkv()
    with pytest.raises(TypeError, match="pattern"):
        sa.select_blocks(q, k, sa.Dense())
    with pytest.raises(ValueError, match=r"(Hq|Hkv|head)"):
        sa.select_blocks(torch.randn(2, 3, 5, 64), k, sa.TopK(1, 16))
    with pytest.raises(ERR, match=r"\bk\b"):
        sa.select_blocks(q, torch.randn(2, 37, 64), sa.TopK(1, 16))


def linear_inputs(b=2, h=3, s=20, d=16):
    return [torch.randn(b, h, s, d) for _ in range(3)]


LINEAR_CASES = [
    ("decay-wrong-heads", dict(decay=torch.zeros(4)), r"decay"),
    ("decay-wrong-length", dict(decay=torch.zeros(2, 3, 19)), r"decay"),
    ("decay-2d", dict(decay=torch.zeros(2, 3)), r"decay"),
    ("decay-integer", dict(decay=torch.zeros(3, dtype=torch.int64)), r"decay"),
    ("state-wrong-shape", dict(initial_state=torch.zeros(2, 3, 16, 8)), r"initial_state"),
    ("state-3d", dict(initial_state=torch.zeros(3, 16, 16)), r"initial_state"),
    ("unknown-backend", dict(backend="gpu"), r"backend"),
]


@pytest.mark.parametrize("kwargs,match", [c[1:] for c in LINEAR_CASES], ids=[c[0] for c in LINEAR_CASES])
def test_linear_attention_rejects(kwargs, match):
    with pytest.raises(ERR, match=match):
        sa.linear_attention(*linear_inputs(), **kwargs)


def test_linear_attention_rejects_bad_tensors():
    q, k, v = linear_inputs()
    with pytest.raises(ERR, match=r"\bq\b"):
        sa.linear_attention(q[0], k, v)
    with pytest.raises(ERR, match=r"\b(k|length|S)\b"):
        sa.linear_attention(q, k[:, :, :19], v)
    with pytest.raises(ERR, match=r"dtype"):
        sa.linear_attention(q, k.double(), v)
    with pytest.raises(ERR, match=r"\bq\b"):
        sa.linear_attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match=r"\bv\b"):
        sa.linear_attention(q, k, "v")


def packed(tq=12, tk=30, hq=4, hkv=2, d=32):
    return torch.randn(tq, hq, d), torch.randn(tk, hkv, d), torch.randn(tk, hkv, d)


def cu(*offsets, dtype=torch.int32):
    """cu_seqlens from the end offsets of the sequences: cu(5, 12) is [0, 5, 12]."""
    return torch.tensor([0, *offsets], dtype=dtype)


VARLEN_CASES = [
    ("cu-q-int64", lambda: (*packed(), cu(5, 12, dtype=torch.int64), cu(10, 30)), r"cu_seqlens_q"),
    ("cu-k-float", lambda: (*packed(), cu(5, 12), cu(10, 30, dtype=torch.float32)), r"cu_seqlens_k"),
    ("cu-q-total-mismatch", lambda: (*packed(), cu(5, 11), cu(10, 30)), r"cu_seqlens_q"),
    ("cu-k-total-mismatch", lambda: (*packed(), cu(5, 12), cu(10, 31)), r"cu_seqlens_k"),
    ("cu-count-mismatch", lambda: (*packed(), cu(5, 12), cu(10, 20, 30)), r"cu_seqlens"),
    ("cu-decreasing", lambda: (*packed(), cu(8, 5, 12), cu(10, 20, 30)),
     r"cu_seqlens_q"),
    ("q-4d", lambda: (torch.randn(1, 12, 4, 32), *packed()[1:], cu(5, 12), cu(10, 30)), r"\bq\b"),
    ("causal-sq-gt-sk", lambda: (*packed(), cu(11, 12), cu(10, 30)), r"(Sq|Sk|seq|causal|\bq\b)"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in VARLEN_CASES], ids=[c[0] for c in VARLEN_CASES])
def test_attention_varlen_rejects(make, match):
    with pytest.raises(ERR, match=match):
        sa.attention_varlen(*make())


# ---------------------------------------------------------------------------------------------
# empty inputs
# ---------------------------------------------------------------------------------------------
EMPTY_PATTERNS = {
    "dense": lambda sk: sa.Dense(),
    "dense_full": lambda sk: sa.Dense(causal=False),
    "window": lambda sk: sa.SlidingWindow(8, sinks=1),
    "blocksparse": lambda sk: sa.BlockSparse(torch.ones(1, 1, -(-sk // 16), -(-sk // 16), dtype=torch.bool), 16),
    "topk": lambda sk: sa.TopK(1, 16),
    "window_linear": lambda sk: sa.WindowLinear(8),
}


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "ref"])
@pytest.mark.parametrize("b,sq,sk", [(2, 0, 37), (0, 5, 37), (0, 0, 0)], ids=["sq0", "b0", "b0-sq0-sk0"])
@pytest.mark.parametrize("name", EMPTY_PATTERNS)
def test_empty_attention(name, b, sq, sk, backend):
    q, k, v = qkv(b=b, sq=sq, sk=sk, dv=48)
    gate = torch.zeros(4) if name == "window_linear" else None
    out = sa.attention(q, k, v, EMPTY_PATTERNS[name](sk), gate=gate, backend=backend)
    assert out.shape == (b, 4, sq, 48) and out.dtype == torch.float32


def test_empty_select_blocks_and_linear_and_varlen():
    q, k, _ = qkv(sq=0)
    assert sa.select_blocks(q, k, sa.TopK(1, 16)).shape == (2, 2, 0, 3)
    q, k, v = (torch.randn(2, 3, 0, 16) for _ in range(3))
    o, st = sa.linear_attention(q, k, v, return_state=True)
    assert o.shape == (2, 3, 0, 16) and st.shape == (2, 3, 16, 16) and (st == 0).all()
    q, k, v = (torch.randn(0, 3, 5, 16) for _ in range(3))
    assert sa.linear_attention(q, k, v).shape == (0, 3, 5, 16)
    q, k, v = packed(tq=0, tk=0)
    out = sa.attention_varlen(q, k, v, cu(0, 0), cu(0, 0))
    assert out.shape == (0, 4, 32)
