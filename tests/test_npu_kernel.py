"""The `npu` backend (torch_npu's `npu_fusion_attention`), which no NPU has run yet.

Without an NPU, what can be checked is our side of the call: the sparse modes, band widths, mask
and lse we derive from each pattern. A stand-in `torch_npu` module implements the documented
semantics of `npu_fusion_attention` (sparse_mode 0: no mask; 3: causal ending at the bottom-right
corner; 4: band of `pre_tockens` before and `next_tockens` after that diagonal; outputs
`softmax_max`/`softmax_sum` as `(B, N, Sq, 8)`) in plain PyTorch; the kernel's output and lse
through it must equal the float64 oracle. On a machine with torch_npu and an NPU the real op runs
instead (test_real_npu)."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import randn
from sparse_attn.backends.npu import fusion_attention as fa
from sparse_attn.backends.npu.fusion_attention import NpuFusionAttention
from sparse_attn.scheduler.problem import make_problem


def _documented_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                                 atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                                 next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
    assert input_layout == "BNSD" and head_num == query.shape[1] and keep_prob == 1.0
    b, n, sq, d = query.shape
    sk = key.shape[2]
    g = n // key.shape[1]
    k = key.double().repeat_interleave(g, 1)
    v = value.double().repeat_interleave(g, 1)
    s = torch.matmul(query.double(), k.transpose(-1, -2)) * scale
    diag = (torch.arange(sq)[:, None] + sk - sq)  # the bottom-right-aligned diagonal
    j = torch.arange(sk)[None, :]
    if sparse_mode == 0:
        assert atten_mask is None
        hidden = torch.zeros(sq, sk, dtype=torch.bool)
    elif sparse_mode == 3:
        assert atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048) and atten_mask.dtype == torch.bool
        hidden = j > diag
    elif sparse_mode == 4:
        assert atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048)
        hidden = (diag - j > pre_tockens) | (j - diag > next_tockens)
    else:
        raise AssertionError(f"sparse_mode {sparse_mode} not expected")
    s = s.masked_fill(hidden, float("-inf"))
    smax = s.amax(-1, keepdim=True)
    ssum = torch.exp(s - smax).sum(-1, keepdim=True)
    out = torch.matmul(torch.exp(s - smax) / ssum, v).to(query.dtype)
    return (out, smax.float().expand(b, n, sq, 8), ssum.float().expand(b, n, sq, 8), query.new_empty(0), 0, 0, 0)


@pytest.fixture
def fake_torch_npu(monkeypatch):
    mod = types.ModuleType("torch_npu")
    mod.npu_fusion_attention = _documented_fusion_attention
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    yield mod


@pytest.mark.parametrize("pattern,sq", [(sa.Dense(), 37), (sa.Dense(), 5), (sa.Dense(), 1),
                                        (sa.Dense(causal=False), 9), (sa.SlidingWindow(13), 37)],
                         ids=["causal", "causal-chunk", "decode", "full", "window"])
@pytest.mark.parametrize("gqa", [1, 4])
def test_mapping_matches_oracle(fake_torch_npu, pattern, sq, gqa):
    hkv, sk, d = 2, 37, 64
    q, k, v = randn(2, hkv * gqa, sq, d), randn(2, hkv, sk, d), randn(2, hkv, sk, d)
    out, lse = fa.npu_fusion_attention(q, k, v, pattern, scale=d ** -0.5)
    oracle.assert_close_contract(out, oracle.oracle_attention(q, k, v, pattern), dtype=torch.float32, device="cpu")
    mask = oracle.visibility_mask(q.double(), k.double(), pattern)  # (B|1, H|1, Sq, Sk)
    s = torch.matmul(q.double(), k.double().repeat_interleave(gqa, 1).transpose(-1, -2)) * d ** -0.5
    want = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-5)


def test_reasons():
    kern = NpuFusionAttention()
    q, k = randn(1, 4, 16, 64), randn(1, 2, 40, 64)
    why = kern.extra_reasons(make_problem(q, k, k, sa.SlidingWindow(8, sinks=2)))
    assert any("sinks" in r for r in why) and any("Sq != Sk" in r for r in why)
    q72 = randn(1, 4, 16, 72)
    assert any("multiple of 16" in r for r in kern.extra_reasons(make_problem(q72, q72, q72, sa.Dense())))
    text = sa.plan(q, k, k, sa.Dense()).explain()
    assert "npu.fusion_attention" in text and "device cpu not in ('npu',)" in text  # CPU inputs: the device
    assert "torch_npu is not usable here" in kern.unavailable()  # and why it could not run in this process


@pytest.mark.skipif("torch_npu" not in sys.modules and not hasattr(torch, "npu"), reason="needs torch_npu and an NPU")
def test_real_npu():
    q, k, v = (randn(1, 8, 128, 64, dtype=torch.float16).to("npu"), randn(1, 2, 128, 64, dtype=torch.float16).to("npu"),
               randn(1, 2, 128, 64, dtype=torch.float16).to("npu"))
    for pat in (sa.Dense(), sa.SlidingWindow(32)):
        out = sa.attention(q, k, v, pat, backend="npu")
        ref = oracle.oracle_attention(q.cpu(), k.cpu(), v.cpu(), pat)
        base = oracle.masked_attention_in_dtype(q.cpu(), k.cpu(), v.cpu(), pat)
        oracle.assert_close_contract(out.cpu(), ref, dtype=torch.float16, device="npu", lowp_baseline=base)
