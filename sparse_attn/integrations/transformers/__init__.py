"""Hugging Face `transformers` integration: sparse_attn patterns as an `attn_implementation`, and
sparse_attn's linear kernels for the linear layers of hybrid models.

    import sparse_attn as sa
    from sparse_attn.integrations.transformers import register_transformers, use_linear_kernels

    register_transformers("sparse_attn_topk", sa.TopK(topk=16, block_size=64))
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="sparse_attn_topk")
    # or, on a loaded model: model.set_attn_implementation("sparse_attn_topk")
    use_linear_kernels(model)   # Qwen3-Next, Kimi Linear, MiniMax: linear layers on sparse_attn

`register_transformers` registers two functions under the name: the attention function with
`transformers.AttentionInterface` and a mask function with `AttentionMaskInterface` (so the
model hands over the 2-D padding mask, or None, instead of building a `Sq x Sk` mask).

What runs on each layer (contract, "Drop-in for real models"):

* a full-attention layer (the model passes `sliding_window=None`) runs the registered pattern;
* a layer with its own sliding window (Mistral, Qwen2's sliding layers, Gemma 2/3's local
  layers, GPT-OSS's alternate layers) runs `SlidingWindow(that window)`: what it was trained with;
* `register_transformers(name, {"full_attention": p1, "sliding_attention": p2})` chooses per layer
  type; a type left out runs the model's own attention (`Dense()` / its window);
* the model's `scaling`, `softcap` (Gemma 2) and learned sinks (GPT-OSS `s_aux`) are honoured;
  `Dv != D` (Kimi Linear's MLA layers) works;
* layout `(B, H, S, D)` in, `(B, S, H, Dv)` out; GQA heads are not repeated;
* KV-cache decode with `DynamicCache` (a sliding layer's cache keeps its last `window - 1` keys:
  the window still sees all it needs): queries are aligned to the end of the keys;
* `attention_mask`: None runs directly; a 2-D LEFT padding mask (batched `generate`) runs each
  sequence on its own unpadded keys, its first real token at position 0; padded query rows output
  0; one host synchronisation per layer. Other masks (right padding, holes, a 4-D mask, a
  `StaticCache`'s unfilled slots) raise `ValueError`;
* `dropout > 0` and non-causal modules raise `ValueError`;
* `WindowLinear` needs a gate per layer: :func:`add_window_linear_gates`.

Requires transformers with `AttentionInterface` and `AttentionMaskInterface` (4.53 or later;
tested with 5.24). Importing `sparse_attn` does not import transformers.
"""
from __future__ import annotations

import torch
from torch import nn

from ...patterns import Pattern
from .attention import GATE_NAME, LAYER_TYPES, attention_forward, check_patterns, _padding_mask
from .linear import use_linear_kernels

__all__ = ["register_transformers", "add_window_linear_gates", "use_linear_kernels", "GATE_NAME", "LAYER_TYPES"]


def register_transformers(name: str, pattern: Pattern | dict, *, backend: str | None = None) -> str:
    """Register sparse_attn with transformers as `attn_implementation=name`; returns `name`.

    Args:
        name: the `attn_implementation` string.
        pattern: a pattern for the full-attention layers (sliding layers keep their own window), or
            a dict `{"full_attention": ..., "sliding_attention": ...}` (either key may be left out:
            that layer type runs the model's own attention). Any contract pattern but
            `BlockSparse` (its layout is sized by one sequence length, which changes at every
            decode step).
        backend: passed to every `sparse_attn.attention` call.
    Registering the same name again replaces it. Unknown layer types raise `ValueError` naming them.
    """
    from transformers import AttentionInterface

    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # transformers < 4.53 builds 4-D masks for custom attention
        raise RuntimeError("sparse_attn's transformers integration needs transformers >= 4.53 "
                           "(AttentionMaskInterface)") from e
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    mapping = check_patterns(pattern)

    def sparse_attn_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(mapping, backend, module, query, key, value, attention_mask, **kwargs)

    sparse_attn_attention.__doc__ = f"sparse_attn.attention with {mapping!r} (backend={backend!r})"
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
