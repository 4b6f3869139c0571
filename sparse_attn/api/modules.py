"""`SparseAttention`: the `nn.Module` for model authors."""
from __future__ import annotations

import torch
from torch import nn

from ..patterns import Pattern, WindowLinear
from .functional import attention


class SparseAttention(nn.Module):
    """Attention with a fixed pattern over SDPA-layout q, k, v (no projections: drop it in where a
    model calls `scaled_dot_product_attention`).

    For `WindowLinear` it owns the learnable per-head gate logits `gate` `(num_heads,)`,
    initialised to 0 (an even mix of the window softmax and the linear memory).
    """

    def __init__(self, pattern: Pattern, *, num_heads: int | None = None, scale: float | None = None,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a sparse_attn pattern, got {type(pattern).__name__}")
        self.pattern = pattern
        self.scale = scale
        self.backend = backend
        if isinstance(pattern, WindowLinear):
            if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
                raise ValueError(f"WindowLinear needs num_heads= (the number of query heads, an int >= 1), "
                                 f"got {num_heads!r}")
            self.gate = nn.Parameter(torch.zeros(num_heads))
        else:
            self.register_parameter("gate", None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gate = None
        if self.gate is not None:
            gate = self.gate if self.gate.device == q.device else self.gate.to(q.device)
        return attention(q, k, v, self.pattern, scale=self.scale, gate=gate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, scale={self.scale}, backend={self.backend!r}"
