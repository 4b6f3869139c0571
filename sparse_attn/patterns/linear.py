"""Internal problem marker for `linear_attention` (not a user-facing pattern).

It lets linear-attention kernels go through the same scheduler as softmax kernels: they declare
`patterns = (LinearAttention,)` and the problem carries the decay kind.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Pattern


@dataclass(frozen=True)
class LinearAttention(Pattern):
    decay: str = "none"  # "none", "per-head" or "per-token"

    def visited_pairs(self, sq, sk):
        return float(sq)  # state-space cost per token; kernels estimate their own FLOPs

    def describe(self):
        return f"linear_attention(decay={self.decay})"
