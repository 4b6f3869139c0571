"""Sliding-window softmax attention mixed with a linear memory of the tokens the window evicted."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Pattern, _check_int, window_pairs
from .sliding_window import SlidingWindow


@dataclass(frozen=True)
class WindowLinear(Pattern):
    """`o_t = sigmoid(gate_h) * A_t + (1 - sigmoid(gate_h)) * L_t` (contract, "the hybrid").

    `A_t` is the `SlidingWindow(window, sinks)` output and `L_t = phi(q)^T M / phi(q)^T z` the
    linear attention (`phi = elu + 1`) over the keys `j <= p` that the window does not see
    (`L_t = 0` when there are none). `gate` is a `(Hq,)` tensor passed as `attention(..., gate=)`.
    """

    window: int
    sinks: int = 0

    def __post_init__(self):
        _check_int("WindowLinear.window", self.window, minimum=1)
        _check_int("WindowLinear.sinks", self.sinks, minimum=0)

    def clamped(self, sk, *, keep_block_size=False):
        w, s = min(self.window, max(sk, 1)), min(self.sinks, max(sk, 0))
        return self if (w, s) == (self.window, self.sinks) else WindowLinear(w, s)

    @property
    def softmax_part(self) -> SlidingWindow:
        return SlidingWindow(self.window, self.sinks)

    def key_range(self, p_lo, p_hi, sk):
        return self.softmax_part.key_range(p_lo, p_hi, sk)

    def sink_tokens(self, sk):
        return self.softmax_part.sink_tokens(sk)

    def token_mask(self, qpos, kpos, **ctx):
        return self.softmax_part.token_mask(qpos, kpos)

    def visited_pairs(self, sq, sk):
        return window_pairs(sq, sk, self.window, self.sinks)

    def token_rule(self):
        return self.softmax_part.token_rule()

    def candidate_blocks(self, qpos, num_blocks, key_block, *, selected=None):
        return self.softmax_part.candidate_blocks(qpos, num_blocks, key_block)
