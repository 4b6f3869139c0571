"""What every attention pattern shares: a frozen description of which keys a query may see.

A pattern only *describes* visibility (the contract's table). Kernels never evaluate it token by
token except on the partial blocks of a :class:`~sparse_attn.layout.BlockLayout`; the reference
backend evaluates it through :meth:`Pattern.token_mask` on one chunk of queries at a time.
"""
from __future__ import annotations

import torch


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class Pattern:
    """Base class of the frozen pattern dataclasses (`Dense`, `SlidingWindow`, ...)."""

    #: True if some key must be hidden from some query by position (everything but Dense(causal=False)).
    causal: bool = True

    def key_range(self, p_lo: int, p_hi: int, sk: int) -> tuple[int, int]:
        """Half-open range of keys that queries at absolute positions [p_lo, p_hi) can see,
        ignoring sinks (sinks are handled by :meth:`sink_tokens`). Host integers only."""
        return 0, min(sk, p_hi) if self.causal else sk

    def sink_tokens(self, sk: int) -> int:
        """Number of leading keys that are always visible (besides key_range)."""
        return 0

    def token_mask(self, qpos: torch.Tensor, kpos: torch.Tensor, **ctx) -> torch.Tensor:
        """Bool mask `(..., len(qpos), len(kpos))` of visible (query, key) pairs at absolute positions."""
        raise NotImplementedError

    def is_dense_causal_for(self, sq: int, sk: int) -> bool:
        """True when, for these lengths, the pattern sees exactly the keys dense causal sees.
        Decided from host integers only; the scheduler uses it to route to dense kernels."""
        return False

    def visited_pairs(self, sq: int, sk: int) -> float:
        """Estimate of the number of visible (query, key) pairs, per (batch, head); host-only."""
        raise NotImplementedError

    def clamped(self, sk: int, *, keep_block_size: bool = False) -> "Pattern":
        """The same pattern for keys `[0, sk)` with every integer parameter clamped to what the
        sequence can mean (contract: `SlidingWindow(2**62)` is dense causal, `TopK(topk=2**31)`
        selects every causal block), so kernels never allocate by, nor pass to C++, a parameter's
        face value. `keep_block_size`: leave `block_size` as is (a cache pools keys by it)."""
        return self

    def describe(self) -> str:
        return repr(self)

    # ---- what block-wise kernels (decode work lists, caches) ask the pattern ----------------
    def token_rule(self) -> tuple[bool, int, int]:
        """`(causal, window, sinks)`: the per-token rule a kernel applies inside the key blocks it
        visits; `window = 0` means none."""
        return self.causal, 0, 0

    def key_block(self, default: int) -> int:
        """Key-block size of block-wise work: the pattern's own blocks (BlockSparse, TopK), else `default`."""
        return default

    def pool_block(self) -> int | None:
        """Block size of the pooled key means this pattern's selection reads from a cache (TopK),
        or None when it selects nothing."""
        return None

    def candidate_blocks(self, qpos: torch.Tensor, num_blocks: int, key_block: int, *,
                         selected: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bool `(B or 1, Hkv or 1, Sq, num_blocks)`: the key blocks that query rows at absolute
        positions `qpos` `(B or 1, Sq)` may visit, before the token rule; None = every block (below
        each sequence's length). `selected`: a selecting pattern's choice as bool
        `(B, Hkv, Sq, num_blocks)` (TopK). Built on the device, no host synchronisation."""
        return None


def causal_pairs(sq: int, sk: int) -> float:
    """Number of (query, key) pairs dense causal attention visits with end-aligned queries."""
    # query t sees Sk - Sq + t + 1 keys
    first = sk - sq + 1
    return sq * (first + sk) / 2.0


def window_pairs(sq: int, sk: int, window: int, sinks: int) -> float:
    """Visible pairs of SlidingWindow(window, sinks), exactly, with host arithmetic."""
    total = 0.0
    # Row with position p sees min(p+1, window) window keys, plus sinks below the window.
    p0 = sk - sq
    p1 = sk - 1
    if sq == 0:
        return 0.0
    # part where p + 1 <= window  (p <= window - 1)
    a_hi = min(p1, window - 1)
    if a_hi >= p0:
        n = a_hi - p0 + 1
        total += n * ((p0 + 1) + (a_hi + 1)) / 2.0
    b_lo = max(p0, window)
    if p1 >= b_lo:
        n = p1 - b_lo + 1
        total += n * window
        # sinks not already inside the window: j < sinks and j <= p - window
        if sinks > 0:
            for_p = lambda p: min(sinks, p - window + 1)
            # average over a linear-then-flat function; exact enough as a sum of two pieces
            c_hi = min(p1, sinks + window - 1)
            if c_hi >= b_lo:
                m = c_hi - b_lo + 1
                total += m * (for_p(b_lo) + for_p(c_hi)) / 2.0
            if p1 > c_hi:
                total += (p1 - max(c_hi, b_lo - 1)) * sinks
    return total
