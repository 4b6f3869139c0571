"""Block-sparse attention from a user-given block layout (BigBird / Longformer style masks)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, _check_int, causal_pairs


@dataclass(frozen=True, eq=False)
class BlockSparse(Pattern):
    """Key `j` is visible to the query at position `p` if `j <= p` and `layout[b, hkv, p // bs, j // bs]`.

    `layout` is a bool tensor of shape `(B or 1, Hkv or 1, ceil(Sk/bs), ceil(Sk/bs))`, indexed by
    absolute positions (so a decode step reads row `(Sk - 1) // bs`). Rows with no visible key
    output zeros.
    """

    layout: torch.Tensor
    block_size: int = 64

    def __post_init__(self):
        if not isinstance(self.layout, torch.Tensor):
            raise TypeError(f"BlockSparse.layout must be a torch.Tensor, got {type(self.layout).__name__}")
        if self.layout.dtype != torch.bool:
            raise TypeError(f"BlockSparse.layout must have dtype torch.bool, got {self.layout.dtype}")
        if self.layout.dim() != 4:
            raise ValueError(
                "BlockSparse.layout must be 4-D (B or 1, Hkv or 1, ceil(Sk/bs), ceil(Sk/bs)), "
                f"got shape {tuple(self.layout.shape)}")
        _check_int("BlockSparse.block_size", self.block_size, minimum=1)

    def clamped(self, sk, *, keep_block_size=False):
        # a block of sk keys holds them all: the layout keeps its (1 x 1) shape
        bs = self.block_size if keep_block_size else min(self.block_size, max(sk, 1))
        return self if bs == self.block_size else BlockSparse(self.layout, block_size=bs)

    def token_mask(self, qpos, kpos, **ctx):
        bs = self.block_size
        blk = self.layout.index_select(2, qpos // bs).index_select(3, kpos // bs)
        return blk & (kpos[None, :] <= qpos[:, None])

    def known_density(self) -> float | None:
        """Fraction of causal blocks set, when it can be read without a device sync (CPU layout)."""
        if self.layout.device.type != "cpu":
            return None
        n = self.layout.shape[-1]
        causal_blocks = n * (n + 1) / 2
        if causal_blocks == 0:
            return 1.0
        lower = torch.tril(self.layout.to(torch.int32)).sum(dim=(-1, -2)).float().mean().item()
        return min(1.0, lower / causal_blocks)

    def visited_pairs(self, sq, sk):
        d = self.known_density()
        return causal_pairs(sq, sk) * (1.0 if d is None else d)

    def key_block(self, default):
        return self.block_size

    def candidate_blocks(self, qpos, num_blocks, key_block, *, selected=None):
        lay = self.layout.to(qpos.device)[:, :, :, :num_blocks]  # (B', H', NBq, N)
        b = max(lay.shape[0], qpos.shape[0])
        lay = lay.expand(b, -1, -1, -1)
        qb = (qpos // self.block_size).expand(b, -1)[:, None, :, None].expand(b, lay.shape[1], -1, lay.shape[3])
        return torch.gather(lay, 2, qb)  # row p // bs of the layout for each query row

    def __repr__(self):
        return f"BlockSparse(layout={tuple(self.layout.shape)} bool, block_size={self.block_size})"
