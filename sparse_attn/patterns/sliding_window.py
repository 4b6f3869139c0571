"""Sliding-window attention with optional attention sinks (StreamingLLM)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, _check_int, window_pairs


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Key `j` is visible to the query at position `p` if `j <= p` and (`p - j < window` or `j < sinks`).

    `window` counts the query's own key: `SlidingWindow(W)` equals FlashAttention's
    `window_size=(W - 1, 0)` and a `transformers` config's `sliding_window=W`.
    """

    window: int
    sinks: int = 0

    def __post_init__(self):
        _check_int("SlidingWindow.window", self.window, minimum=1)
        _check_int("SlidingWindow.sinks", self.sinks, minimum=0)

    def clamped(self, sk, *, keep_block_size=False):
        # a window of sk keys already sees every causal key (p - j <= sk - 1); sinks past sk are keys
        # that do not exist
        w, s = min(self.window, max(sk, 1)), min(self.sinks, max(sk, 0))
        return self if (w, s) == (self.window, self.sinks) else SlidingWindow(w, s)

    def key_range(self, p_lo, p_hi, sk):
        return max(0, p_lo - self.window + 1), min(sk, p_hi)

    def sink_tokens(self, sk):
        return min(self.sinks, sk)

    def token_mask(self, qpos, kpos, **ctx):
        q = qpos[:, None]
        k = kpos[None, :]
        return (k <= q) & ((q - k < self.window) | (k < self.sinks))

    def is_dense_causal_for(self, sq, sk):
        # hidden keys of the query at p are j in [sinks, p - window]; the last query has p = sk - 1
        return sk - 1 - self.window < self.sinks

    def visited_pairs(self, sq, sk):
        return window_pairs(sq, sk, self.window, self.sinks)

    def token_rule(self):
        return True, self.window, self.sinks

    def candidate_blocks(self, qpos, num_blocks, key_block, *, selected=None):
        blocks = torch.arange(num_blocks, device=qpos.device)
        first = (torch.clamp(qpos - self.window + 1, min=0) // key_block)[..., None]  # (B, Sq, 1)
        last = (qpos // key_block)[..., None]
        rows = (blocks <= last) & ((blocks >= first) | (blocks * key_block < self.sinks))
        return rows[:, None]
