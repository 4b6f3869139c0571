"""Hybrid stacks for model authors: linear-attention layers mixed with softmax (dense or sparse)
layers at a chosen ratio, and one cache object that serves both kinds during decode.

    layers = hybrid_layers(8, hidden=1024, num_heads=16, num_kv_heads=4, ratio="3:1",
                           softmax_pattern=TopK(16, block_size=64))
    cache = layers.new_cache()
    y = layers(x_prompt, cache=cache)           # prefill: fills K/V (softmax) and states (linear)
    y1 = layers(x_next_token, cache=cache)      # decode: one token, same result as a full forward

Each layer is a token mixer with a residual: `x + W_o attention(W_q x, W_k x, W_v x)`; norms and
MLPs are the model's own business. Linear layers use `linear_attention` with a learnable per-head
log-decay (`"per-head"`, RetNet style) or a per-token one from a projection of `x` (`"per-token"`,
Mamba2 / simple-GLA style), or none; softmax layers use `attention` with any pattern
(`WindowLinear` gets its learnable per-head gate).

The cache is a :class:`~sparse_attn.api.model_cache.ModelCache` (`HybridCache` is its old
name): per layer, the `(B, H, D, Dv)` state of a linear layer (constant, updated in place), a
`KVCache` for `Dense` / `BlockSparse` / `TopK` (grows with the context), a `RingKVCache` of
`sinks + window` tokens for `SlidingWindow` and a `WindowLinearDecoder` for `WindowLinear`
(both constant); `nbytes()` counts it. Every step goes through the scheduler.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..patterns import Dense, Pattern, WindowLinear
from .functional import attention
from .delta import delta_rule
from .linear import linear_attention
from .model_cache import ModelCache


#: the old name of the model cache
HybridCache = ModelCache


def _check_int(name, x, minimum=1):
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}")


class HybridAttentionLayer(nn.Module):
    """One token-mixing layer, `kind` "linear" or "softmax", with projections and a residual."""

    def __init__(self, hidden: int, num_heads: int, *, kind: str, num_kv_heads: int | None = None,
                 head_dim: int | None = None, softmax_pattern: Pattern = Dense(), decay: str | None = "per-head",
                 backend: str | None = None):
        """`kind` "linear" (`linear_attention`), "delta" (`delta_rule`, Gated DeltaNet style: q/k
        with `num_kv_heads` heads, v with `num_heads`, beta = sigmoid of a projection, per-token
        decays -softplus of a projection, qk_l2norm) or "softmax"."""
        super().__init__()
        _check_int("hidden", hidden)
        _check_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        head_dim = hidden // num_heads if head_dim is None else head_dim
        _check_int("head_dim", head_dim)
        if kind not in ("linear", "softmax", "delta"):
            raise ValueError(f"kind must be 'linear', 'delta' or 'softmax', got {kind!r}")
        if decay not in (None, "per-head", "per-token"):
            raise ValueError(f"decay must be None, 'per-head' or 'per-token', got {decay!r}")
        if kind == "softmax" and not isinstance(softmax_pattern, Pattern):
            raise TypeError(f"softmax_pattern must be a sparse_attn pattern, got {type(softmax_pattern).__name__}")
        self.kind, self.h, self.hkv, self.d = kind, num_heads, num_kv_heads, head_dim
        self.pattern = softmax_pattern if kind == "softmax" else None
        self.decay_kind = decay if kind == "linear" else None
        self.backend = backend
        delta = kind == "delta"
        self.q_proj = nn.Linear(hidden, (num_kv_heads if delta else num_heads) * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, (num_heads if delta else num_kv_heads) * head_dim, bias=False)
        self.register_module("b_proj", nn.Linear(hidden, num_heads, bias=True) if delta else None)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.register_parameter("decay_logit", None)
        self.register_module("g_proj", None)
        self.register_parameter("gate", None)
        if self.decay_kind == "per-head":  # log-decay = -softplus(logit): decays 0.999 .. 0.9 over heads
            target = torch.linspace(math.log(-math.log(0.999)), math.log(-math.log(0.9)), num_heads).exp()
            self.decay_logit = nn.Parameter(torch.log(torch.expm1(target)))
        elif self.decay_kind == "per-token" or delta:
            self.g_proj = nn.Linear(hidden, num_heads, bias=True)
        if isinstance(self.pattern, WindowLinear):
            self.gate = nn.Parameter(torch.zeros(num_heads))

    def _heads(self, x, n):
        b, s, _ = x.shape
        return x.view(b, s, n, self.d).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: ModelCache | None = None, layer_idx: int | None = None):
        """x `(B, S, hidden)` -> `(B, S, hidden)`. With `cache`, continues from (and updates) entry
        `layer_idx`: the same result as running the whole sequence at once."""
        b, s, _ = x.shape
        delta = self.kind == "delta"
        q = self._heads(self.q_proj(x), self.hkv if delta else self.h)
        k = self._heads(self.k_proj(x), self.hkv)
        v = self._heads(self.v_proj(x), self.h if delta else self.hkv)
        if delta:  # Gated DeltaNet: sigmoid write strength, per-token log-decays, normalised q/k
            beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2).to(q.dtype)
            decay = -F.softplus(self.g_proj(x)).transpose(1, 2).to(q.dtype)
            if cache is not None:
                o = cache.delta(layer_idx, q, k, v, beta, decay=decay, qk_l2norm=True, backend=self.backend)
            else:
                o = delta_rule(q, k, v, beta, decay=decay, qk_l2norm=True, backend=self.backend)
        elif self.kind == "linear":
            if self.decay_kind == "per-head":
                decay = -F.softplus(self.decay_logit).to(q.dtype)
            elif self.decay_kind == "per-token":
                decay = -F.softplus(self.g_proj(x)).transpose(1, 2).to(q.dtype)  # (B, H, S)
            else:
                decay = None
            if cache is not None:
                o = cache.linear(layer_idx, q, k, v, decay=decay, backend=self.backend)
            else:
                o = linear_attention(q, k, v, decay=decay, backend=self.backend)
        elif cache is not None:
            o = cache.attend(layer_idx, q, k, v, self.pattern, gate=self.gate, backend=self.backend)
        else:
            o = attention(q, k, v, self.pattern, gate=self.gate, backend=self.backend)
        return x + self.o_proj(o.transpose(1, 2).reshape(b, s, self.h * self.d))

    def extra_repr(self):
        what = (f"pattern={self.pattern!r}" if self.kind == "softmax" else
                "Gated DeltaNet" if self.kind == "delta" else f"decay={self.decay_kind!r}")
        return f"kind={self.kind!r}, heads={self.h}, kv_heads={self.hkv}, head_dim={self.d}, {what}"


def parse_ratio(ratio) -> tuple[int, int]:
    """"3:1" -> (3 linear, 1 softmax) per period."""
    if isinstance(ratio, str):
        parts = ratio.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            a, b = int(parts[0]), int(parts[1])
            if a + b > 0:
                return a, b
    raise ValueError(f"ratio must be 'L:S' with L linear and S softmax layers per period (e.g. '3:1'), "
                     f"got {ratio!r}")


class HybridStack(nn.ModuleList):
    """The layers of `hybrid_layers`, callable as a stack: `stack(x, cache=None)`."""

    def new_cache(self, *, max_len: int | None = None, page_size: int | None = None) -> ModelCache:
        """An empty :class:`ModelCache` for this stack (arguments as `ModelCache`'s)."""
        return ModelCache(len(self), max_len=max_len, page_size=page_size)

    def kinds(self) -> list[str]:
        return [layer.kind for layer in self]

    def forward(self, x: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        for i, layer in enumerate(self):
            x = layer(x, cache=cache, layer_idx=i)
        if cache is not None:
            cache.length += x.shape[1]
        return x


def hybrid_layers(n_layers: int, *, hidden: int, num_heads: int, num_kv_heads: int | None = None,
                  head_dim: int | None = None, ratio: str = "3:1", softmax_pattern: Pattern = Dense(),
                  decay: str | None = "per-head", backend: str | None = None,
                  linear_kind: str = "linear") -> HybridStack:
    """A stack of `n_layers` token mixers: per period of `L + S` layers (`ratio="L:S"`), `L`
    linear-attention layers then `S` softmax layers of `softmax_pattern` ("3:1": layers 3, 7, ...
    are softmax; "0:1": all softmax; "1:0": all linear). `linear_kind="delta"` makes the linear
    layers delta-rule layers (Qwen3-Next's Gated DeltaNet: `delta_rule` with sigmoid beta,
    per-token decays and qk_l2norm; `decay` is then not used)."""
    _check_int("n_layers", n_layers)
    if linear_kind not in ("linear", "delta"):
        raise ValueError(f"linear_kind must be 'linear' or 'delta', got {linear_kind!r}")
    a, b = parse_ratio(ratio)
    kinds = [linear_kind if i % (a + b) < a else "softmax" for i in range(n_layers)]
    return HybridStack([HybridAttentionLayer(hidden, num_heads, kind=kd, num_kv_heads=num_kv_heads,
                                             head_dim=head_dim, softmax_pattern=softmax_pattern, decay=decay,
                                             backend=backend) for kd in kinds])
