"""The attention function a registered `attn_implementation` runs: per-layer rules, padding.

transformers calls it once per attention layer with `(module, query, key, value, attention_mask,
**kwargs)`; the kwargs carry the layer's own `sliding_window` (None for a full-attention layer),
`scaling`, `softcap` (Gemma 2) and `s_aux` (GPT-OSS's learned sinks), as the model's modules pass
them in transformers 5.x.
"""
from __future__ import annotations

import torch

from ...api.functional import attention
from ...patterns import BlockSparse, Dense, Pattern, SlidingWindow, WindowLinear

GATE_NAME = "sparse_attn_gate"
LAYER_TYPES = ("full_attention", "sliding_attention")
_MISSING = object()


def check_patterns(pattern_or_map) -> dict:
    """`register_transformers`'s second argument as `{layer type: pattern}`. A single pattern maps
    full-attention layers only (sliding layers keep the model's own window)."""
    if isinstance(pattern_or_map, Pattern):
        mapping = {"full_attention": pattern_or_map}
    elif isinstance(pattern_or_map, dict):
        bad = [k for k in pattern_or_map if k not in LAYER_TYPES]
        if bad:
            raise ValueError(f"patterns: unknown layer type(s) {bad}; the keys must be among {list(LAYER_TYPES)} "
                             f"(a layer type a model's config.layer_types names)")
        if not pattern_or_map:
            raise ValueError(f"patterns: an empty mapping; give a pattern for one of {list(LAYER_TYPES)}")
        mapping = dict(pattern_or_map)
    else:
        raise TypeError(f"pattern must be a sparse_attn pattern or a dict {{layer type: pattern}}, got "
                        f"{type(pattern_or_map).__name__}")
    for key, p in mapping.items():
        if not isinstance(p, Pattern):
            raise TypeError(f"patterns[{key!r}] must be a sparse_attn pattern, got {type(p).__name__}")
        if isinstance(p, BlockSparse):
            raise TypeError(f"patterns[{key!r}]: BlockSparse cannot back a transformers model: its layout has a "
                            f"fixed sequence length")
    return mapping


def layer_window(module, kwargs) -> int | None:
    """The layer's own sliding window, None for a full-attention layer: the `sliding_window` the
    model passes (Mistral, Qwen2, Gemma 2/3, GPT-OSS), else the module's attribute, else the
    config's `layer_types` entry for `module.layer_idx` with `config.sliding_window`."""
    window = kwargs.get("sliding_window", _MISSING)
    if window is _MISSING:
        window = getattr(module, "sliding_window", _MISSING)
    if window is _MISSING:
        cfg = getattr(module, "config", None)
        types = getattr(cfg, "layer_types", None)
        idx = getattr(module, "layer_idx", None)
        window = None
        if types is not None and idx is not None and idx < len(types) and types[idx] == "sliding_attention":
            window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    window = int(window)
    if window < 1:
        raise ValueError(f"sliding_window must be >= 1 for {type(module).__name__}, got {window}")
    return window


def layer_pattern(mapping: dict, module, kwargs) -> Pattern:
    """What runs on this layer: the mapped pattern of its type, else what the model was trained with
    (`Dense()` for a full-attention layer, `SlidingWindow(its window)` for a sliding one)."""
    window = layer_window(module, kwargs)
    if window is None:
        return mapping.get("full_attention", Dense())
    return mapping.get("sliding_attention", SlidingWindow(window))


def _padding_mask(*, kv_length, attention_mask=None, **kwargs):
    """transformers mask interface: the 2-D bool padding mask `(B, kv_length)`, or None when no key
    is padded (then the attention runs without any mask). Keyword arguments only: transformers
    passes `q_length`/`q_offset` (5.x) or `cache_position` (4.5x) besides these. A sliding layer's
    cache keeps the last keys only: `kv_length` counts those, the mask's last columns."""
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


def attention_forward(mapping: dict, backend, module, query, key, value, attention_mask,
                      dropout: float = 0.0, scaling=None, is_causal=None, softcap=None, s_aux=None, sinks=None,
                      **kwargs):
    """One layer's attention: `query (B, Hq, Sq, D)`, `key (B, Hkv, Sk, D)`, `value (B, Hkv, Sk, Dv)`
    (Dv may differ from D: MLA layers) -> `((B, Sq, Hq, Dv), None)`."""
    if dropout and dropout > 0:
        raise ValueError(f"sparse_attn attention has no dropout; got dropout={dropout} (set the model's "
                         f"attention_dropout to 0)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError("sparse_attn's transformers integration runs causal (decoder) self-attention only; "
                         f"{type(module).__name__} is not causal")
    pattern = layer_pattern(mapping, module, kwargs)
    opts = {}
    if softcap is not None:
        opts["softcap"] = float(softcap)
    sink = s_aux if s_aux is not None else sinks
    if sink is not None:
        opts["sink_logits"] = sink.to(device=query.device)
    if isinstance(pattern, WindowLinear):
        gate = getattr(module, GATE_NAME, None)
        if gate is None:
            raise ValueError(f"WindowLinear needs a gate per layer: call sparse_attn.integrations.transformers."
                             f"add_window_linear_gates(model) first ({type(module).__name__} has no "
                             f"{GATE_NAME!r})")
        opts["gate"] = gate.to(query.device)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"sparse_attn takes no {attention_mask.dim()}-D attention_mask: only None or a 2-D "
                         f"left-padding mask (register with register_transformers so transformers builds it)")
    if attention_mask is None:
        out = attention(query, key, value, pattern, scale=scaling, backend=backend, **opts)
    else:
        out = _padded(pattern, backend, query, key, value, attention_mask, scaling, opts)
    return out.transpose(1, 2).contiguous(), None


def _padded(pattern, backend, query, key, value, attention_mask, scaling, opts):
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
                      scale=scaling, backend=backend, **opts)
        out = out.index_copy(0, torch.tensor([i], device=out.device),
                             torch.nn.functional.pad(o, (0, 0, t0, 0)))
    return out
