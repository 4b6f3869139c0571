"""`attention_varlen` on packed sequences equals one `attention` call per sequence (and the oracle).

Each sequence obeys the contract on its own: its queries are aligned to the end of its own keys. For
BlockSparse the layout's batch dim is nseq (or 1) and sequence i reads the top-left
`ceil(Sk_i/bs)` square of its layout.
"""
import math

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import BACKENDS, DTYPE_IDS, leaf64, make_pattern, make_qkv_for, randn

SEQS = [(5, 37), (50, 50), (1, 71), (16, 16), (23, 30)]   # (Sq_i, Sk_i); some Sq_i < Sk_i
KINDS = ["dense_causal", "dense_full", "window", "window_sinks", "blocksparse", "blocksparse_bcast",
         "topk", "window_linear"]
HQ, HKV, D = 4, 2, 64


def cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)


def seq_pattern(pattern, i, sk):
    """The pattern sequence i sees: its own corner of a BlockSparse layout."""
    if isinstance(pattern, sa.BlockSparse):
        n = math.ceil(sk / pattern.block_size)
        lay = pattern.layout
        lay = lay[i if lay.shape[0] > 1 else 0][None, :, :n, :n]
        return sa.BlockSparse(lay.contiguous(), block_size=pattern.block_size)
    return pattern


def make_packed(kind, seqs, dtype, requires_grad=False):
    """Packed (T, H, D) q/k/v, drawn so that no sequence's TopK selection hangs on rounding."""
    nseq, max_sk = len(seqs), max(sk for _, sk in seqs)
    pattern = make_pattern(kind, b=nseq, hkv=HKV, sk=max_sk)
    qs, ks, vs = [], [], []
    for sq, sk in seqs:
        q, k, v = make_qkv_for(pattern, 1, HQ, HKV, sq, sk, D, dtype=dtype)
        qs.append(q[0].transpose(0, 1))
        ks.append(k[0].transpose(0, 1))
        vs.append(v[0].transpose(0, 1))
    q, k, v = (torch.cat(x).contiguous().requires_grad_(requires_grad) for x in (qs, ks, vs))
    gate = randn(HQ, dtype=dtype, requires_grad=requires_grad) if kind == "window_linear" else None
    return pattern, q, k, v, gate


def per_sequence(fn, pattern, q, k, v, gate, seqs):
    """Concatenated `fn(q_i, k_i, v_i, pattern_i, gate)` over the sequences, in packed layout."""
    cq, ck = cu(s for s, _ in seqs), cu(s for _, s in seqs)
    outs = []
    for i, (sq, sk) in enumerate(seqs):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        outs.append(fn(qi, ki, vi, seq_pattern(pattern, i, sk), gate)[0].transpose(0, 1))
    return torch.cat(outs)


def varlen(pattern, q, k, v, gate, seqs, backend, with_max):
    kw = {}
    if with_max:
        kw = dict(max_seqlen_q=max(s for s, _ in seqs), max_seqlen_k=max(s for _, s in seqs))
    return sa.attention_varlen(q, k, v, cu(s for s, _ in seqs), cu(s for _, s in seqs), pattern,
                               gate=gate, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_varlen_equals_per_sequence_calls(kind, backend):
    pattern, q, k, v, gate = make_packed(kind, SEQS, torch.float32, requires_grad=True)
    out = varlen(pattern, q, k, v, gate, SEQS, backend, with_max=KINDS.index(kind) % 2 == 0)  # half pass max_seqlen_*
    assert out.shape == (sum(s for s, _ in SEQS), HQ, D) and out.dtype == torch.float32
    calls = per_sequence(lambda *a: sa.attention(*a[:4], gate=a[4], backend=backend),
                         pattern, q, k, v, gate, SEQS)
    oracle.assert_close_contract(out, calls, dtype=torch.float32, device="cpu", what="varlen vs calls")

    ins = [x for x in (q, k, v, gate) if x is not None]
    ins64 = [leaf64(x) for x in ins]
    g64 = ins64[3] if gate is not None else None
    ref = per_sequence(lambda *a: oracle.oracle_attention(*a[:4], gate=a[4]), pattern, *ins64[:3], g64, SEQS)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu", what="varlen vs oracle")
    go = torch.randn_like(out)
    for name, g, gr in zip("qkvg", torch.autograd.grad(out, ins, go),
                           torch.autograd.grad(ref, ins64, go.double())):
        oracle.assert_close_contract(g, gr, dtype=torch.float32, device="cpu", what=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", ["dense_causal", "topk", "window_linear"])
def test_varlen_low_precision(kind, dtype, backend):
    pattern, q, k, v, gate = make_packed(kind, SEQS, dtype)
    out = varlen(pattern, q, k, v, gate, SEQS, backend, with_max=True)
    ref = per_sequence(lambda *a: oracle.oracle_attention(*a[:4], gate=a[4]), pattern, q, k, v, gate, SEQS)
    base = per_sequence(lambda *a: oracle.masked_attention_in_dtype(*a[:4], gate=a[4]), pattern, q, k, v,
                        gate, SEQS)
    oracle.assert_close_contract(out, ref, dtype=dtype, device="cpu", lowp_baseline=base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_with_an_empty_query_sequence(backend):
    seqs = [(3, 20), (0, 9), (7, 7)]
    pattern, q, k, v, _ = make_packed("window", seqs, torch.float32)
    out = varlen(pattern, q, k, v, None, seqs, backend, with_max=False)
    ref = per_sequence(lambda *a: oracle.oracle_attention(*a[:4]), pattern, q, k, v, None, seqs)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu")


def test_varlen_single_sequence_is_attention():
    pattern, q, k, v, _ = make_packed("topk", [(71, 71)], torch.float32)
    out = sa.attention_varlen(q, k, v, cu([71]), cu([71]), pattern, backend="reference")
    oracle.assert_close_contract(out, sa.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                   v.transpose(0, 1)[None], pattern)[0].transpose(0, 1),
                                 dtype=torch.float32, device="cpu")
