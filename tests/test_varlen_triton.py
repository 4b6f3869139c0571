"""Packed varlen on the Triton backend: `attention_varlen` runs ONE launch per kernel over all
sequences (forward, dq, dk/dv), with its work list built on the device, and equals the float64
oracle run on each sequence alone (odd lengths, Sq_i != Sk_i, GQA, empty sequences, gradients,
sinks and softcap). Runs in Triton's interpreter on a CPU-only machine (conftest sets
TRITON_INTERPRET=1), compiled on TRITON_DEVICE where there is a GPU (`bash bench/gpu_check.sh`)."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import TRITON_DEVICE, leaf64, make_pattern, pattern_on, randn
from sparse_attn.api.functional import plan_varlen

pytest.importorskip("triton")

from sparse_attn.backends.triton import flash_varlen  # noqa: E402

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)
DEV = TRITON_DEVICE

# (Sq_i, Sk_i): odd lengths, Sq_i < Sk_i, single-token and tile-crossing sequences
SEQS = [(5, 37), (33, 33), (1, 40), (19, 26)]


def cu(lengths, device=DEV):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def packed(seqs, hq, hkv, d, dv=None, dtype=torch.float32, device=DEV):
    tq, tk = sum(s for s, _ in seqs), sum(s for _, s in seqs)
    q = randn(tq, hq, d, dtype=dtype).to(device).requires_grad_()
    k = randn(tk, hkv, d, dtype=dtype).to(device).requires_grad_()
    v = randn(tk, hkv, dv or d, dtype=dtype).to(device).requires_grad_()
    return q, k, v


def seq_pattern(pattern, i, sk):
    if isinstance(pattern, sa.BlockSparse):
        n = -(-sk // pattern.block_size)
        lay = pattern.layout
        return sa.BlockSparse(lay[i if lay.shape[0] > 1 else 0][None, :, :n, :n].contiguous(),
                              block_size=pattern.block_size)
    return pattern


def oracle_per_sequence(pattern, q, k, v, seqs, **kw):
    cq, ck = cu(s for s, _ in seqs), cu(s for _, s in seqs)
    outs = []
    for i, (_, sk) in enumerate(seqs):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        if qi.shape[2] == 0:
            outs.append(qi.new_zeros(0, q.shape[1], v.shape[2]))
            continue
        outs.append(oracle.oracle_attention(qi, ki, vi, seq_pattern(pattern, i, sk), **kw)[0].transpose(0, 1))
    return torch.cat(outs)


class _Launches:
    """Counts the launches of the packed kernels (the interpreter still runs them)."""

    def __enter__(self):
        self.counts = {}
        self.saved = []
        for name in ("_fwd_varlen_kernel", "_dq_varlen_kernel", "_dkdv_varlen_kernel"):
            fn = getattr(flash_varlen, name)
            old = fn.run

            def run(*a, _old=old, _name=name, **kw):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _old(*a, **kw)
            fn.run = run
            self.saved.append((fn, old))
        return self

    def __exit__(self, *exc):
        for fn, old in self.saved:
            fn.run = old


def check(pattern, seqs, *, hq=2, hkv=1, d=32, dv=None, with_max=True, grads=True, **kw):
    q, k, v = packed(seqs, hq, hkv, d, dv)
    cq, ck = cu(s for s, _ in seqs), cu(s for _, s in seqs)
    extra = dict(max_seqlen_q=max(s for s, _ in seqs), max_seqlen_k=max(s for _, s in seqs)) if with_max else {}
    plan, is_packed = plan_varlen(q, k, v, cq, ck, pattern, backend="triton", **extra, **kw)
    assert is_packed and plan.kernel.name == "triton.block_sparse", plan.explain()
    with _Launches() as launches:
        out = sa.attention_varlen(q, k, v, cq, ck, pattern, backend="triton", **extra, **kw)
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), go) if grads else ()
    want = {"_fwd_varlen_kernel": 1}
    if grads:
        want.update(_dq_varlen_kernel=1, _dkdv_varlen_kernel=1)
    assert launches.counts == want  # one launch per kernel for all sequences
    ins64 = [leaf64(x) for x in (q, k, v)]
    kw64 = {n: (leaf64(t) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    ref = oracle_per_sequence(pattern, *ins64, seqs, **kw64)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV, what="packed varlen vs oracle")
    if grads:
        for name, g, gr in zip("qkv", got, torch.autograd.grad(ref, ins64, go.double())):
            oracle.assert_close_contract(g, gr, dtype=torch.float32, device=DEV, what=f"d{name}")


@pytest.mark.parametrize("kind", ["dense_causal", "window_sinks", "blocksparse", "blocksparse_bcast"])
def test_packed_varlen_equals_oracle(kind):
    pattern = pattern_on(make_pattern(kind, b=len(SEQS), hkv=1, sk=max(s for _, s in SEQS)), DEV)
    check(pattern, SEQS, with_max=kind != "blocksparse")  # without bounds: the packed lengths bound


def test_packed_varlen_empty_sequences_and_noncausal_sq_above_sk():
    # an empty query sequence, an empty key sequence, Sq_i > Sk_i (non-causal), GQA 3, Dv != D
    seqs = [(3, 20), (0, 9), (40, 9), (4, 0), (7, 7)]
    check(sa.Dense(causal=False), seqs, hq=3, hkv=1, d=40, dv=72, with_max=False)


def test_packed_varlen_sinks_softcap():
    sinks = randn(2).to(DEV)
    check(sa.SlidingWindow(11), SEQS, sink_logits=sinks, softcap=3.0, grads=False)


def test_packed_varlen_bf16_forward():
    seqs = [(17, 40), (31, 31)]
    q, k, v = packed(seqs, 4, 2, 32, dtype=torch.bfloat16)
    out = sa.attention_varlen(q, k, v, cu(s for s, _ in seqs), cu(s for _, s in seqs), sa.Dense(), backend="triton")
    ref = oracle_per_sequence(sa.Dense(), q, k, v, seqs)
    base = torch.cat([oracle.masked_attention_in_dtype(
        q[a:a + sq].transpose(0, 1)[None], k[b:b + sk].transpose(0, 1)[None], v[b:b + sk].transpose(0, 1)[None],
        sa.Dense())[0].transpose(0, 1) for (sq, sk), a, b in zip(seqs, cu(s for s, _ in seqs).tolist(),
                                                                 cu(s for _, s in seqs).tolist())])
    oracle.assert_close_contract(out, ref, dtype=torch.bfloat16, device=DEV, lowp_baseline=base)


def test_packed_run_reads_no_offsets_on_host(monkeypatch):
    """The packed kernel's own work (layout, work list, launches) never reads a device value on
    the host: `.tolist()` / `.item()` / `int(tensor)` raise while it runs."""
    q, k, v = packed(SEQS, 2, 1, 32)
    cq, ck = cu(s for s, _ in SEQS), cu(s for _, s in SEQS)
    plan, is_packed = plan_varlen(q, k, v, cq, ck, sa.SlidingWindow(9), backend="triton")
    assert is_packed

    def boom(*a, **kw):
        raise AssertionError("host read of a device value")
    for name in ("tolist", "item", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    out = plan.kernel.run_varlen(q, k, v, cq, ck, plan.problem)
    out.sum().backward()
    monkeypatch.undo()
    ref = oracle_per_sequence(sa.SlidingWindow(9), *(x.detach().double() for x in (q, k, v)), SEQS)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device=DEV)


def test_work_items_on_device():
    cq, ck = cu([5, 0, 70]), cu([37, 9, 70])
    seq, tile = flash_varlen.work_items(cq, ck, 32, flash_varlen.item_bound(75, 3, 32, None))
    # seq 0: positions [32, 37) -> tile 1; seq 1: none; seq 2: [0, 70) -> tiles 0, 1, 2
    assert seq.tolist()[:4] == [0, 2, 2, 2] and tile.tolist()[:4] == [1, 0, 1, 2]
    assert set(seq.tolist()[4:]) <= {-1}
    kseq, kblk = flash_varlen.work_items(cq, ck, 32, 8, keys=True)
    assert kseq.tolist() == [0, 0, 1, 2, 2, 2, -1, -1] and kblk.tolist()[:6] == [0, 1, 0, 0, 1, 2]


def test_topk_is_refused_packed_with_a_reason():
    q, k, v = packed(SEQS, 4, 2, 32)
    pat = sa.TopK(1, block_size=16, sink_blocks=1, local_blocks=1)
    plan, is_packed = plan_varlen(q, k, v, cu(s for s, _ in SEQS), cu(s for _, s in SEQS), pat, backend="triton")
    assert not is_packed


def test_cpu_default_backend_keeps_per_sequence_kernels():
    """On CPU tensors the interpreter is never the automatic choice: the per-sequence plan wins."""
    q, k, v = packed(SEQS, 4, 2, 32, device="cpu")
    plan, is_packed = plan_varlen(q, k, v, cu((s for s, _ in SEQS), "cpu"), cu((s for _, s in SEQS), "cpu"), sa.Dense())
    assert plan.kernel.backend != "triton"
