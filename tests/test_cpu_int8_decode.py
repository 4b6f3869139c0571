"""`cpu.decode` over an int8 KV cache with bf16 / fp16 queries: the integer-product path
(csrc/cpu/decode_int8.h: q and P rounded to int16, vpdpwssd on AVX-512 VNNI; decode_int8_neon.h:
sdot / smlal on Arm with the dot-product extension; where the build has no such path the float path
runs and the same checks hold).

The contract's bf16 bound (1.6e-2) would let a dropped key or a misplaced column through at long
lengths, so these checks are tighter, and sized from what the path rounds: q and P to 16 bits
against their row's / segment's largest value, the output to the query dtype. Against the float64
evaluation over the dequantized rows:
* lse (float32): within 2e-4 absolute, where one key of 300 dropped moves it by ~3e-3;
* out: within its own rounding to the query dtype plus 2^-11 of the row's largest value;
head dims 32..256 (every chunk count), GQA 1 / 4 / 16, Sq 1 / 5 / 16, lengths around the 128-key
segments (1, 2, 3, 17, 127, 128, 129, 255, 257, 300), paged == contiguous bit for bit, every
pattern kind, and the non-finite rule (a NaN q row, an infinite key, a NaN value row).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, randn, topk_margin
from sparse_attn.cache import KVCache, PagedKVCache
from sparse_attn.cache.quant import dequantize
from test_cache import _fill

pytestmark = needs_jit

LENGTHS = [1, 2, 3, 17, 127, 128, 129, 255, 257, 300]


def _ext():
    from sparse_attn._build.jit import load_extension
    return load_extension("cpu_decode")


def _decode(q, cache, pat):
    from sparse_attn.backends.cpu.decode import decode_over_cache
    return decode_over_cache(q, cache.kv_view(), pat, scale=q.shape[-1] ** -0.5)


def _caches(b, hkv, d, lengths, dtype, pool):
    max_len = max(lengths) + 8
    full_k = randn(b, hkv, max(lengths), d) * 1.5
    full_v = randn(b, hkv, max(lengths), d)
    caches = [KVCache(b, hkv, d, max_len, dtype=dtype, pool_block_size=pool, kv_dtype="int8"),
              PagedKVCache(b, hkv, d, num_pages=b * (max_len // 16 + 2), page_size=16, max_len=max_len, dtype=dtype,
                           pool_block_size=pool, kv_dtype="int8")]
    g = torch.Generator().manual_seed(3)  # the paged cache's pages in random order
    caches[1]._free = [int(i) for i in torch.randperm(caches[1].num_pages, generator=g)]
    _fill(caches, full_k.to(dtype), full_v.to(dtype), lengths, steps=[100, 1, 60, 7, 200])
    return caches


def _dequantized(c, n):
    return (dequantize(c.k[:, :, :n], c.k_scale[:, :, :n], torch.float64),
            dequantize(c.v[:, :, :n], c.v_scale[:, :, :n], torch.float64))


def _reference(q, dk, dv, pat):
    """(out, lse) in float64 over the dequantized rows, rows end-aligned; lse natural log."""
    mask = oracle.visibility_mask(q, dk, pat)
    hq = q.shape[1]
    k = dk.repeat_interleave(hq // dk.shape[1], dim=1)
    v = dv.repeat_interleave(hq // dv.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def _check(out, lse, q, caches, lengths, pat, what):
    for i, n in enumerate(lengths):
        dk, dv = _dequantized(caches[0], n)
        ref, ref_lse = _reference(q[i:i + 1].double(), dk[i:i + 1], dv[i:i + 1], pat)
        got_lse = lse[i:i + 1].double() / math.log2(math.e) if _lse_base2() else lse[i:i + 1].double()
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(got_lse), seen), f"{what} seq {i}: rows that see no key differ"
        err_lse = (got_lse - ref_lse)[seen].abs().max().item() if seen.any() else 0.0
        assert err_lse <= 2e-4, f"{what} seq {i} (length {n}): lse error {err_lse:.2e}"
        o = out[i:i + 1].double()
        half_ulp = 2.0 ** -8 if out.dtype == torch.bfloat16 else 2.0 ** -11  # the output's rounding, relative
        tol = half_ulp * ref.abs() + 2.0 ** -11 * ref.abs().amax(dim=-1, keepdim=True) + 1e-6
        bad = (o - ref).abs() > tol
        assert not bad.any(), f"{what} seq {i} (length {n}): out error {(o - ref).abs().max().item():.2e}"


_BASE2 = None


def _lse_base2() -> bool:
    """Whether the kernel's lse is in base 2 (it keeps the softmax in base 2); found once by a
    one-key call, whose lse is the key's score."""
    global _BASE2
    if _BASE2 is None:
        c = KVCache(1, 1, 32, 4, dtype=torch.float32, kv_dtype="int8")
        k = torch.full((1, 1, 1, 32), 0.5)
        c.append(k, k, [1])
        q = torch.ones(1, 1, 1, 32)
        _, lse = _decode(q, c, sa.Dense())
        score = float((q.double() * dequantize(c.k[:, :, :1], c.k_scale[:, :, :1], torch.float64)).sum()) * 32 ** -0.5
        _BASE2 = abs(lse.item() - score * math.log2(math.e)) < abs(lse.item() - score)
    return _BASE2


def _arm_build_has_dotprod() -> bool | None:
    """Whether the aarch64 JIT build targets the dot-product extension (sparse_attn/_build/target.py:
    the CPU's features, or SPARSE_ATTN_CPU_TARGET), or None where its flags do not say (-mcpu=...)."""
    from sparse_attn._build.target import target_flags
    march = [f.split("=", 1)[1] for f in target_flags() if f.startswith("-march=")]
    if len(march) != 1 or any(f.startswith("-mcpu") for f in target_flags()):
        return None
    base, *ext = march[0].split("+")
    version = base.removeprefix("armv").removesuffix("-a")
    minor = int(version.split(".")[1]) if version.startswith("8.") and version[2:].isdigit() else 0
    return "nodotprod" not in ext and ("dotprod" in ext or minor >= 4 or version.startswith("9"))  # Armv8.4-A on


def test_int8_dot_is_built_where_the_cpu_has_it():
    """The integer path is compiled in on x86 CPUs with AVX-512 VNNI and BW (the JIT builds with
    -march=native), and on aarch64 where the build targets the dot-product extension (`sdot`: the
    NEON baseline armv8.2-a+fp16+dotprod, which the JIT picks for a CPU with asimddp and asimdhp); a
    build that silently lost it would pass every other test on the float path."""
    machine = os.uname().machine
    if machine in ("aarch64", "arm64"):
        want = _arm_build_has_dotprod()
        if want is None:
            pytest.skip("SPARSE_ATTN_CPU_TARGET names no -march: the build's extensions are not known here")
        if not os.environ.get("SPARSE_ATTN_CPU_TARGET", "").strip():  # chosen from the CPU: asimddp <=> dotprod
            from sparse_attn._build.target import _features
            assert want == ({"asimddp", "asimdhp"} <= _features())
    else:
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        want = " avx512_vnni" in flags and " avx512bw" in flags and machine == "x86_64"
    assert bool(_ext().int8_dot) == want


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("d,gqa", [(32, 16), (64, 4), (128, 4), (128, 3), (256, 1)])
def test_int8_decode_dense_lengths_dims(qdtype, d, gqa):
    # 128 / 256 columns with 3+ query rows per kv head take decode_int8.h's one-pass blocked P . V
    # (3 and 4 rows per group); 32 / 64 columns and fewer rows the passes of pv_int8
    hkv = 2
    for sq in (1, 5, 16):
        lengths = [max(n, sq) for n in LENGTHS]  # causal: a sequence holds at least its query rows
        caches = _caches(len(lengths), hkv, d, lengths, qdtype, pool=16)
        q = randn(len(lengths), hkv * gqa, sq, d).to(qdtype)
        outs = [_decode(q, c, sa.Dense()) for c in caches]
        assert outs[0][0].dtype == qdtype
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), "paged != contiguous"
        _check(*outs[0], q, caches, lengths, sa.Dense(), f"Dense D={d} G={gqa} Sq={sq} {qdtype}")


@pytest.mark.parametrize("kind", ["window", "topk", "blocksparse", "dense_full"])
def test_int8_decode_patterns(kind):
    b, hkv, gqa, d = 4, 2, 4, 64
    lengths = [129, 300, 64, 257]
    if kind == "window":
        pat = sa.SlidingWindow(50, sinks=3)
    elif kind == "topk":
        pat = sa.TopK(2, block_size=16, sink_blocks=1, local_blocks=1)
    elif kind == "blocksparse":
        nb = -(-max(lengths) // 16)
        pat = sa.BlockSparse(torch.rand(b, hkv, nb, nb, generator=torch.Generator().manual_seed(5)) < 0.4,
                             block_size=16)
    else:
        pat = sa.Dense(causal=False)
    for _ in range(20):  # TopK: redraw until the selection does not hang on rounding
        caches = _caches(b, hkv, d, lengths, torch.bfloat16, pool=16)
        q = randn(b, hkv * gqa, 3, d).to(torch.bfloat16)
        if not isinstance(pat, sa.TopK) or all(
                topk_margin(q[i:i + 1].double(), _dequantized(caches[0], n)[0][i:i + 1], pat) > 1e-3
                for i, n in enumerate(lengths)):
            break
    outs = [_decode(q, c, pat) for c in caches]
    assert torch.equal(outs[0][0], outs[1][0]), "paged != contiguous"
    if isinstance(pat, sa.BlockSparse):
        for i, n in enumerate(lengths):  # each sequence's corner of the layout
            nbi = -(-n // 16)
            one = sa.BlockSparse(pat.layout[i:i + 1, :, :nbi, :nbi], block_size=16)
            _check(outs[0][0][i:i + 1], outs[0][1][i:i + 1], q[i:i + 1], [_sub(caches[0], i)], [n], one, kind)
        return
    _check(*outs[0], q, caches, lengths, pat, kind)


class _sub:
    """Sequence i of a contiguous cache, as _check reads it (k, v and their scales)."""
    def __init__(self, c, i):
        self.k, self.v = c.k[i:i + 1], c.v[i:i + 1]
        self.k_scale, self.v_scale = c.k_scale[i:i + 1], c.v_scale[i:i + 1]


def test_int8_decode_nonfinite_rows():
    """A NaN in one q row makes that row NaN only; an infinite key (scale inf, codes NaN -> 0, so
    the dequantized row is NaN) or a NaN value row makes NaN every row of the kv head that sees it,
    and leaves the other kv head finite."""
    b, hkv, gqa, d, n = 1, 2, 4, 64, 200
    caches = _caches(b, hkv, d, [n], torch.bfloat16, pool=16)
    q = randn(b, hkv * gqa, 1, d).to(torch.bfloat16)
    q[0, 1, 0, 5] = float("nan")
    out, _ = _decode(q, caches[0], sa.Dense())
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, torch.arange(8) != 1]).all()
    for which in ("k", "v"):
        cs = _caches(b, hkv, d, [n], torch.bfloat16, pool=16)
        for c in cs:  # key 150 of kv head 0: its scale as an infinite / NaN row stores it
            scale = c.k_scale if which == "k" else c.v_scale
            if isinstance(c, PagedKVCache):
                page = int(c.page_table[0, 150 // c.page_size])
                scale[page, 0, 150 % c.page_size] = float("inf") if which == "k" else float("nan")
            else:
                scale[0, 0, 150] = float("inf") if which == "k" else float("nan")
        q = randn(b, hkv * gqa, 1, d).to(torch.bfloat16)
        for c in cs:
            out, _ = _decode(q, c, sa.Dense())
            assert torch.isnan(out[0, :gqa]).all(), f"a non-finite {which} row must make its kv head's rows NaN"
            assert torch.isfinite(out[0, gqa:]).all()
