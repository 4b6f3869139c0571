"""`use_linear_kernels(model)`: the linear layers of hybrid models on sparse_attn's kernels.

| layer (transformers 5.x) | recurrence | sparse_attn kernel |
|---|---|---|
| `Qwen3NextGatedDeltaNet` | Gated DeltaNet, one log-decay per token and value head | `delta_rule(decay=(B, Hv, S))` |
| `KimiLinearDeltaAttention` (KDA) | delta rule, one log-decay per key channel | `delta_rule(decay=(B, H, S, D))` |
| `MiniMaxLightningAttention` | linear attention, a fixed log-decay per head | `linear_attention(decay=(H,), scale=1)` |

How, without copying model code where transformers offers a hook:

* Qwen3-Next and Kimi Linear call their recurrence through module-level functions that
  transformers wraps with `use_kernel_func_from_hub_with_fallback` (the hook that swaps in FLA's
  kernels): `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule` and
  `chunk_kimi_delta_attention` / `recurrent_kimi_delta_attention`. We replace those names in the
  model's module with a router: while a switched layer runs (forward pre-/post-hooks mark it,
  per thread), the call goes to `sparse_attn.delta_rule`; any other caller (an unswitched layer,
  another model) still gets transformers' function. Convolution, gates, norms and the cache
  bookkeeping stay the model's own.
* MiniMax's lightning attention has its recurrence inline in `forward` (no function to swap), so
  a switched layer gets a forward of ours: the same projections (`qkv_proj`, activation, padding
  zeroing, `norm`, `output_gate`, `out_proj`) around `sparse_attn.linear_attention`, reading and
  writing the state through `MiniMaxCache.get_linear_cache` / `set_linear_cache` as the model does.

Prefill (`Sq > 1`, from an empty or a cached state) and cached decode (`Sq = 1`) both run on
sparse_attn; the state is float32 `(B, H, D, Dv)`, the layout the model's cache keeps. q and k
are L2-normalised as the model does it, `x / sqrt(||x||^2 + 1e-6)` in float32 (the contract's
`qk_l2norm` adds eps to the norm instead, a 1e-5 relative difference at small norms).
"""
from __future__ import annotations

import functools
import sys
import threading
import types

import torch
from torch import nn

from ...api.delta import delta_rule
from ...api.linear import linear_attention

_MARK = "_sparse_attn_linear"   # on a switched layer: (kind, backend, hook handles)
_local = threading.local()


def _active_layer():
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _enter(module, args, kwargs=None):
    if not hasattr(_local, "stack"):
        _local.stack = []
    _local.stack.append(module)


def _leave(module, args, output):
    _local.stack.pop()


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _packed(kwargs) -> None:
    for key in ("cu_seqlens", "cu_seq_lens_q", "seq_idx"):
        if kwargs.get(key) is not None:
            raise ValueError(f"use_linear_kernels: packed sequences ({key}) are not supported on sparse_attn's "
                             f"linear layers; call use_linear_kernels(model, enable=False) to train on them")


def _delta(layer, query, key, value, g, beta, initial_state=None, output_final_state=False,
           use_qk_l2norm_in_kernel=False, **kwargs):
    """Gated DeltaNet / KDA as transformers calls them: q, k `(B, S, Hk, D)`, v `(B, S, Hv, Dv)`,
    g `(B, S, Hv)` or `(B, S, Hv, D)`, beta `(B, S, Hv)` -> (o `(B, S, Hv, Dv)`, state or None)."""
    _packed(kwargs)
    _, backend = getattr(layer, _MARK)[:2]
    dtype = query.dtype
    q, k = query.transpose(1, 2), key.transpose(1, 2)
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q, k = q.float(), k.float()
    v = value.transpose(1, 2).float()
    decay = g.transpose(1, 2).float()
    b = beta.transpose(1, 2).float()
    state = None if initial_state is None else initial_state.float()
    o, state = delta_rule(q, k, v, b, decay=decay, initial_state=state, return_state=True, backend=backend)
    return o.transpose(1, 2).to(dtype).contiguous(), (state if output_final_state else None)


class _Route:
    """Stands in for one of transformers' recurrence functions in a model's module: the active
    switched layer's calls go to sparse_attn, every other call to the original."""

    def __init__(self, original, kernel):
        functools.update_wrapper(self, original)
        self.original = original
        self.kernel = kernel

    def __call__(self, *args, **kwargs):
        layer = _active_layer()
        if layer is not None and getattr(layer, _MARK, None) is not None:
            return self.kernel(layer, *args, **kwargs)
        return self.original(*args, **kwargs)


def _lightning_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                       past_key_values=None, **kwargs):
    """MiniMaxLightningAttention.forward with the recurrence on `sparse_attn.linear_attention`:
    `S_t = exp(-slope_h) S_{t-1} + k_t v_t^T`, `o_t = q_t^T S_t` (no scale)."""
    cache = cache if cache is not None else past_key_values
    _, backend = getattr(self, _MARK)[:2]
    bsz, seq_len, _ = hidden_states.shape
    qkv = self.act_fn(self.qkv_proj(hidden_states))
    if attention_mask is not None:  # a 2-D padding mask: padded tokens write nothing to the state
        qkv = (qkv * attention_mask[:, :, None]).to(qkv.dtype)
    qkv = qkv.reshape(bsz, seq_len, self.num_attention_heads, 3 * self.head_dim)
    q, k, v = (x.transpose(1, 2) for x in torch.split(qkv, self.head_dim, dim=3))
    state = cache.get_linear_cache(self.layer_idx) if cache is not None else None
    if not isinstance(state, torch.Tensor):
        state = None
    decay = -self.slope_rate.reshape(-1).float()
    out, state = linear_attention(q, k, v, decay=decay, scale=1.0,
                                  initial_state=None if state is None else state.float(),
                                  return_state=True, backend=backend)
    out = out.to(hidden_states.dtype).transpose(1, 2).reshape(bsz, seq_len, -1)
    out = self.norm(out)
    out = torch.sigmoid(self.output_gate(hidden_states)) * out
    out = self.out_proj(out)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state)
    return out, state


# class name -> (family, names of the module-level functions to route, or None for a forward of ours)
_LAYERS = {
    "Qwen3NextGatedDeltaNet": ("Qwen3-Next Gated DeltaNet",
                               ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")),
    "KimiLinearDeltaAttention": ("Kimi Linear KDA",
                                 ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")),
    "MiniMaxLightningAttention": ("MiniMax lightning attention", None),
}
KNOWN = sorted({fam for fam, _ in _LAYERS.values()})


def _install_routes(layer, names) -> None:
    mod = sys.modules[type(layer).__module__]
    for name in names:
        fn = getattr(mod, name, None)
        if fn is None:
            raise ValueError(f"use_linear_kernels: {type(layer).__name__}'s module {mod.__name__} has no {name!r} "
                             f"in this transformers version (written against transformers 5.x)")
        if not isinstance(fn, _Route):
            setattr(mod, name, _Route(fn, _delta))


def _switch_on(layer, names, backend) -> None:
    if getattr(layer, _MARK, None) is not None:
        old = getattr(layer, _MARK)
        setattr(layer, _MARK, (old[0], backend, old[2]))
        return
    if names is None:
        layer.forward = types.MethodType(_lightning_forward, layer)
        hooks = ()
    else:
        _install_routes(layer, names)
        hooks = (layer.register_forward_pre_hook(_enter), layer.register_forward_hook(_leave, always_call=True))
    setattr(layer, _MARK, ("forward" if names is None else "route", backend, hooks))


def _switch_off(layer) -> bool:
    mark = getattr(layer, _MARK, None)
    if mark is None:
        return False
    kind, _, hooks = mark
    for h in hooks:
        h.remove()
    if kind == "forward":
        del layer.forward
    delattr(layer, _MARK)
    return True


def use_linear_kernels(model: nn.Module, *, enable: bool = True, backend: str | None = None) -> int:
    """Run the linear layers of a hybrid transformers model on sparse_attn's kernels.

    Qwen3-Next (Gated DeltaNet -> `delta_rule` with a per-token decay), Kimi Linear (KDA ->
    `delta_rule` with a per-channel decay) and MiniMax (lightning attention -> `linear_attention`
    with a per-head decay), in prefill and in cached decode; the softmax layers are untouched
    (`register_transformers` covers them). Idempotent.

    Args:
        model: a transformers model (any head) holding such layers.
        enable: False switches the layers back to transformers' own code.
        backend: passed to every sparse_attn call (None: the scheduler's choice).
    Returns:
        how many layers now run on sparse_attn (`enable=True`) or were switched back (False).
    Raises:
        ValueError: the model has no linear layer of a known family.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(m, _LAYERS[type(m).__name__][1]) for m in model.modules() if type(m).__name__ in _LAYERS]
    if not layers:
        raise ValueError(f"use_linear_kernels: {type(model).__name__} has no linear layer sparse_attn knows; known: "
                         f"{', '.join(KNOWN)} (classes {', '.join(sorted(_LAYERS))})")
    if not enable:
        return sum(_switch_off(m) for m, _ in layers)
    for m, names in layers:
        _switch_on(m, names, backend)
    return len(layers)
