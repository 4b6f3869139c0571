"""`SparseAttention`: the `nn.Module` for model authors."""
from __future__ import annotations

import torch
from torch import nn

from ..patterns import Pattern, WindowLinear
from ..scheduler.problem import check_softcap
from .functional import attention


class SparseAttention(nn.Module):
    """Attention with a fixed pattern over SDPA-layout q, k, v (no projections: drop it in where a
    model calls `scaled_dot_product_attention`).

    For `WindowLinear` it owns the learnable per-head gate logits `gate` `(num_heads,)`,
    initialised to 0 (an even mix of the window softmax and the linear memory).
    With `sinks=True` (softmax patterns) it owns learnable per-head sink logits `sink_logits`
    `(num_heads,)` (GPT-OSS), initialised to 0; `softcap` (float > 0) caps the scores (Gemma 2).
    """

    def __init__(self, pattern: Pattern, *, num_heads: int | None = None, scale: float | None = None,
                 backend: str | None = None, sinks: bool = False, softcap: float | None = None):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a sparse_attn pattern, got {type(pattern).__name__}")
        self.pattern = pattern
        self.scale = scale
        self.backend = backend
        self.softcap = check_softcap(softcap)
        if isinstance(pattern, WindowLinear) and (sinks or softcap is not None):
            raise ValueError("sinks and softcap apply to the softmax patterns (Dense, SlidingWindow, BlockSparse, "
                             "TopK), not to WindowLinear")
        if isinstance(pattern, WindowLinear) or sinks:
            if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
                what = "WindowLinear" if isinstance(pattern, WindowLinear) else "sinks=True"
                raise ValueError(f"{what} needs num_heads= (the number of query heads, an int >= 1), "
                                 f"got {num_heads!r}")
        if isinstance(pattern, WindowLinear):
            self.gate = nn.Parameter(torch.zeros(num_heads))
        else:
            self.register_parameter("gate", None)
        if sinks:
            self.sink_logits = nn.Parameter(torch.zeros(num_heads))
        else:
            self.register_parameter("sink_logits", None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gate = sinks = None
        if self.gate is not None:
            gate = self.gate if self.gate.device == q.device else self.gate.to(q.device)
        if self.sink_logits is not None:
            sinks = self.sink_logits if self.sink_logits.device == q.device else self.sink_logits.to(q.device)
        return attention(q, k, v, self.pattern, scale=self.scale, gate=gate, backend=self.backend,
                         sink_logits=sinks, softcap=self.softcap)

    def extra_repr(self) -> str:
        extra = (", sinks=True" if self.sink_logits is not None else "") + (
            f", softcap={self.softcap}" if self.softcap is not None else "")
        return f"pattern={self.pattern!r}, scale={self.scale}, backend={self.backend!r}{extra}"
