"""InfLLM-V2: the trainable, parameter-free block selection MiniCPM4 / MiniCPM4.1 were trained with.

The contract's section "InfLLMv2 semantics" fixes the meaning. Once a row's blocks are selected, the
attention is TopK's: forced blocks (the init blocks and the local window) that a whole query tile
shares, plus per-token selected blocks. So the pattern describes itself to the attention kernels as
that TopK (`attention_view()`); only the selection (layout/infllmv2_selection.py, csrc/cpu/
infllmv2_select.cpp) is its own. Kernels never run TopK's selection on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, _check_int, window_pairs
from .dense import Dense
from .topk import TopK

VARIANTS = ("minicpm4.1", "minicpm4")
NORMALIZERS = ("coarse", "exact")
_DEFAULT_TOPK = {"minicpm4.1": 96, "minicpm4": 64}
_DEFAULT_NORMALIZER = {"minicpm4.1": "coarse", "minicpm4": "exact"}


@dataclass(frozen=True)
class InfLLMv2(Pattern):
    """Each query token sees the 64-token blocks InfLLM-V2 selects for it (contract, "InfLLMv2 semantics").

    Per (batch, kv head, query token at position `p`, block `qb = p // block_size`): compressed keys
    are the means of `kernel_size`-token windows at stride `kernel_stride` (and coarse ones 4x both);
    per query head a softmax-like score of every visible compressed key (normalised by the coarse
    keys' logsumexp, `normalizer="coarse"`, or the fine ones', `"exact"`), summed over the GQA group,
    max-pooled onto blocks; then the init blocks, the local window and the best-scoring earlier blocks.
    Below `dense_len` total keys the call is dense causal attention (`dense_len=-1`: never).

    `topk=None` and `normalizer=None` take the variant's defaults (96 / "coarse" for "minicpm4.1",
    64 / "exact" for "minicpm4"); they are resolved at construction, so `InfLLMv2() == InfLLMv2(topk=96)`.
    """

    topk: int | None = None
    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    local_blocks: int = 32
    dense_len: int = 8192
    normalizer: str | None = None
    variant: str = "minicpm4.1"

    def __post_init__(self):
        if not isinstance(self.variant, str) or self.variant not in VARIANTS:
            raise ValueError(f"InfLLMv2.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.topk is None:
            object.__setattr__(self, "topk", _DEFAULT_TOPK[self.variant])
        if self.normalizer is None:
            object.__setattr__(self, "normalizer", _DEFAULT_NORMALIZER[self.variant])
        if not isinstance(self.normalizer, str) or self.normalizer not in NORMALIZERS:
            raise ValueError(f"InfLLMv2.normalizer must be None or one of {NORMALIZERS}, got {self.normalizer!r}")
        _check_int("InfLLMv2.topk", self.topk, minimum=0)
        _check_int("InfLLMv2.block_size", self.block_size, minimum=1)
        _check_int("InfLLMv2.kernel_size", self.kernel_size, minimum=1)
        _check_int("InfLLMv2.kernel_stride", self.kernel_stride, minimum=1)
        _check_int("InfLLMv2.init_blocks", self.init_blocks, minimum=0)
        # "minicpm4"'s window qb - L < b <= qb must hold the query's own block
        _check_int("InfLLMv2.local_blocks", self.local_blocks, minimum=1 if self.variant == "minicpm4" else 0)
        _check_int("InfLLMv2.dense_len", self.dense_len, minimum=-1)
        if self.block_size % self.kernel_stride != 0:
            raise ValueError(f"InfLLMv2.block_size ({self.block_size}) must be a multiple of "
                             f"InfLLMv2.kernel_stride ({self.kernel_stride}): kernels are max-pooled onto blocks")

    # ---- the parts of the rule, as host integers ------------------------------------------------
    @property
    def pool_ratio(self) -> int:
        """`r = block_size // kernel_stride`: block `b` pools kernels `j in [r*b - 1, r*b + r)`."""
        return self.block_size // self.kernel_stride

    @property
    def forced_init(self) -> int:
        """Init blocks that are always in: all of them ("minicpm4.1"), at most `topk` ("minicpm4",
        where they count towards `topk`)."""
        return self.init_blocks if self.variant == "minicpm4.1" else min(self.init_blocks, self.topk)

    @property
    def window_blocks(self) -> int:
        """Blocks of the local window ending at the query's own block (inclusive)."""
        return self.local_blocks + 1 if self.variant == "minicpm4.1" else self.local_blocks

    def attention_view(self) -> TopK:
        """The TopK whose forced blocks are this pattern's and whose per-token list has room for
        this pattern's selection: what the block-sparse attention kernels run once it is made."""
        return TopK(self.topk, block_size=self.block_size, sink_blocks=self.forced_init,
                    local_blocks=max(1, self.window_blocks))

    def extra_blocks(self, qb: torch.Tensor) -> torch.Tensor:
        """How many blocks the scores pick for rows of query block `qb` (tensor, any shape), beyond
        the forced ones: `topk` minus the forced blocks it counts."""
        i, w = self.forced_init, self.window_blocks
        before_window = torch.clamp(qb - w + 1, min=0)  # blocks 0 .. qb - w
        init_counted = torch.clamp(before_window, max=i)
        if self.variant == "minicpm4.1":  # topk counts every forced block
            return torch.clamp(self.topk - init_counted - torch.clamp(qb + 1, max=w), min=0)
        return self.topk - init_counted  # counts the init blocks only; the window is added

    def is_sparse_call(self, sk: int) -> bool:
        """The switch: a call with `sk` keys in all is sparse iff `sk >= dense_len` (or `dense_len == -1`)."""
        return self.dense_len == -1 or sk >= self.dense_len

    # ---- Pattern ------------------------------------------------------------------------------
    def clamped(self, sk, *, keep_block_size=False):
        # below dense_len, or where every row would select all its causal blocks, it IS dense causal
        if self.is_dense_causal_for(min(sk, 1), sk) and sk > 0 and not keep_block_size:
            return Dense()
        nb = -(-max(sk, 0) // self.block_size)
        new = dict(topk=min(self.topk, nb), init_blocks=min(self.init_blocks, nb),
                   local_blocks=min(self.local_blocks, max(nb, 1)))
        if all(getattr(self, f) == v for f, v in new.items()):
            return self
        return InfLLMv2(**{**self.__dict__, **new})

    def token_mask(self, qpos, kpos, *, selected=None, **ctx):
        return self.attention_view().token_mask(qpos, kpos, selected=selected)

    def is_dense_causal_for(self, sq, sk):
        if sk == 0 or not self.is_sparse_call(sk):
            return True
        # the last row has the most candidates and the fewest picks (both monotone in qb)
        qb = (sk - 1) // self.block_size
        candidates = max(0, qb - self.window_blocks + 1 - self.forced_init)
        return candidates <= int(self.extra_blocks(torch.tensor(qb)))

    def visited_pairs(self, sq, sk):
        if self.is_dense_causal_for(sq, sk):
            return Dense().visited_pairs(sq, sk)
        blocks = self.topk + (self.window_blocks if self.variant == "minicpm4" else 0)
        return window_pairs(sq, sk, max(blocks, self.window_blocks) * self.block_size, 0)

    def key_block(self, default):
        return self.block_size

    def candidate_blocks(self, qpos, num_blocks, key_block, *, selected=None):
        return self.attention_view().candidate_blocks(qpos, num_blocks, key_block, selected=selected)
