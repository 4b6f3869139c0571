"""Decode through the scheduler: caches are storage read through one view, every decode kernel is
planned (`plan_with_cache(...).explain()`), TopK selection over a cache is the layout/ one, a
decode step reads no device value, and `cache/` imports no backend."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

import infllmv2_oracle
import oracle
import sparse_attn as sa
from conftest import needs_jit, randn, topk_margin
from sparse_attn.cache import KVCache, KVView, PagedKVCache, RingKVCache
from sparse_attn.layout.topk_selection import topk_index_over_cache, topk_token_index
from sparse_attn.scheduler.cache_problem import CACHE_OP, make_cache_problem
from sparse_attn.scheduler.problem import dense_reach
from sparse_attn.scheduler.registry import kernels
from test_cache import _fill
from test_layout import _NoHostSync

PKG = pathlib.Path(sa.__file__).parent


def _caches(b, hkv, d, lengths, *, dtype=torch.float32, pool=16, page_size=8):
    max_len = max(lengths) + 8
    caches = [KVCache(b, hkv, d, max_len, dtype=dtype, pool_block_size=pool),
              PagedKVCache(b, hkv, d, num_pages=b * -(-max_len // page_size), page_size=page_size, max_len=max_len,
                           dtype=dtype, pool_block_size=pool)]
    full_k, full_v = randn(b, hkv, max(lengths), d, dtype=dtype), randn(b, hkv, max(lengths), d, dtype=dtype)
    _fill(caches, full_k, full_v, lengths, steps=[max(lengths) // 2, 1, max(lengths)])
    return caches, full_k, full_v


# ------------------------------------------------------------------------------------- the view
def test_view_describes_both_layouts():
    caches, _, _ = _caches(3, 2, 16, [21, 40, 33])
    contiguous, paged = (c.kv_view() for c in caches)
    assert isinstance(contiguous, KVView) and contiguous.kind == "contiguous" and paged.kind == "paged"
    for view in (contiguous, paged):
        assert (view.batch, view.kv_heads, view.head_dim, view.v_head_dim) == (3, 2, 16, 16)
        assert view.host_lengths == (21, 40, 33) and view.max_length == 40
        assert view.lengths.tolist() == [21, 40, 33] and view.page_table.dtype == torch.int32
    # a contiguous cache is one page of max_len + 1 rows per sequence
    assert contiguous.page_size == caches[0].max_len + 1 and contiguous.page_table.flatten().tolist() == [0, 1, 2]
    assert contiguous.k is caches[0].k and paged.k is caches[1].k_pages  # storage, not a copy
    for lo, hi in ((0, 40), (5, 23)):
        kc, vc = contiguous.gather(lo, hi)
        kp, vp = paged.gather(lo, hi)
        for i, n in enumerate(contiguous.host_lengths):
            m = max(0, min(hi, n) - lo)
            assert torch.equal(kc[i, :, :m], kp[i, :, :m]) and torch.equal(vc[i, :, :m], vp[i, :, :m])
    torch.testing.assert_close(contiguous.pooled_keys(3), paged.pooled_keys(3))


def test_selection_over_cache_is_the_layout_one():
    """TopK over a cache (block means kept by the cache, rows end-aligned per sequence) equals the
    selection of `attention` on each sequence alone."""
    pat = sa.TopK(2, block_size=8, sink_blocks=1, local_blocks=1)
    lengths = [29, 50, 41]
    caches, full_k, _ = _caches(3, 2, 16, lengths, pool=8)
    q = randn(3, 4, 3, 16)
    for c in caches:
        got = topk_index_over_cache(q, c.kv_view(), pat)
        for i, n in enumerate(lengths):
            assert topk_margin(q[i:i + 1], full_k[i:i + 1, :, :n], pat) > 1e-4
            assert torch.equal(got[i:i + 1], topk_token_index(q[i:i + 1], full_k[i:i + 1, :, :n], pat)), i


# ------------------------------------------------------------------------------------- planning
@needs_jit
def test_every_decode_kernel_is_planned_and_explained():
    caches, _, _ = _caches(2, 2, 32, [37, 61])
    q = randn(2, 4, 1, 32)
    names = {k.name for k in kernels(CACHE_OP)}
    assert {"reference.cache_chunked", "cpu.decode", "triton.splitkv_decode", "cuda.splitkv_decode"} <= names
    for k in kernels(CACHE_OP):
        assert set(k.cache_kinds) <= {"contiguous", "paged"} and k.cache_kinds, k.name
    for c, kind in zip(caches, ("contiguous", "paged")):
        for pat in (sa.Dense(), sa.SlidingWindow(20, sinks=2), sa.TopK(2, block_size=16)):
            plan = sa.plan_with_cache(q, c, pat)
            text = plan.explain()
            assert plan.kernel.name == "cpu.decode", text
            assert f"{kind} cache" in text and "chosen: cpu.decode" in text
            rows = {c.kernel.name: next(ln for ln in text.splitlines() if f" {c.kernel.name} " in ln)
                    for c in plan.candidates}
            assert rows["cpu.decode"].lstrip().startswith("*") and "chosen (cheapest)" in rows["cpu.decode"]
            assert "supported, costlier" in rows["reference.cache_chunked"]
            # a kernel for another device says so, without being asked whether it could run here
            assert "device cpu not in ('cuda',)" in rows["cuda.splitkv_decode"]
            torch.testing.assert_close(plan.run(q, c), sa.attention_with_cache(q, c, pat), rtol=0, atol=0)
    # asked for a backend: the others are not even asked
    plan = sa.plan_with_cache(q, caches[1], backend="reference")
    assert plan.kernel.name == "reference.cache_chunked" and "backend 'reference' requested" in plan.explain()


@needs_jit
def test_a_kernel_that_reads_one_kind_says_so():
    from sparse_attn.backends.cpu.decode import CpuCacheDecode

    class ContiguousOnly(CpuCacheDecode):
        cache_kinds = ("contiguous",)

    caches, _, _ = _caches(2, 2, 32, [17, 30])
    q = randn(2, 2, 1, 32)
    contiguous, paged = (make_cache_problem(q, c, sa.Dense())[0] for c in caches)
    assert ContiguousOnly().not_supported_reasons(paged) == ["does not read a paged cache"]
    assert ContiguousOnly().not_supported_reasons(contiguous) == []
    assert contiguous.phase == "decode" and "contiguous cache" in contiguous.describe()


def test_plan_runs_its_call_as_the_cache_grows():
    caches, full_k, full_v = _caches(2, 2, 16, [30, 45])
    pat = sa.SlidingWindow(9, sinks=1)
    q = randn(2, 4, 1, 16)
    for c in caches:
        plan = sa.plan_with_cache(q, c, pat)
        for step in range(3):
            c.append(randn(2, 2, 1, 16), randn(2, 2, 1, 16))
            torch.testing.assert_close(plan.run(q, c), sa.attention_with_cache(q, c, pat, backend="reference"),
                                       rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="this plan was made for"):
            plan.run(randn(2, 4, 2, 16), c)
        with pytest.raises(ValueError, match="this plan was made for"):
            plan.run(q, caches[1 - caches.index(c)])  # the other kind
        with pytest.raises(ValueError, match="this plan was made for"):
            plan.run(randn(2, 8, 1, 16), c)


def test_a_pattern_that_covers_a_short_cache_runs_as_dense_until_it_grows():
    """Contract: a short sequence degrades exactly to dense causal attention. Over a cache the
    longest sequence decides, at every run: TopK(2) of 16-key blocks (one sink, one local block)
    sees every causal key up to 64 keys, so a plan made at 60 runs Dense (`explain()` says so) and
    selects once a sequence passes 64; each step is the float64 evaluation of the TopK itself."""
    pat = sa.TopK(2, block_size=16)
    assert dense_reach(pat) == 64 and dense_reach(sa.SlidingWindow(30, sinks=2)) == 32
    assert dense_reach(sa.Dense()) is None
    # InfLLMv2: below dense_len, and past it while its selection still takes every causal block
    # (to 96 blocks of 64 keys at the default topk 96); with topk 2 and 2 local blocks, dense_len
    assert dense_reach(sa.InfLLMv2(dense_len=100)) == 96 * 64
    assert dense_reach(sa.InfLLMv2(dense_len=1000, topk=2, local_blocks=2)) == 999
    caches, _, _ = _caches(2, 2, 16, [45, 60])
    q = randn(2, 4, 1, 16)
    for c in caches:
        plan = sa.plan_with_cache(q, c, pat)
        assert plan.problem.pattern == sa.Dense() and plan.problem.requested == pat
        assert "sees every causal key at Sk=60: run as Dense(causal=True)" in plan.explain().splitlines()[0]
        ran = []
        for _ in range(7):  # 61 .. 67 keys in the longer sequence
            c.append(randn(2, 2, 1, 16), randn(2, 2, 1, 16))
            ran.append(type(make_cache_problem(q, c, pat)[0].pattern).__name__)
            out = plan.run(q, c)
            view = c.kv_view()
            k, v = view.gather(0, view.max_length)
            for b, n in enumerate(view.host_lengths):
                want = oracle.oracle_attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                               v[b:b + 1, :, :n].double(), pat)
                oracle.assert_close_contract(out[b:b + 1], want, dtype=torch.float32, device="cpu")
        assert ran == ["Dense"] * 4 + ["TopK"] * 3, ran


@needs_jit
def test_prepared_decode_of_an_infllmv2_is_dense_within_its_reach():
    """An InfLLMv2 of 16-key blocks with one init, one local and one selected block sees every
    causal key up to 48 keys (past its dense_len of 40): over a paged cache its plan's prepared call
    is Dense's binding call bounded there -- the plan's bits and the float64 evaluation of the
    InfLLMv2 itself -- and the binding refuses a sequence past 48 by name (ValueError)."""
    pat = sa.InfLLMv2(topk=1, block_size=16, kernel_size=16, kernel_stride=8, local_blocks=1, dense_len=40)
    assert dense_reach(pat) == 48
    caches, _, _ = _caches(2, 2, 16, [48, 29], page_size=16)
    c, q = caches[1], randn(2, 4, 1, 16)
    plan = sa.plan_with_cache(q, c, pat)
    fast = plan.prepared(c)
    assert fast is not None and fast.longest == 48
    view = c.kv_view()
    rows = torch.empty(2, 4, 16)
    fast.run(q[:, :, 0], view.lengths, view.page_table, rows)
    assert torch.equal(rows, plan.run(q, c)[:, :, 0])
    k, v = view.gather(0, view.max_length)
    for b, n in enumerate(view.host_lengths):
        want = infllmv2_oracle.attention(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                         pat)
        oracle.assert_close_contract(rows[b:b + 1, :, None], want, dtype=torch.float32, device="cpu")
    c.append(randn(2, 2, 1, 16), randn(2, 2, 1, 16))
    view = c.kv_view()
    with pytest.raises(ValueError, match=r"lengths\[0\] = 49 is beyond max_length = 48"):
        fast.run(q[:, :, 0], view.lengths, view.page_table, rows)


@needs_jit
def test_a_plan_whose_kernel_cannot_select_says_so_when_the_cache_grows():
    """A plan made while its TopK ran as Dense may hold a kernel that reads Dense only: once the
    cache passes the pattern's reach, `run` raises `ValueError` naming the kernel (plan again)."""
    from sparse_attn.api.cache import CachePlan
    from sparse_attn.backends.cpu.decode import CpuCacheDecode

    class DenseOnly(CpuCacheDecode):
        name = "test.dense_only"
        patterns = (sa.Dense,)

    caches, _, _ = _caches(1, 2, 16, [60])
    c, q, pat = caches[1], randn(1, 4, 1, 16), sa.TopK(2, block_size=16)
    problem, _ = make_cache_problem(q, c, pat)
    plan = CachePlan(problem=problem, candidates=[], kernel=DenseOnly(), backend_request=None)
    torch.testing.assert_close(plan.run(q, c), sa.attention_with_cache(q, c, pat, backend="reference"))
    c.append(randn(1, 2, 5, 16), randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="test.dense_only cannot run .*TopK"):
        plan.run(q, c)


# ------------------------------------------------------------------------- no host synchronisation
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_jit)])
@pytest.mark.parametrize("pat", [sa.Dense(), sa.SlidingWindow(20, sinks=3), sa.TopK(2, block_size=16)],
                         ids=["dense", "window", "topk"])
def test_decode_step_reads_no_device_value(pat, backend):
    """Plan and run of a decode step (after the append the caller drives with host counts) never
    copy a device value to the host: a CUDA graph can capture it."""
    caches, _, _ = _caches(2, 2, 32, [40, 77])
    q = randn(2, 4, 1, 32)
    for c in caches:
        c.append(randn(2, 2, 1, 32), randn(2, 2, 1, 32))
        want = sa.attention_with_cache(q, c, pat, backend=backend)
        with _NoHostSync():
            plan = sa.plan_with_cache(q, c, pat, backend=backend)
            out = plan.run(q, c)
            out2 = sa.attention_with_cache(q, c, pat, backend=backend)
        assert torch.equal(out, want) and torch.equal(out2, want)


# ------------------------------------------------------------------------------ cache is storage
def _imports(path: pathlib.Path, pkg: str | None = None) -> set[str]:
    """Absolute module names a file of package `pkg` imports (relative imports resolved), at any nesting."""
    pkg = pkg or "sparse_attn." + ".".join(path.relative_to(PKG).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rstrip(".").split(".")
            mod = node.module or ""
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_cache_imports_no_backend_and_kernels_no_cache_class():
    files = sorted((PKG / "cache").glob("*.py"))
    assert files
    for f in files:
        bad = {m for m in _imports(f) if m.startswith("sparse_attn.backends")}
        assert not bad, f"{f.name} imports {bad}"
    # kernels read the view: no backend or layout module names a cache class
    for folder in ("backends", "layout"):
        for f in sorted((PKG / folder).rglob("*.py")):
            text = f.read_text()
            assert not re.search(r"isinstance\([^)]*KVCache", text), f
            assert not {m for m in _imports(f) if m.startswith("sparse_attn.cache")}, f


def test_import_graph_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..backends.cpu import decode\n")
    assert "sparse_attn.backends.cpu" in _imports(probe, "sparse_attn.cache")


# ------------------------------------------------------------------------------------ the ring
@pytest.mark.parametrize("window,sinks", [(5, 0), (6, 3), (1, 1), (20, 2)])
def test_ring_decode_equals_window_attention(window, sinks):
    """One token at a time into a `RingKVCache`: Dense(causal=False) over its filled slots is the
    SlidingWindow row of the full sequence (float64 oracle), and memory stays sinks + window."""
    b, hq, hkv, d, s = 2, 4, 2, 16, 40
    pat = sa.SlidingWindow(window, sinks=sinks)
    q, k, v = randn(b, hq, s, d), randn(b, hkv, s, d), randn(b, hkv, s, d)
    ring = RingKVCache(b, hkv, d, window=window, sinks=sinks)
    before = ring.nbytes()
    ring.append(k[:, :, :7], v[:, :, :7])  # a prefill chunk first
    for t in range(7, s):
        ring.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        out = sa.attention_with_cache(q[:, :, t:t + 1], ring, sa.Dense(causal=False))
        ref = oracle.oracle_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], pat)
        oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu", what=f"token {t}")
        ko, _ = ring.ordered()
        kept = list(range(min(sinks, t + 1))) + list(range(max(sinks, t + 1 - window), t + 1))
        assert torch.equal(ko, k[:, :, kept])
    assert ring.nbytes() == before == 2 * b * hkv * (sinks + window) * d * 4 + 2 * b * 4
