"""Hugging Face `transformers` integration: a sparse_attn pattern as an `attn_implementation`.

    import sparse_attn as sa
    from sparse_attn.integrations.transformers import register_transformers

    register_transformers("sparse_attn_topk", sa.TopK(topk=16, block_size=64))
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="sparse_attn_topk")
    # or, on a loaded model: model.set_attn_implementation("sparse_attn_topk")

`register_transformers` registers two functions under the name: the attention function with
`transformers.AttentionInterface` and a mask function with `AttentionMaskInterface` (so the
model hands over the 2-D padding mask, or None, instead of building a `Sq x Sk` mask).

What the attention function does with transformers' call:

* layout `(B, H, S, D)` in, `(B, S, H, Dv)` out, as every `attn_implementation`;
* GQA: key/value arrive with their `num_key_value_heads` heads and are passed as they are;
* `scaling` is the softmax scale;
* KV-cache decode with the default `DynamicCache`: `Sq = 1` (or a few tokens) against all
  `Sk` cached keys; queries are aligned to the end of the keys, exactly sparse_attn's contract;
* `attention_mask`: None (no padding) runs directly. A 2-D padding mask with LEFT padding (what
  `generate` uses for batches) runs each sequence on its own unpadded keys, its first real token
  at position 0 (as the model's position ids have it); the outputs of padded query rows are 0.
  This path reads the pad counts on the host (one synchronisation per layer). Other masks (right
  padding, holes, a 4-D mask, a `StaticCache`'s unfilled slots) raise `ValueError`;
* `dropout > 0`, `softcap` and non-causal modules (`module.is_causal = False`) raise
  `ValueError`; a model's own `sliding_window` argument is ignored: the registered pattern is
  the attention that runs;
* `WindowLinear` needs a gate per layer: :func:`add_window_linear_gates` gives every attention
  module a learnable `sparse_attn_gate` parameter `(num_attention_heads,)` (init 0: an even mix
  of the window softmax and the linear memory); call it before building the optimizer.

Requires a transformers version with `AttentionInterface` and `AttentionMaskInterface`
(4.53 or later; tested with 5.x). Importing `sparse_attn` does not import transformers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..api.functional import attention
from ..patterns import BlockSparse, Pattern, WindowLinear

GATE_NAME = "sparse_attn_gate"


def _padding_mask(*, kv_length, attention_mask=None, **kwargs):
    """transformers mask interface: the 2-D bool padding mask `(B, kv_length)`, or None when no key
    is padded (then the attention runs without any mask). Keyword arguments only: transformers
    passes `q_length`/`q_offset` (5.x) or `cache_position` (4.5x) besides these."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # a prepared 4-D mask: the attention function rejects it
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _left_pads(mask: torch.Tensor, sk: int) -> list[int]:
    """Pad count per row of a 2-D bool mask `(B, Sk)` that must be left padding."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.shape[-1] != sk:
        raise ValueError(f"attention_mask covers {mask.shape[-1]} keys but there are {sk} (a StaticCache's "
                         f"unfilled slots?): sparse_attn supports DynamicCache and left padding only")
    pads = (~mask).sum(dim=1)
    expect = torch.arange(sk, device=mask.device)[None, :] >= pads[:, None]
    if not bool((expect == mask).all()):
        raise ValueError("attention_mask: sparse_attn supports left padding only (every row: padding, then "
                         "tokens); got right padding or holes")
    return pads.tolist()


def _attention_forward(pattern: Pattern, backend, module, query, key, value, attention_mask,
                       dropout: float = 0.0, scaling=None, is_causal=None, softcap=None, **kwargs):
    if dropout and dropout > 0:
        raise ValueError(f"sparse_attn attention has no dropout; got dropout={dropout} (set the model's "
                         f"attention_dropout to 0)")
    if softcap is not None:
        raise ValueError("sparse_attn attention does not support softcap")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError("sparse_attn's transformers integration runs causal (decoder) self-attention only; "
                         f"{type(module).__name__} is not causal")
    gate = None
    if isinstance(pattern, WindowLinear):
        gate = getattr(module, GATE_NAME, None)
        if gate is None:
            raise ValueError(f"WindowLinear needs a gate per layer: call sparse_attn.integrations.transformers."
                             f"add_window_linear_gates(model) first ({type(module).__name__} has no "
                             f"{GATE_NAME!r})")
        gate = gate.to(query.device)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"sparse_attn takes no {attention_mask.dim()}-D attention_mask: only None or a 2-D "
                         f"left-padding mask (register with register_transformers so transformers builds it)")
    if attention_mask is None:
        out = attention(query, key, value, pattern, scale=scaling, gate=gate, backend=backend)
    else:
        out = _padded(pattern, backend, query, key, value, attention_mask, scaling, gate)
    return out.transpose(1, 2).contiguous(), None


def _padded(pattern, backend, query, key, value, attention_mask, scaling, gate):
    """Left-padded batch: each row on its own keys (positions restart at its first real token)."""
    b, hq, sq, _ = query.shape
    sk = key.shape[2]
    pads = _left_pads(attention_mask.to(query.device), sk)
    out = query.new_zeros(b, hq, sq, value.shape[3])
    for i, n in enumerate(pads):
        t0 = max(0, n - (sk - sq))  # first query row at a real token
        if t0 >= sq:
            continue
        o = attention(query[i:i + 1, :, t0:], key[i:i + 1, :, n:], value[i:i + 1, :, n:], pattern,
                      scale=scaling, gate=gate, backend=backend)
        out = out.index_copy(0, torch.tensor([i], device=out.device),
                             torch.nn.functional.pad(o, (0, 0, t0, 0)))
    return out


def register_transformers(name: str, pattern: Pattern, *, backend: str | None = None) -> str:
    """Register `pattern` with transformers as `attn_implementation=name`; returns `name`.

    Any contract pattern but `BlockSparse` (its layout is sized by one sequence length, which
    changes at every decode step). `backend` is passed to every `sparse_attn.attention` call.
    Registering the same name again replaces it."""
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # transformers < 4.53 builds 4-D masks for custom attention
        raise RuntimeError("sparse_attn's transformers integration needs transformers >= 4.53 "
                           "(AttentionMaskInterface)") from e
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparse_attn pattern, got {type(pattern).__name__}")
    if isinstance(pattern, BlockSparse):
        raise TypeError("BlockSparse cannot back a transformers model: its layout has a fixed sequence length")

    def sparse_attn_attention(module, query, key, value, attention_mask, **kwargs):
        return _attention_forward(pattern, backend, module, query, key, value, attention_mask, **kwargs)

    sparse_attn_attention.__doc__ = f"sparse_attn.attention with {pattern!r} (backend={backend!r})"
    AttentionInterface.register(name, sparse_attn_attention)
    AttentionMaskInterface.register(name, _padding_mask)
    return name


def _attention_modules(model: nn.Module):
    for mod in model.modules():
        if hasattr(mod, "num_key_value_groups") and hasattr(mod, "layer_idx"):
            yield mod


def add_window_linear_gates(model: nn.Module, *, init: float = 0.0) -> int:
    """Give every attention module of a transformers model (those with `num_key_value_groups` and
    `layer_idx`, as Llama / Mistral / Qwen have) a learnable `sparse_attn_gate` `(Hq,)`, filled with
    `init`, on the module's device; modules that have one keep it. Returns how many were added."""
    heads = model.config.num_attention_heads
    added = 0
    for mod in _attention_modules(model):
        if getattr(mod, GATE_NAME, None) is None:
            ref = next(mod.parameters(), None)
            device = ref.device if ref is not None else None
            setattr(mod, GATE_NAME, nn.Parameter(torch.full((heads,), float(init), device=device)))
            added += 1
    return added
