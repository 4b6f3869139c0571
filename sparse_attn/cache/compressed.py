"""Running sums of the keys of every `size`-token window at `stride`: InfLLMv2's compressed keys.

InfLLMv2 (contract, "InfLLMv2 semantics") scores `kc[j] = mean(k[j*stride : j*stride + size])` for
every complete window, and the coarse `kc2` (4x both). A cache keeps, per (size, stride) a pattern
has asked for, the running sum of each window `(B, Hkv, n + 1, D)` (slot `n` is a trash slot for
padding rows): an appended key adds itself to the `ceil(size / stride)` windows that hold it, so a
decode step costs O(1) here and the selection reads `n ~ max_len / stride` rows, never K. A window
whose keys are not all in yet holds the sum of those that are: the "pending keys" of the
contract; the selection reads only complete windows (visible ones are complete).

The sums are made the first time a pattern asks (`sums(size, stride, view)`: one pass over the
keys already held, dequantized for a quantized cache), then kept up to date by every append.
Float32 (float64 for a float64 cache), like the TopK block sums.
"""
from __future__ import annotations

import torch


class CompressedKeySums:
    """Per (size, stride): the running window sums of a cache's keys. Owned by the cache."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device):
        self.batch, self.kv_heads, self.head_dim, self.max_len = batch, kv_heads, head_dim, max_len
        self.dtype, self.device = dtype, device
        self._sums: dict[tuple[int, int], torch.Tensor] = {}

    def _zeros(self, size: int, stride: int, max_len: int) -> torch.Tensor:
        # every window that starts below max_len, complete or not, so that growing the capacity
        # (`grow`) finds the early keys of the windows it completes
        n = -(-max_len // stride)
        return torch.zeros(self.batch, self.kv_heads, n + 1, self.head_dim, dtype=self.dtype, device=self.device)

    def sums(self, size: int, stride: int, view) -> torch.Tensor:
        """The window sums `(B, Hkv, ceil(max_len / stride) + 1, D)` (window `j` starts at `j * stride`;
        the last slot is trash), made from the
        keys `view` holds the first time they are asked for (O(held keys), once)."""
        key = (size, stride)
        if key not in self._sums:
            s = self._zeros(size, stride, self.max_len)
            held = view.max_length
            if held:
                k, _ = view.gather(0, held)
                pos = torch.arange(held, device=self.device)[None].expand(self.batch, held)
                valid = pos < view.lengths.long()[:, None]
                self._add_one(s, size, stride, k, pos, valid)
            self._sums[key] = s
        return self._sums[key]

    def add(self, keys: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        """Add appended `keys` `(B, Hkv, T, D)` at positions `pos` `(B, T)` (rows with `valid`
        False are padding) to every window kept."""
        for (size, stride), s in self._sums.items():
            self._add_one(s, size, stride, keys, pos, valid)

    def _add_one(self, s, size, stride, keys, pos, valid):
        trash = s.shape[2] - 1
        b_idx = torch.arange(self.batch, device=self.device)[:, None, None]
        h_idx = torch.arange(self.kv_heads, device=self.device)[None, :, None]
        keys = keys.to(s.dtype)
        for i in range(-(-size // stride)):  # the windows j = pos // stride - i that hold pos
            j = pos // stride - i
            ok = valid & (j >= 0) & (j < trash) & (pos < j * stride + size)
            slot = torch.where(ok, j, torch.full_like(j, trash))
            s.index_put_((b_idx, h_idx, slot[:, None, :]), keys, accumulate=True)

    def grow(self, max_len: int) -> None:
        """New capacity `max_len` (a contiguous cache's `reserve`): the kept sums copied."""
        for key, old in self._sums.items():
            new = self._zeros(*key, max_len)
            used = old.shape[2] - 1
            new[:, :, :used] = old[:, :, :used]
            self._sums[key] = new
        self.max_len = max_len

    def clear(self, b: int) -> None:
        """Sequence `b` restarts empty (a paged cache's `free`)."""
        for s in self._sums.values():
            s[b].zero_()

    def tensors(self) -> list[torch.Tensor]:
        return list(self._sums.values())
