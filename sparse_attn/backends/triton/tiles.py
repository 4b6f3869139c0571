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

from dataclasses import dataclass


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


# (compute capability major, head dims up to) -> config; "default" is any other generation
_TABLE = {
    # Hopper (sm90): larger tiles keep the tensor cores busier; 128 rows, 64 keys
    ("sm90", 128): TileConfig(q_block=128, k_block=64, rows=128, block_n=64, num_warps=8, num_stages=3),
    ("sm90", 256): TileConfig(q_block=64, k_block=64, rows=64, block_n=32, num_warps=8, num_stages=2),
    # Ampere / Ada (sm80, sm86, sm89): 64x64 tiles, 4 warps
    ("sm8x", 128): TileConfig(q_block=64, k_block=64, rows=128, block_n=64, num_warps=4, num_stages=2),
    ("sm8x", 256): TileConfig(q_block=64, k_block=64, rows=64, block_n=32, num_warps=4, num_stages=2),
    ("default", 128): TileConfig(q_block=64, k_block=64, rows=64, block_n=64, num_warps=4, num_stages=2),
    ("default", 256): TileConfig(q_block=64, k_block=64, rows=64, block_n=32, num_warps=4, num_stages=1),
}

#: the interpreter (CPU tensors, TRITON_INTERPRET=1): small tiles keep its numpy work short
INTERPRETER = TileConfig(q_block=32, k_block=32, rows=64, block_n=32, num_warps=4, num_stages=1)


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


def tile_config(device_type: str, generation: str, head_dim: int) -> TileConfig:
    """The tile configuration for a device (`DeviceInfo.type`, `.generation`) and padded head dim."""
    if device_type != "cuda":
        return INTERPRETER
    fam = family(generation)
    return _TABLE[(fam, 128 if head_dim <= 128 else 256)]
