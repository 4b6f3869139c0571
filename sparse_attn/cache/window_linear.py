"""Fixed-size decode storage of one `WindowLinear` layer: the sinks' K/V, a ring of the last
`window` tokens' K/V, and the linear memory `(M, z)` of the tokens the window evicted.

Storage only: no kernel here. A step kernel (op "window_linear_step") reads and updates these
tensors in place, told which slots by `StepSlots`; `sparse_attn.api.window_linear` drives it.

Positions: the sinks are tokens `[0, min(sinks, length))` at sink slots `0, 1, ...`; the ring
holds the `ring_count` tokens `[length - ring_count, length)` (all at positions `>= sinks`), the
oldest at slot `ring_start`, the next ones at the following slots modulo the ring's capacity;
`(M, z)` sums `phi(k_j) v_j^T` and `phi(k_j)` over the tokens between (evicted, not sinks).

Memory: the ring and the sink buffer grow by doubling up to `window` and `sinks` tokens (a
parameter's face value is never allocated: `WindowLinear(2**40)` on a short context holds what
the context needs); once the context passes `sinks + window` nothing is allocated again, so the
bytes are constant at any context length (`nbytes()`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..scheduler.device import check_device

_MIN_CAPACITY = 16


class StepSlots(NamedTuple):
    """What one decode step reads and writes (host integers, no device value)."""
    n_sinks: int     # sinks the new token's query sees, besides itself
    ring_start: int  # first ring slot it sees (the oldest token still in the window)
    ring_count: int  # ring slots it sees from ring_start on (modulo capacity), besides itself
    evict_slot: int  # ring slot whose token leaves the window at this step (-> M, z), or -1
    new_slot: int    # ring slot the new token is written to, or -1
    new_sink: int    # sink slot the new token is written to, or -1

    @property
    def visible(self) -> int:
        """Keys the softmax part sees at this step, the new token included."""
        return self.n_sinks + self.ring_count + 1


def _grown(old: int, need: int, limit: int) -> int:
    """Capacity for `need` tokens: `old` if it holds them, else doubled (at least `need`), at most `limit`."""
    return old if need <= old else min(limit, max(need, 2 * old, _MIN_CAPACITY))


class WindowLinearState:
    """Storage of one layer: `sink_k`/`sink_v` `(B, Hkv, sink capacity, D / Dv)` and `ring_k`/`ring_v`
    `(B, Hkv, ring capacity, D / Dv)` in the inputs' dtype, `M` `(B, Hkv, D, Dv)` and `z`
    `(B, Hkv, D)` in float32 (float64 for float64 inputs). Every tensor is contiguous and owns its
    storage; steps write into them in place."""

    def __init__(self, *, window: int, sinks: int, batch: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, device):
        self.window, self.sinks = window, sinks
        self.batch, self.kv_heads, self.head_dim, self.v_head_dim = batch, kv_heads, head_dim, v_head_dim
        self.dtype, self.device = dtype, check_device(device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.sink_k, self.sink_v = self._kv(0)
        self.ring_k, self.ring_v = self._kv(0)
        self.M = torch.zeros(batch, kv_heads, head_dim, v_head_dim, dtype=acc, device=self.device)
        self.z = torch.zeros(batch, kv_heads, head_dim, dtype=acc, device=self.device)
        self.length = 0
        self.ring_start = 0
        self.ring_count = 0

    def _kv(self, n: int):
        b, h = self.batch, self.kv_heads
        return (torch.empty(b, h, n, self.head_dim, dtype=self.dtype, device=self.device),
                torch.empty(b, h, n, self.v_head_dim, dtype=self.dtype, device=self.device))

    # ------------------------------------------------------------------------------ inspection
    @property
    def n_sinks(self) -> int:
        return min(self.sinks, self.length)

    @property
    def ring_capacity(self) -> int:
        return self.ring_k.shape[2]

    def cached_tokens(self) -> int:
        return self.n_sinks + self.ring_count

    def tensors(self) -> list:
        return [self.sink_k, self.sink_v, self.ring_k, self.ring_v, self.M, self.z]

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def sinks_kv(self):
        """Views of the sinks' K/V `(B, Hkv, n_sinks, *)`."""
        ns = self.n_sinks
        return self.sink_k[:, :, :ns], self.sink_v[:, :, :ns]

    def _ring_order(self, start: int, count: int) -> list:
        """(first, last) slot ranges of `count` ring slots from `start`, in position order."""
        cap = self.ring_capacity
        if count == 0:
            return []
        end = start + count
        return [(start, min(end, cap))] + ([(0, end - cap)] if end > cap else [])

    def window_kv(self):
        """The ring's tokens in position order, `(B, Hkv, ring_count, *)` (a copy when the ring wraps)."""
        parts = self._ring_order(self.ring_start, self.ring_count)
        if not parts:
            return self.ring_k[:, :, :0], self.ring_v[:, :, :0]
        if len(parts) == 1:
            a, b = parts[0]
            return self.ring_k[:, :, a:b], self.ring_v[:, :, a:b]
        return (torch.cat([self.ring_k[:, :, a:b] for a, b in parts], dim=2),
                torch.cat([self.ring_v[:, :, a:b] for a, b in parts], dim=2))

    def visible_ring(self, slots: StepSlots):
        """(first, last) ring slot ranges a step's query sees, the new token's slot included."""
        parts = self._ring_order(slots.ring_start, slots.ring_count)
        if slots.new_slot >= 0:
            parts.append((slots.new_slot, slots.new_slot + 1))
        return parts

    # --------------------------------------------------------------------------------- capacity
    def _grow_ring(self, need: int):
        cap = _grown(self.ring_capacity, need, self.window)
        if cap <= self.ring_capacity:
            return
        k, v = self.window_kv()
        nk, nv = self._kv(cap)
        nk[:, :, :self.ring_count] = k
        nv[:, :, :self.ring_count] = v
        self.ring_k, self.ring_v, self.ring_start = nk, nv, 0

    def _grow_sinks(self, need: int):
        cap = _grown(self.sink_k.shape[2], need, self.sinks)
        if cap <= self.sink_k.shape[2]:
            return
        ns = self.n_sinks
        nk, nv = self._kv(cap)
        nk[:, :, :ns] = self.sink_k[:, :, :ns]
        nv[:, :, :ns] = self.sink_v[:, :, :ns]
        self.sink_k, self.sink_v = nk, nv

    # ------------------------------------------------------------------------------------ steps
    def next_slots(self) -> StepSlots:
        """The slots of the next one-token step (capacity reserved; counters unchanged until
        `commit(slots)`)."""
        p = self.length
        if p < self.sinks:
            self._grow_sinks(p + 1)
            return StepSlots(p, 0, 0, -1, -1, p)
        if self.ring_count < self.window:
            self._grow_ring(self.ring_count + 1)
            slot = (self.ring_start + self.ring_count) % self.ring_capacity
            return StepSlots(self.sinks, self.ring_start, self.ring_count, -1, slot, -1)
        s = self.ring_start  # full ring (capacity == window): its oldest token leaves, the new one takes its slot
        return StepSlots(self.sinks, (s + 1) % self.ring_capacity, self.ring_count - 1, s, s, -1)

    def commit(self, slots: StepSlots):
        """Advance the counters past a step that wrote `slots`."""
        if slots.evict_slot >= 0:
            self.ring_start = (self.ring_start + 1) % self.ring_capacity
        elif slots.new_slot >= 0:
            self.ring_count += 1
        self.length += 1

    # ---------------------------------------------------------------------- whole-window writes
    def set_window(self, k, v, *, length: int):
        """Replace the ring by the tokens `k`/`v` `(B, Hkv, n, *)`, `n <= window`, the last `n` of a
        history of `length` tokens."""
        n = k.shape[2]
        if n > self.window:
            raise ValueError(f"the window holds at most {self.window} tokens, got {n}")
        if n > self.ring_capacity:
            self.ring_count = 0
            self._grow_ring(n)
        self.ring_k[:, :, :n] = k
        self.ring_v[:, :, :n] = v
        self.ring_start, self.ring_count, self.length = 0, n, length

    def reset(self, k, v, *, memory):
        """The state after the whole history `k`/`v` `(B, Hkv, S, *)`: its sinks, its last
        `window - 1` tokens in the ring (the next token completes the window), `memory` = (M, z)
        over the tokens between (computed by the caller)."""
        s = k.shape[2]
        ns = min(self.sinks, s)
        keep = max(ns, s - (self.window - 1))
        self.length = 0
        self.ring_count = 0
        self._grow_sinks(ns)
        self.sink_k[:, :, :ns] = k[:, :, :ns]
        self.sink_v[:, :, :ns] = v[:, :, :ns]
        self._grow_ring(min(self.window, s - keep + 1))
        self.set_window(k[:, :, keep:], v[:, :, keep:], length=s)
        self.M.copy_(memory[0])
        self.z.copy_(memory[1])
