"""Per-token top-k block selection (NSA / MoBA / Quest style), causal and decode-consistent."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, _check_int, window_pairs


@dataclass(frozen=True)
class TopK(Pattern):
    """Each query token sees the key blocks it selects (contract, "TopK selection").

    Per query token at position `p` (block `pb = p // block_size`), shared by the query heads of
    one kv head: the `sink_blocks` first blocks, the `local_blocks` blocks ending at `pb` (the
    query's own block is always in), plus the `topk` highest-scoring earlier blocks, where a block's
    score is the group-averaged dot product of the query with the block's mean key. Inside the
    visited blocks the usual causal rule `j <= p` applies.
    """

    topk: int
    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1

    def __post_init__(self):
        _check_int("TopK.topk", self.topk, minimum=0)
        _check_int("TopK.block_size", self.block_size, minimum=1)
        _check_int("TopK.sink_blocks", self.sink_blocks, minimum=0)
        _check_int("TopK.local_blocks", self.local_blocks, minimum=1)

    def clamped(self, sk, *, keep_block_size=False):
        # one block of sk keys holds them all; counts of blocks beyond ceil(sk / bs) select them all
        bs = self.block_size if keep_block_size else min(self.block_size, max(sk, 1))
        nb = -(-max(sk, 0) // bs)
        new = (bs, min(self.topk, nb), min(self.sink_blocks, nb), min(self.local_blocks, max(nb, 1)))
        if new == (self.block_size, self.topk, self.sink_blocks, self.local_blocks):
            return self
        return TopK(new[1], block_size=new[0], sink_blocks=new[2], local_blocks=new[3])

    @property
    def blocks_per_query(self) -> int:
        """Most key blocks any query visits."""
        return self.sink_blocks + self.local_blocks + self.topk

    def forced_block_mask(self, qblock, kblock):
        """Bool `(len(qblock), len(kblock))`: sink or local blocks (no selection needed)."""
        qb = qblock[:, None]
        kb = kblock[None, :]
        return (kb <= qb) & ((kb < self.sink_blocks) | (kb > qb - self.local_blocks))

    def token_mask(self, qpos, kpos, *, selected=None, **ctx):
        """`selected`: bool `(B, Hkv, len(qpos), nblocks)` from the selection (see selection.py)."""
        bs = self.block_size
        qb, kb = qpos // bs, kpos // bs
        causal = kpos[None, :] <= qpos[:, None]
        forced = self.forced_block_mask(qb, kb) & causal
        if selected is None:
            return forced
        return forced | (selected.index_select(-1, kb) & causal)

    def is_dense_causal_for(self, sq, sk):
        if sk == 0:
            return True
        last_block = (sk - 1) // self.block_size
        candidates = last_block - self.local_blocks + 1 - self.sink_blocks
        return candidates <= self.topk

    def visited_pairs(self, sq, sk):
        return window_pairs(sq, sk, self.blocks_per_query * self.block_size, 0)

    def key_block(self, default):
        return self.block_size

    def pool_block(self):
        return self.block_size

    def candidate_blocks(self, qpos, num_blocks, key_block, *, selected=None):
        blocks = torch.arange(num_blocks, device=qpos.device)
        pb = (qpos // self.block_size)[..., None]  # (B, Sq, 1)
        forced = ((blocks <= pb) & ((blocks < self.sink_blocks) | (blocks > pb - self.local_blocks)))[:, None]
        return forced if selected is None else forced | selected
