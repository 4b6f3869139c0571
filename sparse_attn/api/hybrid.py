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

What the cache keeps per layer (`HybridCache.nbytes()` counts it):
- linear layer: the `(B, H, D, Dv)` state (constant); a delta-rule layer (`linear_kind="delta"`,
  Gated DeltaNet) likewise;
- `SlidingWindow(window, sinks)`: the sinks' K/V and the last `window - 1` tokens' (constant), the
  keys any later query can see. They are stored back to back, so a key's index is no longer its
  position; the window rule is relative to the end of the keys and the sinks are the first
  `sinks` indices whenever a token was dropped, so attention over the kept keys sees exactly the
  keys the full sequence would;
- `WindowLinear(window, sinks)`: a `WindowLinearDecoder` (the sinks, at most `window` tokens and
  the `(M, z)` memory of the evicted ones; constant). Decode and continuation chunks run its
  reference code (`backend` applies to the prefill only);
- `Dense`, `BlockSparse`, `TopK`: the full K/V (grows with the context).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.reference.window_linear import WindowLinearDecoder
from ..patterns import Dense, Pattern, SlidingWindow, WindowLinear
from .functional import attention
from .delta import delta_rule
from .linear import linear_attention


class HybridCache:
    """Decode state of a hybrid stack, per layer: the `(B, H, D, Dv)` float32 state of a linear
    layer; `(K, V)` `(B, Hkv, n, D)` of a softmax layer, all tokens for `Dense` / `BlockSparse` /
    `TopK`, `min(sinks, S) + min(window - 1, max(0, S - sinks))` for `SlidingWindow`; a
    `WindowLinearDecoder` for `WindowLinear`. `length` is the tokens seen so far."""

    def __init__(self, n_layers: int):
        self.entries: list = [None] * n_layers
        self.length = 0

    def __len__(self):
        return len(self.entries)

    def nbytes(self) -> int:
        """Bytes the cache pins: the whole storage behind each held tensor, each storage once."""
        storages = {}
        for e in self.entries:
            held = e.tensors() if isinstance(e, WindowLinearDecoder) else (e if isinstance(e, tuple) else (e,))
            for t in held:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    storages[(str(t.device), st.data_ptr())] = st.nbytes()
        return sum(storages.values())


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

    def forward(self, x: torch.Tensor, cache: HybridCache | None = None, layer_idx: int | None = None):
        """x `(B, S, hidden)` -> `(B, S, hidden)`. With `cache`, continues from (and updates) entry
        `layer_idx`: the same result as running the whole sequence at once."""
        b, s, _ = x.shape
        delta = self.kind == "delta"
        q = self._heads(self.q_proj(x), self.hkv if delta else self.h)
        k = self._heads(self.k_proj(x), self.hkv)
        v = self._heads(self.v_proj(x), self.h if delta else self.hkv)
        entry = cache.entries[layer_idx] if cache is not None else None
        if delta:  # the state lives in the cache like a linear layer's: (B, H, D, D) float32
            beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2).to(q.dtype)
            decay = -F.softplus(self.g_proj(x)).transpose(1, 2).to(q.dtype)
            o, state = delta_rule(q, k, v, beta, decay=decay, initial_state=entry, return_state=True,
                                  qk_l2norm=True, backend=self.backend)
            if cache is not None:
                cache.entries[layer_idx] = state
        elif self.kind == "linear":
            if self.decay_kind == "per-head":
                decay = -F.softplus(self.decay_logit).to(q.dtype)
            elif self.decay_kind == "per-token":
                decay = -F.softplus(self.g_proj(x)).transpose(1, 2).to(q.dtype)  # (B, H, S)
            else:
                decay = None
            o, state = linear_attention(q, k, v, decay=decay, initial_state=entry, return_state=True,
                                        backend=self.backend)
            if cache is not None:
                cache.entries[layer_idx] = state
        elif isinstance(self.pattern, WindowLinear) and cache is not None:
            if entry is None:
                o = attention(q, k, v, self.pattern, gate=self.gate, backend=self.backend)
                cache.entries[layer_idx] = WindowLinearDecoder.from_prefill(k, v, self.pattern, gate=self.gate)
            else:
                entry.gate = self.gate
                o = entry.extend(q, k, v)
        else:
            if entry is not None:
                k = torch.cat([entry[0], k], dim=2)
                v = torch.cat([entry[1], v], dim=2)
            o = attention(q, k, v, self.pattern, gate=self.gate, backend=self.backend)
            if cache is not None:
                cache.entries[layer_idx] = self._kept_kv(k, v)
        return x + self.o_proj(o.transpose(1, 2).reshape(b, s, self.h * self.d))

    def _kept_kv(self, k, v):
        """The K/V a softmax layer keeps for later tokens. `SlidingWindow`: the sinks (the first
        `min(sinks, n)` kept keys: either no token was dropped yet, or the sinks are all there)
        and the last `window - 1` of the rest, in a fresh tensor (a slice would pin the old one)."""
        if not isinstance(self.pattern, SlidingWindow):
            return k, v
        n = k.shape[2]
        ns = min(self.pattern.sinks, n)
        start = max(ns, n - (self.pattern.window - 1))
        if start == ns:
            return k, v
        return (torch.cat([k[:, :, :ns], k[:, :, start:]], dim=2),
                torch.cat([v[:, :, :ns], v[:, :, start:]], dim=2))

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

    def new_cache(self) -> HybridCache:
        return HybridCache(len(self))

    def kinds(self) -> list[str]:
        return [layer.kind for layer in self]

    def forward(self, x: torch.Tensor, cache: HybridCache | None = None) -> torch.Tensor:
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
