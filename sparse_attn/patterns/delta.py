"""Internal problem marker for `delta_rule` (not a user-facing pattern), and the recurrence's work.

Like `LinearAttention`, it lets the delta rule's kernels go through the scheduler: they declare
`patterns = (DeltaRule,)`, and the problem carries the decay kind. It also states the recurrence's
arithmetic (FLOPs of the chunked and the step-by-step forms, bytes read), so that a kernel's cost
is the marker's work at the kernel's efficiency (backends/recurrence.py): the next recurrence is
one more marker of this shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Pattern

DECAY_KINDS = ("none", "per-token", "per-channel")


@dataclass(frozen=True)
class DeltaRule(Pattern):
    decay: str = "none"  # "none", "per-token" (Gated DeltaNet) or "per-channel" (KDA)
    qk_l2norm: bool = False

    def visited_pairs(self, sq, sk):
        return float(sq)  # a state update per token; kernels estimate their own FLOPs

    def describe(self):
        return f"delta_rule(decay={self.decay}{', qk_l2norm' if self.qk_l2norm else ''})"

    # ------------------------------------------------------------------ the recurrence's work
    @staticmethod
    def chunked_flops(p, chunk: int) -> float:
        """FLOPs of the chunked (WY / UT-transform) form with chunks of `chunk` tokens, per value
        head and token: the state products `W S`, `Q S`, `K^T U` (3 D Dv multiply-adds), the chunk's
        triangles `K K^T`, `Q K^T` (D each), the solve applied to `[V, K]` (D + Dv) and `P U` (Dv),
        each over ~C / 2 keys, and the C x C triangular inverse (C^2 / 6)."""
        c = max(1, min(chunk, max(p.sq, 1)))
        d, dv = p.head_dim, p.v_head_dim
        per_token = 3 * d * dv + c / 2 * (3 * d + 2 * dv) + c * c / 6
        return 2.0 * per_token * p.batch * p.q_heads * max(p.sq, 1)

    @staticmethod
    def step_flops(p) -> float:
        """FLOPs of the step-by-step form: `S'^T k`, the rank-1 update and `S^T q` (3 D Dv
        multiply-adds per token) plus the decay's scaling of S."""
        return 2.0 * (3.5 * p.head_dim * p.v_head_dim) * p.batch * p.q_heads * max(p.sq, 1)

    @staticmethod
    def state_bytes(p) -> float:
        """The float32 states `(B, Hv, D, Dv)` (read once, written once)."""
        return 8.0 * p.batch * p.q_heads * p.head_dim * p.v_head_dim

    @staticmethod
    def io_bytes(p, elem: int) -> float:
        """q, k (Hk heads), v, o (Hv heads), beta and a decay per token."""
        s = max(p.sq, 1)
        return elem * p.batch * s * (2 * p.kv_heads * p.head_dim + 2 * p.q_heads * p.v_head_dim) \
            + 8.0 * p.batch * p.q_heads * s
