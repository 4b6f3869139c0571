"""Quantized KV storage (contract, "Quantized KV caches"): one float32 scale per (token, kv head).

A row `x` (one token's key or value of one kv head, `D` elements) is stored as
`round(x / s)` clamped to `[-127, 127]` (int8) or `float8_e4m3fn(x / s)` (fp8), with
`s = max|x| / 127` (int8) or `max|x| / 448` (fp8), and `s = 1` for an all-zero row. Attention over
such a cache means attention over the dequantized rows `stored * s`: the storage's rounding is the
only error quantization adds (the bench measures it; no kernel tolerance hides it).

`quantize_rows_torch` is the definition in PyTorch (any device); on the CPU the cache's
`quantize_rows` calls the C++ version in the decode extension (`quantize_rows`,
csrc/cpu/decode_binding.cpp and quant_rows.h: one pass per row, parallel over rows), which gives the
same bits (tests/test_quant_cache.py). Where that extension cannot be built (no compiler,
SPARSE_ATTN_DISABLE_JIT=1; said once on stderr and in every plan's explain()), the definition
quantizes: the same bits, slower.
"""
from __future__ import annotations

import torch

#: kv_dtype -> (storage dtype, largest stored magnitude)
KV_DTYPES = {"int8": (torch.int8, 127.0), "fp8_e4m3": (torch.float8_e4m3fn, 448.0)}


def check_kv_dtype(kv_dtype) -> str | None:
    """`None` or one of `KV_DTYPES`; anything else raises naming `kv_dtype`."""
    if kv_dtype is None or (isinstance(kv_dtype, str) and kv_dtype in KV_DTYPES):
        return kv_dtype
    raise ValueError(f"kv_dtype must be None or one of {tuple(KV_DTYPES)}, got {kv_dtype!r}")


def storage_dtype(kv_dtype: str) -> torch.dtype:
    return KV_DTYPES[kv_dtype][0]


def bytes_per_element(kv_dtype: str | None, dtype: torch.dtype, head_dim: int) -> float:
    """Bytes one K or V element costs to read: 1 plus the row's scale spread over the row when
    quantized, else the dtype's size."""
    if kv_dtype is None:
        return torch.finfo(dtype).bits / 8
    return 1.0 + 4.0 / max(1, head_dim)


def quantize_rows_torch(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `(..., D)` -> `(codes (..., D) in the storage dtype, scales float32 (...))`. The contract's
    definition, in float32 (a float64 row is rounded to float32 first)."""
    sdt, qmax = KV_DTYPES[kv_dtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / qmax)
    y = xf / scale[..., None]
    if kv_dtype == "int8":
        codes = torch.round(y).clamp_(-qmax, qmax).to(sdt)
    else:  # x / s may round a hair past 448: saturate rather than let the cast make NaN
        codes = y.clamp(-qmax, qmax).to(sdt)
    return codes, scale


def quantize_rows(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """As `quantize_rows_torch`; on the CPU by the decode extension (one vectorised pass)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.numel():
        # the cache imports no backend; the build helper is not one
        from .._build import ExtensionBuildError, load_extension

        try:
            ext = load_extension("cpu_decode")
        except ExtensionBuildError:  # the definition gives the same bits
            return quantize_rows_torch(x, kv_dtype)
        return tuple(ext.quantize_rows(x, kv_dtype == "fp8_e4m3"))
    return quantize_rows_torch(x, kv_dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`codes (..., D)` times `scale (...)`, in `dtype` (float32, or float64 for exact checks)."""
    return codes.to(dtype) * scale.to(dtype)[..., None]
