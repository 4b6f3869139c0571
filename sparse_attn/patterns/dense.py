"""Dense attention: every key (causal=False) or every key at or before the query (causal=True)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, causal_pairs


@dataclass(frozen=True)
class Dense(Pattern):
    """All keys `j <= p` for the query at absolute position `p` (all keys if `causal=False`)."""

    causal: bool = True

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"Dense(causal=...) must be a bool, got {type(self.causal).__name__}")

    def token_mask(self, qpos, kpos, **ctx):
        if not self.causal:
            return torch.ones(qpos.shape[0], kpos.shape[0], dtype=torch.bool, device=qpos.device)
        return kpos[None, :] <= qpos[:, None]

    def is_dense_causal_for(self, sq, sk):
        return self.causal

    def visited_pairs(self, sq, sk):
        return causal_pairs(sq, sk) if self.causal else float(sq * sk)
