"""Which sparse_attn pattern each vLLM attention layer runs, from `SPARSE_ATTN_VLLM_PATTERN`.

The variable's grammar (no vLLM import here):

* `dense` -- `Dense()`: what the model was trained with, on sparse_attn's kernels;
* `topk:N` or `topk:N:BS` -- `TopK(topk=N, block_size=BS)` (BS defaults to 64); the block size is
  vLLM's page size (the plugin asks vLLM for pages of BS tokens), so block sums live beside pages;
* `window:W` or `window:W:S` -- `SlidingWindow(W, sinks=S)` (StreamingLLM);
* `infllmv2` or `infllmv2:field=value,...` -- `InfLLMv2()` with those fields replaced (integers,
  and `normalizer` / `variant` strings), e.g. `infllmv2:topk=64,dense_len=0`; its window sums are
  kept beside vLLM's pages, each window in the page of its last row (pages.PageWindows).

The chosen pattern replaces the full-attention layers only; a layer with its own sliding window
(Mistral, Gemma, GPT-OSS ...) runs `SlidingWindow(its window)`, as in the contract's transformers
rules. Learned sinks, soft-capping and the model's scale are passed through as well.
"""
from __future__ import annotations

import dataclasses

from ...patterns import Dense, InfLLMv2, Pattern, SlidingWindow, TopK

ENV = "SPARSE_ATTN_VLLM_PATTERN"
DEFAULT_TOPK_BLOCK = 64


def _int(spec: str, text: str, what: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: {what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{ENV}={spec!r}: {what} must be >= {minimum}, got {value}")
    return value


def parse_pattern(spec: str) -> Pattern:
    """`SPARSE_ATTN_VLLM_PATTERN`'s value as a pattern; `ValueError` naming the variable otherwise."""
    if not isinstance(spec, str):
        raise TypeError(f"{ENV} must be a str, got {type(spec).__name__}")
    parts = spec.strip().lower().split(":")
    kind, args = parts[0], parts[1:]
    if kind == "dense" and not args:
        return Dense()
    if kind == "topk" and len(args) in (1, 2):
        bs = _int(spec, args[1], "the block size", 1) if len(args) == 2 else DEFAULT_TOPK_BLOCK
        return TopK(topk=_int(spec, args[0], "topk", 0), block_size=bs)
    if kind == "window" and len(args) in (1, 2):
        sinks = _int(spec, args[1], "sinks", 0) if len(args) == 2 else 0
        return SlidingWindow(_int(spec, args[0], "the window", 1), sinks=sinks)
    if kind == "infllmv2" and len(args) <= 1:
        return _infllmv2(spec, args[0] if args else "")
    raise ValueError(f"{ENV}={spec!r} is not a pattern: use dense, topk:N[:block_size], window:W[:sinks], "
                     f"infllmv2[:field=value,...]")


def _infllmv2(spec: str, text: str) -> InfLLMv2:
    fields = {f.name: f for f in dataclasses.fields(InfLLMv2)}
    kw = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name not in fields:
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not field=value with a field of InfLLMv2 "
                             f"({', '.join(fields)})")
        kw[name] = value if name in ("normalizer", "variant") else _int(spec, value, name, -1)
    try:
        return InfLLMv2(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ENV}={spec!r}: {e}") from None


def layer_pattern(pattern: Pattern, sliding_window: int | None) -> Pattern:
    """What one layer runs: its own `SlidingWindow(sliding_window)` when vLLM gives it a window
    (vLLM's `sliding_window=W` sees W keys including the query's own, as ours), else `pattern`."""
    if sliding_window is None or sliding_window < 0:
        return pattern
    if sliding_window == 0:
        raise ValueError("sliding_window=0: a layer must see at least its own token")
    return SlidingWindow(int(sliding_window))


def page_size_for(pattern: Pattern) -> int | None:
    """The page size a pattern needs from vLLM (TopK's block size), None when any size serves."""
    return pattern.block_size if isinstance(pattern, TopK) else None
