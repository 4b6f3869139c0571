"""A small decoder (RoPE, pre-norm, SwiGLU) whose attention is chosen per layer at call time.

Each layer's token mixer is a `Mixer`: dense causal attention by PyTorch's SDPA (how the model is
trained), any sparse_attn softmax pattern through `sparse_attn.attention` (forward and backward
through sparse_attn's kernels), or `sparse_attn.linear_attention` on the same projections (the
linear layers of a linear/softmax hybrid). So one set of weights runs under every pattern, and a
pattern's loss against dense is the pattern's alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import sparse_attn as sa


@dataclass(frozen=True)
class Config:
    vocab: int
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    mlp: int = 256
    rope_base: float = 10000.0
    # RWKV-style token shift: each position's input also gets a learned map of the previous token's
    # embedding, so the keys carry "what came before me" from layer 0 (Olsson et al.'s "smeared
    # keys"): the retrieval circuit then forms in a few hundred steps instead of thousands
    token_shift: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


@dataclass(frozen=True)
class Mixer:
    """How one layer mixes tokens: `kind` "sdpa" (dense causal, PyTorch), "pattern" (`pattern`
    through `sparse_attn.attention`) or "linear" (`sparse_attn.linear_attention` with the layer's
    per-head decay)."""
    kind: str = "sdpa"
    pattern: object = None

    def __str__(self):
        return {"sdpa": "dense(sdpa)", "linear": "linear"}.get(self.kind, repr(self.pattern))


DENSE = Mixer()


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of `x` `(B, H, S, D)` at positions 0..S-1 (pairs (i, i + D/2))."""
    s, d = x.shape[2], x.shape[3]
    inv = base ** (-torch.arange(0, d // 2, dtype=torch.float32, device=x.device) * 2 / d)
    ang = torch.arange(s, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Layer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.d_model, cfg.heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        # mlp=0: attention only (the task needs no MLP; it costs half the training time)
        self.up = nn.Linear(d, 2 * cfg.mlp, bias=False) if cfg.mlp else None
        self.down = nn.Linear(cfg.mlp, d, bias=False) if cfg.mlp else None
        # used only by the WindowLinear and linear mixers (dense training leaves them untouched):
        # WindowLinear's gate logits (0: an even mix, sparse_attn's default) and the linear
        # layer's per-head log-decays, RetNet-style 0.999 .. 0.9 over the heads
        self.gate = nn.Parameter(torch.zeros(h))
        target = torch.linspace(math.log(-math.log(0.999)), math.log(-math.log(0.9)), h).exp()
        self.decay_logit = nn.Parameter(torch.log(torch.expm1(target)))

    def qkv_heads(self, x: torch.Tensor):
        """x `(B, S, d)` -> q, k, v `(B, H, S, D)`, RoPE applied to q and k."""
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.cfg.heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        return rope(q, self.cfg.rope_base), rope(k, self.cfg.rope_base), v

    def mix(self, q, k, v, mixer: Mixer) -> torch.Tensor:
        """Attention output `(B, H, S, D)` of one layer under `mixer`."""
        if mixer.kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if mixer.kind == "linear":
            return sa.linear_attention(q, k, v, decay=-F.softplus(self.decay_logit))
        gate = self.gate if isinstance(mixer.pattern, sa.WindowLinear) else None
        return sa.attention(q, k, v, mixer.pattern, gate=gate)

    def forward(self, x, mixer: Mixer, capture: list | None = None):
        q, k, v = self.qkv_heads(x)
        o = self.mix(q, k, v, mixer)
        if capture is not None:
            capture.append((q.detach(), k.detach(), v.detach(), o.detach()))
        b, _, s, _ = o.shape
        x = x + self.out(o.transpose(1, 2).reshape(b, s, -1))
        if self.up is None:
            return x
        a, g = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * a)


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.shift = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.token_shift else None
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, mixers=None, capture: list | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens `(B, S)` -> logits `(B, S, vocab)`, or only at `positions` `(B, P)` -> `(B, P, vocab)`
        (the head over every position of a 16K sequence would be most of the evaluation's memory).
        `mixers`: one `Mixer` per layer (default dense SDPA everywhere); `capture` collects each
        layer's `(q, k, v, out)`."""
        mixers = mixers or [DENSE] * len(self.layers)
        x = self.embed(tokens)
        if self.shift is not None:
            x = x + self.shift(F.pad(x, (0, 0, 1, 0))[:, :-1])
        for layer, m in zip(self.layers, mixers):
            x = layer(x, m, capture)
        if positions is not None:
            x = torch.gather(x, 1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.norm(x))
