"""Tile configurations of the Triton attention kernels, per GPU generation.

A fixed table, not `triton.autotune`: the kernels' grids depend on the layout's tiles (chosen in
`prepare`, before any launch), and autotuning a block size would change the layout. None of the
numbers below has been measured yet (no GPU was available when they were written); they follow
the usual FlashAttention-2 choices for Triton: 64-128 query rows per program, 64-key chunks, fewer
keys per chunk for head dims above 128 so Q, K, V and the accumulator fit in registers / shared
memory.

(`triton.autotune(cache_results=...)` exists in Triton 3.9; if a later change adds autotuning,
guard that keyword with `inspect.signature(triton.autotune)` since Triton 3.6 was not checked.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TileConfig:
    #: query tile of Dense / SlidingWindow layouts (BlockSparse / TopK use the pattern's block)
    q_block: int
    #: key block of Dense / SlidingWindow layouts
    k_block: int
    #: query rows one program holds at most (heads of a GQA group x query positions)
    rows: int
    #: keys per inner step (a key block is walked in chunks of this many keys)
    block_n: int
    num_warps: int
    num_stages: int
    #: the backward kernels' rows / keys per step / warps / stages (None: the forward's); they hold
    #: q, dO, dq or k, v, dk, dv and four (rows x keys) float32 tiles, so they need smaller tiles
    bwd: "TileConfig | None" = None


def _bwd(rows, block_n, num_warps, num_stages):
    return TileConfig(q_block=0, k_block=0, rows=rows, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


# (compute capability family, head dims up to) -> config; "default" is any other generation.
# Checked by `python -m bench.gpu_static` (docs/perf/2026-12-02-gpu-static.md): no spill at head dim
# <= 128 and shared memory within the limit on sm_80 (checked against sm86 / sm89's 99 KB) and sm_90.
# What it found in the first table (2026-12-02): the sm8x forward with 4 warps for 128 rows spilled
# (255 registers + 8..264 bytes), and the backward with the forward's 128 x 64 tiles spilled up to
# 16 KB per thread and needed up to 329 KB of shared memory; hence 8 warps and the `bwd` tiles.
_TABLE = {
    # Hopper (sm90): larger tiles keep the tensor cores busier; 128 rows, 64 keys
    ("sm90", 128): TileConfig(q_block=128, k_block=64, rows=128, block_n=64, num_warps=8, num_stages=3,
                              bwd=_bwd(32, 32, 8, 2)),
    ("sm90", 256): TileConfig(q_block=64, k_block=64, rows=64, block_n=32, num_warps=8, num_stages=2,
                              bwd=_bwd(32, 32, 8, 1)),
    # Ampere / Ada (sm80, sm86, sm89): 64 x 64 tiles (sm86 / sm89 have 99 KB of shared memory)
    ("sm8x", 128): TileConfig(q_block=64, k_block=64, rows=128, block_n=64, num_warps=8, num_stages=2,
                              bwd=_bwd(64, 32, 8, 2)),
    ("sm8x", 256): TileConfig(q_block=64, k_block=64, rows=64, block_n=32, num_warps=4, num_stages=2,
                              bwd=_bwd(32, 32, 4, 1)),
    ("default", 128): TileConfig(q_block=64, k_block=64, rows=64, block_n=64, num_warps=4, num_stages=2,
                                 bwd=_bwd(64, 32, 4, 1)),
    ("default", 256): TileConfig(q_block=64, k_block=64, rows=64, block_n=32, num_warps=4, num_stages=1,
                                 bwd=_bwd(32, 32, 4, 1)),
}

#: the interpreter (CPU tensors, TRITON_INTERPRET=1): small tiles keep its numpy work short
INTERPRETER = TileConfig(q_block=32, k_block=32, rows=64, block_n=32, num_warps=4, num_stages=1)


def backward_config(cfg: TileConfig) -> TileConfig:
    """The tiles of the backward kernels (rows, keys per step, warps, stages)."""
    return cfg.bwd if cfg.bwd is not None else cfg


def family(generation: str) -> str:
    """"sm90" -> "sm90", "sm80"/"sm86"/"sm89" -> "sm8x", anything else -> "default"."""
    if generation == "sm90":
        return "sm90"
    if generation in ("sm80", "sm86", "sm87", "sm89"):
        return "sm8x"
    return "default"


def dense_q_block(cfg: TileConfig, group: int) -> int:
    """Query tile of Dense / SlidingWindow layouts: small enough that all `group` heads of a GQA
    group fit in one program's `rows` (so each K/V chunk is loaded once per group), >= 16."""
    gp = 1 << max(0, group - 1).bit_length()
    return max(16, min(cfg.q_block, cfg.rows // gp))


def tile_config(device_type: str, generation: str, head_dim: int, elem_bytes: int = 2) -> TileConfig:
    """The tile configuration for a device (`DeviceInfo.type`, `.generation`), padded head dim and
    input element size: 4-byte (float32) inputs halve the rows and keys per step (and so the shared
    memory of the staged K / V tiles and the registers of Q and the accumulator), the backward's
    rows by four (its float32 dk / dv and q / dO tiles spilled at half)."""
    if device_type != "cuda":
        return INTERPRETER
    cfg = _TABLE[(family(generation), 128 if head_dim <= 128 else 256)]
    if elem_bytes <= 2:
        return cfg
    bwd = backward_config(cfg)
    return replace(cfg, rows=max(32, cfg.rows // 2), block_n=max(16, cfg.block_n // 2),
                   bwd=replace(bwd, rows=max(16, bwd.rows // 4), block_n=max(16, bwd.block_n // 2)))
