"""Property-based sweep of the contract's "Bad input" rules (hypothesis, derandomized: CI draws the
same examples every run). Draws shapes, strides, pattern parameters (huge ones included), special
values (NaN, +-inf) at random places, and sequences of cache operations (append, ragged append,
release_outside, free, decode), and checks every result against the float64 evaluation or the
contract's error rule (`expected_nonfinite` / `assert_nonfinite_rule` of tests/test_edges.py, whose
plain tests are the seed failures of issue 20).

Cache attention runs with backend="reference": the CPU decode kernel's own non-finite handling is
tested beside that kernel.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # a test dependency (.ci/run installs it)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import oracle  # noqa: E402
import sparse_attn as sa  # noqa: E402
from conftest import NO_JIT  # noqa: E402
from sparse_attn import BlockSparse, Dense, PagedKVCache, SlidingWindow, TopK  # noqa: E402
from test_edges import assert_nonfinite_rule, expected_nonfinite  # noqa: E402

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECIAL = [float("nan"), float("inf"), float("-inf")]
BIG = st.sampled_from([2 ** 31, 2 ** 40, 2 ** 62])


@st.composite
def patterns(draw, sk: int, kv_heads: int):
    kind = draw(st.sampled_from(["dense", "dense_nc", "window", "topk", "block_sparse"]))
    small = st.integers(1, 12)
    if kind == "dense":
        return Dense()
    if kind == "dense_nc":
        return Dense(causal=False)
    if kind == "window":
        return SlidingWindow(draw(small | BIG), sinks=draw(st.integers(0, 4) | BIG))
    if kind == "topk":
        return TopK(draw(st.integers(0, 3) | BIG), block_size=draw(st.sampled_from([4, 7, 8]) | BIG),
                    sink_blocks=draw(st.integers(0, 2) | BIG), local_blocks=draw(st.integers(1, 2) | BIG))
    bs = draw(st.sampled_from([4, 8]))
    nb = -(-sk // bs)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    lay = torch.rand(1, draw(st.sampled_from([1, kv_heads])), nb, nb, generator=g) < 0.6
    return BlockSparse(lay, block_size=bs)


def _poke(draw, x, allowed):
    """Put up to two special values at drawn places of `x` (in place)."""
    for _ in range(draw(st.integers(0, 2))):
        idx = tuple(draw(st.integers(0, n - 1)) for n in x.shape)
        x[idx] = draw(st.sampled_from(allowed))


def _maybe_strided(draw, x):
    """The same values through a non-contiguous view (a transposed copy read back)."""
    if draw(st.booleans()):
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_attention_edges(data):
    draw = data.draw
    b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    sk = draw(st.integers(1, 40))
    sq = draw(st.integers(1, sk))
    d = draw(st.sampled_from([8, 16]))
    pattern = draw(patterns(sk, hkv))
    backend = draw(st.sampled_from(["reference", "cpu", None]))
    if NO_JIT and backend == "cpu":
        backend = "reference"  # the same draws without the extensions: every other case still runs
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for h, s in ((hkv * g, sq), (hkv, sk), (hkv, sk)))
    # TopK with an infinite key: +-inf block scores tie with the masked blocks (not ordered by the contract)
    key_special = [float("nan")] if isinstance(pattern, TopK) else SPECIAL
    _poke(draw, q, SPECIAL)
    _poke(draw, k, key_special)
    _poke(draw, v, SPECIAL)
    q, k, v = (_maybe_strided(draw, x) for x in (q, k, v))
    if backend != "reference" and sa.plan(q, k, v, pattern, backend=backend).kernel.name == "cpu.decode":
        backend = "reference"  # the decode kernel's non-finite rule is tested beside that kernel
    involved, ref = expected_nonfinite(q, k, v, pattern)
    out = sa.attention(q, k, v, pattern, backend=backend)
    assert out.shape == (b, hkv * g, sq, d)
    assert_nonfinite_rule(out, involved, ref, what=f"{pattern!r} backend={backend}")


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_linear_attention_decay_edges(data):
    draw = data.draw
    h, s, d = draw(st.integers(1, 2)), draw(st.integers(1, 90)), draw(st.sampled_from([8, 16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    q, k, v = (torch.randn(1, h, s, d, generator=gen) for _ in range(3))
    decay = -torch.rand(1, h, s, generator=gen) * draw(st.sampled_from([0.01, 1.0, 5.0]))
    for _ in range(draw(st.integers(0, 3))):  # zero gates: full resets
        decay[0, draw(st.integers(0, h - 1)), draw(st.integers(0, s - 1))] = float("-inf")
    backend = draw(st.sampled_from(["reference", None]))
    ref, state = oracle.oracle_linear_attention(q, k, v, decay=decay)
    out, st_out = sa.linear_attention(q, k, v, decay=decay, backend=backend, return_state=True)
    oracle.assert_close_contract(out, ref, dtype=torch.float32, device="cpu", what="o")
    oracle.assert_close_contract(st_out, state, dtype=torch.float32, device="cpu", what="state")


# ----------------------------------------------------------------------------------------------
# caches: a model of what each sequence holds and what was released
# ----------------------------------------------------------------------------------------------
class _Model:
    """Per sequence: the appended keys / values (float32, host) and the released positions."""

    def __init__(self, batch, d):
        self.k = [torch.zeros(1, 0, d) for _ in range(batch)]
        self.v = [torch.zeros(1, 0, d) for _ in range(batch)]
        self.released = [set() for _ in range(batch)]

    def length(self, b):
        return self.k[b].shape[1]


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_paged_cache_operations(data):
    draw = data.draw
    batch, d, ps = 2, 8, draw(st.sampled_from([4, 8]))
    cache = PagedKVCache(batch, 1, d, num_pages=64, page_size=ps, max_len=96)
    model = _Model(batch, d)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["append", "ragged", "release", "free", "decode", "decode"]))
        if op in ("append", "ragged"):
            t = draw(st.integers(1, 12))
            counts = [t] * batch if op == "append" else [draw(st.integers(0, t)) for _ in range(batch)]
            if any(model.length(b) + counts[b] > 96 for b in range(batch)):
                continue
            k, v = torch.randn(batch, 1, t, d, generator=gen), torch.randn(batch, 1, t, d, generator=gen)
            if draw(st.integers(0, 4)) == 0:
                k[draw(st.integers(0, batch - 1)), 0, draw(st.integers(0, t - 1)), 0] = float("nan")
            cache.append(k, v, num_new=None if op == "append" else counts)
            for b in range(batch):
                model.k[b] = torch.cat([model.k[b], k[b, :, :counts[b]]], 1)
                model.v[b] = torch.cat([model.v[b], v[b, :, :counts[b]]], 1)
        elif op == "release":
            w, sinks = draw(st.integers(1, 24)), draw(st.integers(0, 6))
            cache.release_outside(SlidingWindow(w, sinks=sinks))
            for b in range(batch):  # whole pages below the window, past the sinks' pages
                first = -(-sinks // ps)
                last = max(first, (model.length(b) - w) // ps)
                model.released[b] |= set(range(first * ps, last * ps))
        elif op == "free":
            b = draw(st.integers(0, batch - 1))
            cache.free(b)
            model.k[b], model.v[b], model.released[b] = model.k[b][:, :0], model.v[b][:, :0], set()
        else:
            sq = draw(st.integers(1, 3))
            if min(model.length(b) for b in range(batch)) < sq:
                continue
            pattern = draw(st.sampled_from([Dense(), SlidingWindow(draw(st.integers(1, 30) | BIG),
                                                                   sinks=draw(st.integers(0, 6)))]))
            q = torch.randn(batch, 2, sq, d, generator=gen)
            reached = []
            for b in range(batch):
                mask = oracle.visibility_mask(q[b:b + 1], model.k[b][None], pattern)[0, 0]  # (Sq, n)
                seen = set(mask.any(0).nonzero().flatten().tolist())
                reached.append(bool(seen & model.released[b]))
            if any(reached):
                with pytest.raises(ValueError, match="released"):
                    sa.attention_with_cache(q, cache, pattern, backend="reference")
                continue
            out = sa.attention_with_cache(q, cache, pattern, backend="reference")
            for b in range(batch):
                involved, ref = expected_nonfinite(q[b:b + 1], model.k[b][None], model.v[b][None], pattern)
                assert_nonfinite_rule(out[b:b + 1], involved, ref, what=f"sequence {b} {pattern!r}")
