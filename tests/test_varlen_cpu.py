"""Packed varlen on the C++ CPU kernel: `attention_varlen` makes ONE extension call for all
sequences (forward and backward; threads over (sequence, kv head, tile) tasks), equal to the
float64 oracle run on each sequence alone: odd lengths, Sq_i < Sk_i, GQA, empty sequences, both
backward schedules, bfloat16, sinks and softcap."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import leaf64, make_pattern, needs_jit, randn
from sparse_attn.api.functional import plan_varlen
from sparse_attn.backends.cpu import kernels as cpu_kernels

pytestmark = needs_jit

SEQS = [(5, 37), (33, 33), (1, 40), (0, 5), (70, 130)]


def cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)


def packed(seqs, hq, hkv, d, dv=None, dtype=torch.float32):
    q = randn(sum(s for s, _ in seqs), hq, d, dtype=dtype, requires_grad=True)
    k = randn(sum(s for _, s in seqs), hkv, d, dtype=dtype, requires_grad=True)
    v = randn(sum(s for _, s in seqs), hkv, dv or d, dtype=dtype, requires_grad=True)
    return q, k, v


def oracle_per_sequence(pattern, q, k, v, seqs, **kw):
    cq, ck = cu(s for s, _ in seqs).tolist(), cu(s for _, s in seqs).tolist()
    outs = []
    for i, (sq, sk) in enumerate(seqs):
        pat = pattern
        if isinstance(pattern, sa.BlockSparse):
            n, lay = -(-sk // pattern.block_size), pattern.layout
            pat = sa.BlockSparse(lay[i if lay.shape[0] > 1 else 0][None, :, :n, :n].contiguous(),
                                 block_size=pattern.block_size)
        if sq == 0:
            outs.append(q.new_zeros(0, q.shape[1], v.shape[2]))
            continue
        qi, ki, vi = (x[a:a + n].transpose(0, 1)[None] for x, a, n in ((q, cq[i], sq), (k, ck[i], sk), (v, ck[i], sk)))
        outs.append(oracle.oracle_attention(qi, ki, vi, pat, **kw)[0].transpose(0, 1))
    return torch.cat(outs)


class _Calls:
    """Counts the extension's varlen calls."""

    def __init__(self, monkeypatch):
        ext = cpu_kernels._ext()
        self.n = {"fwd": 0, "bwd": 0}
        for name, key in (("block_sparse_fwd_varlen", "fwd"), ("block_sparse_bwd_varlen", "bwd")):
            fn = getattr(ext, name)

            def wrap(*a, _fn=fn, _key=key, **kw):
                self.n[_key] += 1
                return _fn(*a, **kw)
            monkeypatch.setattr(ext, name, wrap)


@pytest.mark.parametrize("kind", ["dense_causal", "window_sinks", "blocksparse", "dense_full"])
def test_cpu_packed_varlen_equals_oracle(kind, monkeypatch):
    seqs = SEQS if kind != "dense_full" else SEQS + [(9, 4)]  # non-causal Sq_i > Sk_i: per-sequence calls
    pattern = make_pattern(kind, b=len(seqs), hkv=2, sk=130)
    q, k, v = packed(seqs, 6, 2, 40, 72)
    cq, ck = cu(s for s, _ in seqs), cu(s for _, s in seqs)
    plan, is_packed = plan_varlen(q, k, v, cq, ck, pattern, backend="cpu")
    assert is_packed and plan.kernel.name == "cpu.block_sparse", plan.explain()
    calls = _Calls(monkeypatch)
    out = sa.attention_varlen(q, k, v, cq, ck, pattern, backend="cpu")
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    want = 0 if kind == "dense_full" else 1
    assert calls.n == {"fwd": want, "bwd": want}
    ins64 = [leaf64(x) for x in (q, k, v)]
    ref = oracle_per_sequence(pattern, *ins64, seqs)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu", what="cpu packed varlen")
    for name, g, gr in zip("qkv", got, torch.autograd.grad(ref, ins64, go.double())):
        oracle.assert_close_contract(g, gr, dtype=torch.float32, device="cpu", what=f"d{name}")


@pytest.mark.parametrize("mode", [1, 2])
def test_cpu_packed_backward_schedules(mode):
    pattern = sa.SlidingWindow(21, sinks=2)
    q, k, v = packed(SEQS, 4, 1, 32)
    cq, ck = cu(s for s, _ in SEQS), cu(s for _, s in SEQS)
    plan, _ = plan_varlen(q, k, v, cq, ck, pattern, backend="cpu")
    kern, lay = plan.kernel, plan.kernel.prepare_varlen(q, k, plan.problem)
    out, lse = kern.forward_varlen(q.detach(), k.detach(), v.detach(), cq, ck, plan.problem, lay)
    go = torch.randn_like(out)
    got = kern.backward_varlen(q.detach(), k.detach(), v.detach(), out, lse, go, cq, ck, plan.problem, lay, mode=mode)
    ins64 = [leaf64(x) for x in (q, k, v)]
    ref = oracle_per_sequence(pattern, *ins64, SEQS)
    for name, g, gr in zip("qkv", got, torch.autograd.grad(ref, ins64, go.double())):
        oracle.assert_close_contract(g, gr, dtype=torch.float32, device="cpu", what=f"d{name} mode {mode}")


def test_cpu_packed_bf16_sinks_softcap():
    q, k, v = packed(SEQS, 4, 2, 64, dtype=torch.bfloat16)
    sinks = randn(4)
    cq, ck = cu(s for s, _ in SEQS), cu(s for _, s in SEQS)
    out = sa.attention_varlen(q, k, v, cq, ck, sa.Dense(), backend="cpu", sink_logits=sinks, softcap=5.0)
    ref = oracle_per_sequence(sa.Dense(), *(x.detach().double() for x in (q, k, v)), SEQS,
                              sink_logits=sinks.double(), softcap=5.0)
    oracle.assert_close_contract(out, ref, dtype=torch.bfloat16, device="cpu")


def test_cpu_default_plan_is_packed():
    q, k, v = packed(SEQS, 4, 2, 64)
    plan, is_packed = plan_varlen(q, k, v, cu(s for s, _ in SEQS), cu(s for _, s in SEQS), sa.Dense())
    assert is_packed and plan.kernel.name == "cpu.block_sparse", plan.explain()
