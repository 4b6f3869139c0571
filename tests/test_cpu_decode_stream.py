"""The decode kernel's stream prefetch (csrc/cpu/stream_ahead.h): while the direct products read a
contiguous cache's run of keys, rows a few KB further on are asked for. Only where memory is
touched changes: with the stream on (any distance) or off, and with the prefetches forced on or
off, the outputs are the same bits, and they meet the contract against the float64 evaluation --
bf16 K/V on AMX tiles and on vector products, int8 and fp8 caches, Dense (one run after another),
a window with sinks (a run that does not continue the last: the pacer instead) and TopK, lengths
that are not multiples of 16 keys or of a run, GQA with Sq 2. The setting's default (on for Intel
CPUs), its environment variable and its bad input are checked too.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import needs_jit, make_qkv_for
from sparse_attn.cache.quant import dequantize

pytestmark = needs_jit


def _ext():
    from sparse_attn.backends.cpu import decode
    return decode._ext()


@pytest.fixture
def restore():
    """Restore the process's stream distance and AMX switch after a test changes them."""
    ext = _ext()
    ahead, amx = ext.stream_ahead(), ext.amx_enabled()
    yield ext
    ext.set_stream_ahead(ahead)
    ext.set_amx(amx)


def _pattern(kind):
    return {"dense": sa.Dense(), "window": sa.SlidingWindow(2300, sinks=4),
            "topk": sa.TopK(6, block_size=64)}[kind]


def _run(q, view, pattern, d, prefetch):
    from sparse_attn.backends.cpu.decode import _decode_fwd, selection_over_cache
    pat, token_index = selection_over_cache(q, view, pattern)
    return _decode_fwd(q, view.k, view.v, pat, scale=d ** -0.5, token_index=token_index, lengths=view.lengths,
                       k_scale=view.k_scale, v_scale=view.v_scale, prefetch=prefetch)[0]


PRODUCTS = ["bf16-amx", "bf16-vector", "int8", "fp8_e4m3"]


def select_products(ext, products):
    """Switch the bf16 products to tiles / vectors as `products` says, or skip where this build or
    CPU has none (int8 / fp8 need nothing)."""
    if products.startswith("bf16"):
        if not ext.bf16_dot:
            pytest.skip("no bf16 dot products in this build: bfloat16 decodes in float32 (no stream)")
        if products == "bf16-amx" and not ext.amx_built:
            pytest.skip("this CPU / build has no AMX tiles")
        ext.set_amx(products == "bf16-amx")
        if products == "bf16-amx" and not ext.amx_enabled():
            pytest.skip("Linux refused this process AMX tiles (arch_prctl)")


@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("kind", ["dense", "window", "topk"])
def test_same_bits_and_contract(restore, products, kind):
    ext = restore
    select_products(ext, products)
    kv_dtype = None if products.startswith("bf16") else products
    b, hq, hkv, sq, sk, d = 2, 8, 2, 2, 4133, 64  # 4133: runs of 2048 keys and a ragged tail
    pattern = _pattern(kind)
    q, k, v = make_qkv_for(pattern, b, hq, hkv, sq, sk, d, d, dtype=torch.bfloat16)
    cache = sa.KVCache(b, hkv, d, sk, dtype=torch.bfloat16, kv_dtype=kv_dtype)
    cache.append(k, v)
    view = cache.kv_view()
    outs = []
    for ahead in (0, 8192, 256, 65536):  # off, the Intel default, 2 keys ahead (the minimum), far
        ext.set_stream_ahead(ahead)
        outs += [_run(q, view, pattern, d, prefetch) for prefetch in (1, 0)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    if kv_dtype is not None:  # the contract over the dequantized rows
        k = dequantize(cache.k[:, :, :sk], cache.k_scale[:, :, :sk], torch.float64)
        v = dequantize(cache.v[:, :, :sk], cache.v_scale[:, :, :sk], torch.float64)
    ref = sa.attention(q.double(), k.double(), v.double(), pattern, scale=d ** -0.5, backend="reference")
    oracle.assert_close_contract(outs[0], ref, dtype=torch.bfloat16, device="cpu")


def test_set_stream_ahead_checks(restore):
    ext = restore
    ext.set_stream_ahead(4096)
    assert ext.stream_ahead() == 4096
    ext.set_stream_ahead(0)
    assert ext.stream_ahead() == 0
    with pytest.raises(ValueError, match="bytes"):
        ext.set_stream_ahead(-1)
    assert ext.stream_ahead() == 0


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):  # x86 only
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def test_environment_and_default():
    """SPARSE_ATTN_CPU_STREAM_AHEAD sets the distance at start; unset, 8192 bytes on Intel CPUs,
    0 elsewhere (measured: decode_plan.h / stream_ahead.h)."""
    code = "from sparse_attn.backends.cpu import decode as d; print(d._ext().stream_ahead())"

    def start(value, stderr=None):
        env = dict(os.environ)
        env.pop("SPARSE_ATTN_CPU_STREAM_AHEAD", None)
        if value is not None:
            env["SPARSE_ATTN_CPU_STREAM_AHEAD"] = value
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        if stderr is not None:
            stderr.append(res.stderr)
        return int(res.stdout.split()[-1])

    assert start("0") == 0
    assert start("12288") == 12288
    said = []  # not a number: the default, and the variable named on stderr (not silently 0)
    assert start("8k", said) == start(None)
    assert "SPARSE_ATTN_CPU_STREAM_AHEAD" in said[0] and "'8k'" in said[0]
    vendor = _cpu_vendor()
    if vendor:  # the default, where this test can tell the CPU's vendor
        assert start(None) == (8192 if vendor == "GenuineIntel" else 0)


def test_bench_script_runs(capsys):
    """bench/cpu_decode_ab.py at a small size: a row per cache, the same bits both ways."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import cpu_decode_ab

    assert cpu_decode_ab.main(["--context", "3000", "--kinds", "bf16", "int8", "--rounds", "2", "--reps", "2",
                               "--evict-mb", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "each after reading 16 MiB" in out[0], out[0]
    rows = [line for line in out if line.startswith("| bf16") or line.startswith("| int8")]
    assert len(rows) == 2 and all(row.rstrip(" |").endswith("True") for row in rows), rows
