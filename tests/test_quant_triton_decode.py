"""The Triton split-KV decode kernel over quantized caches (int8 / fp8_e4m3 codes + row scales),
against the float64 evaluation over the dequantized rows: every pattern, contiguous and paged caches
with ragged lengths, Sq 1 and 3, GQA, an odd head dim. Triton's interpreter on CPU-only machines."""
from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from conftest import TRITON_DEVICE, make_pattern, pattern_on
from sparse_attn.cache import attention_with_cache
from test_quant_cache import _build, _check_rows

pytestmark = pytest.mark.gpu  # what `bash bench/gpu_check.sh` runs on a GPU machine (`-m gpu`)

DEV = TRITON_DEVICE
CASES = [("dense_causal", "int8", 0, 64), ("dense_full", "fp8_e4m3", 1, 80), ("window_sinks", "fp8_e4m3", 2, 64),
         ("window", "int8", 1, 20), ("blocksparse", "int8", 2, 64), ("topk", "fp8_e4m3", 0, 128),
         ("topk_wide", "int8", 1, 64)]


@pytest.mark.parametrize("kind,kv_dtype,cache,d", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_quantized_cache_decode_matches_oracle(kind, kv_dtype, cache, d):
    b, hkv, gqa = 3, 2, 1 + cache  # GQA 1, 2, 3
    lengths, max_len = [37, 81, 64], 96
    pat = make_pattern(kind, b=b, hkv=hkv, sk=max_len, bs=16)
    caches, dk, dv, q = _build(pat, kv_dtype, b, hkv * gqa, hkv, d, lengths, max_len, torch.float32, (1, 3),
                               steps=[30, 1, 50], device=DEV)
    c = caches[cache]  # contiguous, paged by 8, paged by 24
    for sq in (1, 3):
        qs = q[:, :, -sq:]
        plan = sa.plan_with_cache(qs.to(DEV), c, pattern_on(pat, DEV), backend="triton")
        assert plan.kernel.name == "triton.splitkv_decode", plan.explain()
        out = attention_with_cache(qs.to(DEV), c, pattern_on(pat, DEV), backend="triton").cpu()
        _check_rows(out, qs, dk, dv, lengths, pat, f"triton {kv_dtype} {kind} Sq={sq}", device=DEV)
