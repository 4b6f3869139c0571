"""InfLLMv2's C++ selection over a cache's window sums (csrc/cpu/infllmv2_decode.cpp, what the CPU
decode runs) against the PyTorch definition (`layout.infllmv2_selection.infllmv2_picks_over_cache`)
and the float64 evaluation: contiguous and paged caches, ragged lengths (one shorter than the rows),
Sq 1 to 16, every config (both variants, both normalisers, kernel size not twice the stride,
local_blocks=0), GQA 1 to 16, bfloat16 queries, both sides of `dense_len`, NaN keys; then decode
through the public API equals the prefill rows."""
import pytest
import torch

import infllmv2_oracle as O
import sparse_attn as sa
import sparse_attn.layout.infllmv2_selection as sel_mod
from conftest import make_qkv
from sparse_attn.backends.cpu.infllmv2 import infllmv2_picks_over_cache_cpu, native_over_cache, unavailable
from sparse_attn.layout.block_layout import index_to_bool
from sparse_attn.layout.infllmv2_selection import infllmv2_index_over_cache, infllmv2_picks_over_cache
from test_infllmv2 import CONFIGS

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"cpu_infllmv2: {unavailable()}")


def draw_ragged(pattern, b, hq, hkv, sq, lengths, d, *, dtype=torch.float32, min_margin=1e-5):
    """q `(B, Hq, Sq, D)`, k, v `(B, Hkv, max(lengths), D)` in `dtype` whose selection for each
    sequence's rows (end-aligned to its own length) is not decided by rounding (the oracle's
    margin on the values in `dtype`, per sequence)."""
    for _ in range(60):
        q, k, v = (x.to(dtype) for x in make_qkv(b, hq, hkv, sq, max(lengths), d))
        if all(n < sq or O.margin(q[i:i + 1], k[i:i + 1, :, :n], pattern) > min_margin
               for i, n in enumerate(lengths)):
            return q, k, v
    raise RuntimeError("could not draw a well-separated InfLLMv2 input")


def fill(pattern, kind, k, v, lengths, *, chunks=2):
    """A cache holding `lengths[i]` keys of sequence i, appended in `chunks` ragged pieces (the
    window sums made at the first read, then kept up to date by the later appends)."""
    b, hkv, s, d = k.shape
    if kind == "paged":
        cache = sa.PagedKVCache(b, hkv, d, num_pages=b * (-(-s // 16) + 1), page_size=16, max_len=s + 16,
                                dtype=k.dtype)
    else:
        cache = sa.KVCache(b, hkv, d, s + 16, dtype=k.dtype)
    done = [0] * b
    for c in range(chunks):
        want = [n * (c + 1) // chunks for n in lengths]
        step = max(w - x for w, x in zip(want, done))
        kk = k.new_zeros(b, hkv, step, d)
        vv = v.new_zeros(b, hkv, step, d)
        for i in range(b):
            kk[i, :, :want[i] - done[i]] = k[i, :, done[i]:want[i]]
            vv[i, :, :want[i] - done[i]] = v[i, :, done[i]:want[i]]
        cache.append(kk, vv, num_new=[w - x for w, x in zip(want, done)])
        if c == 0:  # the sums are made now and kept up to date by the later appends
            ks, st = pattern.kernel_size, pattern.kernel_stride
            cache.kv_view().window_sums(ks, st)
            cache.kv_view().window_sums(4 * ks, 4 * st)
        done = want
    assert cache.host_lengths == list(lengths)
    return cache


CASES = [  # (config, kind, B, Hq, Hkv, Sq, lengths)
    ("41-coarse", "contiguous", 2, 4, 2, 1, (197, 150)),
    ("41-coarse", "paged", 2, 16, 1, 16, (203, 177)),
    ("41-exact", "paged", 3, 8, 8, 5, (131, 3, 170)),  # a sequence shorter than the rows
    ("4-exact", "contiguous", 1, 2, 1, 9, (141,)),
    ("4-coarse-ks12", "paged", 2, 8, 2, 3, (190, 161)),
    ("41-coarse-bs8-local0", "contiguous", 2, 6, 3, 2, (99, 120)),
]


@pytest.mark.parametrize("name, kind, b, hq, hkv, sq, lengths", CASES,
                         ids=[f"{c[0]}-{c[1]}-g{c[3] // c[4]}-sq{c[5]}" for c in CASES])
def test_cpp_picks_over_the_sums_equal_pytorch_and_oracle(name, kind, b, hq, hkv, sq, lengths):
    pattern = CONFIGS[name]
    q, k, v = draw_ragged(pattern, b, hq, hkv, sq, lengths, 32)
    cache = fill(pattern, kind, k, v, lengths)
    view = cache.kv_view()
    assert native_over_cache(view)
    got = infllmv2_picks_over_cache_cpu(q, view, pattern)
    assert torch.equal(got, infllmv2_picks_over_cache(q, view, pattern))
    nb = -(-max(lengths) // pattern.block_size)
    for i, n in enumerate(lengths):  # forced + picked blocks of each sequence's rows vs the oracle
        if n < sq:
            continue
        qpos = torch.arange(n - sq, n)[None]
        sel = pattern.candidate_blocks(qpos, nb, pattern.block_size,
                                       selected=index_to_bool(got[i:i + 1], nb))
        ref = O.select_blocks(q[i:i + 1], k[i:i + 1, :, :n], pattern)
        assert torch.equal(sel.expand(1, hkv, sq, nb)[..., :ref.shape[-1]], ref)
        assert not sel[..., ref.shape[-1]:].any()


def test_bfloat16_queries_are_read_as_they_sit():
    pattern = CONFIGS["41-coarse"]
    q, k, v = draw_ragged(pattern, 2, 8, 2, 4, (180, 151), 64, dtype=torch.bfloat16)
    cache = fill(pattern, "paged", k, v, (180, 151))
    view = cache.kv_view()
    assert torch.equal(infllmv2_picks_over_cache_cpu(q, view, pattern),
                       infllmv2_picks_over_cache(q.float(), view, pattern))


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_dense_len_per_sequence_with_the_cpp_picks(kind):
    """Below `dense_len` a sequence's rows list every causal block; the C++ picks fill the others."""
    pattern = sa.InfLLMv2(topk=3, block_size=16, kernel_size=8, kernel_stride=4, local_blocks=1, dense_len=150)
    lengths = (171, 140)
    q, k, v = draw_ragged(pattern, 2, 4, 2, 3, lengths, 32)
    view = fill(pattern, kind, k, v, lengths).kv_view()
    got = infllmv2_index_over_cache(q, view, pattern, picks=infllmv2_picks_over_cache_cpu)
    assert torch.equal(got, infllmv2_index_over_cache(q, view, pattern))
    assert (got[1] >= 0).sum(-1).min() > pattern.topk  # the dense sequence lists more than topk blocks
    assert got.shape[-1] > pattern.topk


@pytest.mark.parametrize("name", ["41-coarse", "41-exact"])
def test_nan_keys_rank_first_and_reach_the_rows_that_see_them(name):
    """A NaN key makes the scores of the windows that hold it NaN (and, through the normaliser,
    possibly every score of a row): NaN ranks first, ties to the lower block, as the PyTorch path.
    A row whose visited blocks hold the NaN key comes out NaN; the others stay finite."""
    pattern = CONFIGS[name]
    b, hq, hkv, sq, d = 2, 4, 2, 4, 32
    lengths = (190, 175)
    q, k, v = make_qkv(b, hq, hkv, sq, max(lengths), d)
    k[0, 1, 37] = float("nan")  # sequence 0, kv head 1, block 2 (bs 16)
    k[1, 0, 150] = float("nan")  # inside sequence 1's local window
    for kind in ("contiguous", "paged"):
        cache = fill(pattern, kind, k, v, lengths)
        view = cache.kv_view()
        got = infllmv2_picks_over_cache_cpu(q, view, pattern)
        assert torch.equal(got, infllmv2_picks_over_cache(q, view, pattern))
        out = sa.attention_with_cache(q, cache, pattern, backend="cpu")
        ref = sa.attention_with_cache(q, cache, pattern, backend="reference")
        nb = -(-max(lengths) // pattern.block_size)
        for i, j in ((0, 37), (1, 150)):
            h = 1 if i == 0 else 0
            qpos = torch.arange(lengths[i] - sq, lengths[i])[None]
            vis = pattern.candidate_blocks(qpos, nb, pattern.block_size,
                                           selected=index_to_bool(got[i:i + 1], nb))
            sees = vis.expand(1, hkv, sq, nb)[0, h, :, j // pattern.block_size] & (qpos[0] >= j)  # (Sq,)
            rows = out[i, h * (hq // hkv):(h + 1) * (hq // hkv)]  # (G, Sq, D)
            assert torch.equal(rows.isnan().any(-1), sees[None].expand(hq // hkv, sq))
            other = torch.cat([out[i, :h * (hq // hkv)], out[i, (h + 1) * (hq // hkv):]])
            assert not other.isnan().any()  # the other kv head's keys hold no NaN
            assert torch.equal(out[i].isnan(), ref[i].isnan())
        assert sees.any()  # sequence 1's NaN sits in its window: seen


def test_cpu_decode_uses_the_cpp_picks_and_equals_prefill_rows(monkeypatch):
    """Through the public API: decode steps over a paged cache (bfloat16, GQA 8) give the prefill's
    rows, and the PyTorch scoring is not called on that path."""
    pattern = sa.InfLLMv2(topk=8, block_size=16, kernel_size=8, kernel_stride=4, local_blocks=2, dense_len=-1)
    b, hq, hkv, s, d = 1, 16, 2, 331, 64
    q, k, v = draw_ragged(pattern, b, hq, hkv, 6, (s,), d, dtype=torch.bfloat16)
    full = sa.attention(q, k, v, pattern, backend="cpu")  # the prefill's last 6 rows
    cache = sa.PagedKVCache(b, hkv, d, num_pages=32, page_size=16, max_len=s + 16, dtype=q.dtype)
    cache.append(k[:, :, :s - 6], v[:, :, :s - 6])

    def refuse(*a, **kw):
        raise AssertionError("the CPU decode ran the PyTorch scoring")

    monkeypatch.setattr(sel_mod, "infllmv2_picks_over_cache", refuse)
    for t in range(6):
        cache.append(k[:, :, s - 6 + t:s - 5 + t], v[:, :, s - 6 + t:s - 5 + t])
        out = sa.attention_with_cache(q[:, :, t:t + 1], cache, pattern, backend="cpu")
        # row t of a prefill of length s - 5 + t equals row (s - 6 + t) of the one of length s (causal)
        torch.testing.assert_close(out[:, :, 0].float(), full[:, :, t].float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(AssertionError, match="PyTorch scoring"):
        sa.attention_with_cache(q[:, :, :1], cache, pattern, backend="reference")


def test_bad_sums_are_refused():
    from sparse_attn.backends.cpu.infllmv2 import _ext
    q = torch.randn(1, 4, 1, 32)
    fine = torch.zeros(1, 2, 5, 32)
    with pytest.raises(RuntimeError, match="fewer than"):
        _ext().infllmv2_select_sums(q, fine, fine, [100], 8, 4, 16, 3, 1, 2, True, True)
    with pytest.raises(RuntimeError, match="float32"):
        _ext().infllmv2_select_sums(q, fine.double(), fine, [10], 8, 4, 16, 3, 1, 2, True, False)
    with pytest.raises(RuntimeError, match="lengths"):
        _ext().infllmv2_select_sums(q, fine, fine, [10, 3], 8, 4, 16, 3, 1, 2, True, False)
