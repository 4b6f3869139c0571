"""sparse_attn as vLLM's attention backend, end to end (runs only where vLLM is installed).

vLLM pins its own torch / transformers, so these tests run from vLLM's venv (docs/integrations.md):

    SPARSE_ATTN_CACHE=... PYTHONPATH=$PWD /path/to/vllmenv/bin/python -m pytest tests/vllm_serving -q

A tiny random Llama (and a Mistral with a sliding window on every layer) is built from a config and
saved with a tokenizer trained here; each engine runs in its own process (tests/vllm_serving/generate.py:
vLLM loads its plugins once per process), greedy, float32:

* `SPARSE_ATTN_VLLM_PATTERN=dense` generates the same tokens as vLLM's own CPU backend, with whole
  prompts and with chunked prefill (chunks of 64 tokens: a first chunk attends to its new K/V
  directly, later ones to keys gathered from vLLM's pages; decodes and prefills share steps); whole
  prompts gather nothing; the Mistral's layers keep their own window;
* `topk:2:16`, `window:48:4` and a small InfLLMv2 (`infllmv2:topk=2,block_size=16,...`: its windows
  from the chunk sums kept beside vLLM's pages) generate the same tokens as the transformers model
  with sparse_attn's attention registered by hand (`register_transformers`) with the same pattern;
* a TopK that sees every causal key while the sequences are short decodes as Dense until they
  are not (`attention_with_cache` decides per run; the prepared re-run is Dense's within the
  pattern's reach), with the same tokens as by hand;
* a malformed pattern stops the engine with a `ValueError` naming it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# (this folder is not named `vllm`: on sys.path it would pass for the package where vLLM is absent)
pytest.importorskip("vllm.v1.attention.backend", reason="vLLM is not installed here: these tests run from vLLM's "
                                                        "venv (docs/integrations.md)")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generate import prompts  # noqa: E402
from tiny_model import make_tiny_llama  # noqa: E402

PROMPT_LEN, NUM_PROMPTS, NEW_TOKENS = 200, 2, 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("mistral")), sliding_window=48)


def _generate(model, pattern, *extra, stats=None):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("SPARSE_ATTN_VLLM_PATTERN", None)
    if pattern is not None:
        env["SPARSE_ATTN_VLLM_PATTERN"] = pattern
    cmd = [sys.executable, os.path.join(HERE, "generate.py"), model, "--prompt-len", str(PROMPT_LEN),
           "--num-prompts", str(NUM_PROMPTS), "--max-tokens", str(NEW_TOKENS), *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return None, r.stdout[-3000:] + r.stderr[-6000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    want = "sparse_attn" if pattern is not None else "vllm."
    assert out["backend"].startswith(want), out["backend"]
    if stats is not None:
        stats.update(out["stats"] or {})
    return out["tokens"], ""


def _ok(model, pattern, *extra, stats=None):
    tokens, err = _generate(model, pattern, *extra, stats=stats)
    assert tokens is not None, err
    return tokens


@pytest.fixture(scope="module")
def own_tokens(llama):
    return _ok(llama, None)


def test_dense_equals_vllm_own(llama, own_tokens):
    stats = {}
    assert _ok(llama, "dense", stats=stats) == own_tokens
    # whole prompts: every prefill attended to its new K/V as vLLM handed them, nothing gathered
    assert stats["prefill_direct"] >= NUM_PROMPTS and stats["prefill_gathered"] == 0, stats


def test_dense_chunked_prefill_equals_vllm_own(llama, own_tokens):
    stats = {}
    assert _ok(llama, "dense", "--chunk", "64", stats=stats) == own_tokens
    # a first chunk (no earlier keys) directly, later chunks from the pages: 2 layers x 2 prompts
    # of 200 tokens in chunks of at most 64 (decodes of the first prompt share the budget)
    layers = 2
    assert stats["prefill_direct"] >= NUM_PROMPTS * layers, stats
    assert stats["prefill_gathered"] >= NUM_PROMPTS * layers * (-(-PROMPT_LEN // 64) - 1), stats


def test_sliding_layers_keep_their_window(mistral):
    assert _ok(mistral, "dense", "--chunk", "64") == _ok(mistral, None, "--chunk", "64")


def _by_hand(model, pattern):
    """Greedy tokens of the transformers model with sparse_attn's attention (the same pattern)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparse_attn.integrations.transformers import register_transformers

    name = register_transformers("sparse_attn_vllm_test", pattern)
    m = AutoModelForCausalLM.from_pretrained(model, attn_implementation=name, dtype=torch.float32).eval()
    outs = []
    for p in prompts(PROMPT_LEN, NUM_PROMPTS):
        ids = torch.tensor([p])
        with torch.no_grad():
            g = m.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
        outs.append(g[0, len(p):].tolist())
    return outs


INFLLMV2 = "infllmv2:topk=2,block_size=16,kernel_size=8,kernel_stride=4,local_blocks=1,dense_len=0"


@pytest.mark.parametrize("spec", ["topk:2:16", "window:48:4", INFLLMV2])
def test_sparse_equals_sparse_attn_by_hand(llama, spec):
    from sparse_attn.integrations.vllm import parse_pattern
    assert _ok(llama, spec, "--chunk", "64") == _by_hand(llama, parse_pattern(spec))


def test_topk_runs_dense_while_it_covers_every_key(llama):
    """TopK(11) of 16-token blocks (one sink, one local block) sees every causal key up to 208 keys:
    the decode steps at 201-208 keys run as Dense (no selection; the binding's lighter re-run),
    the one at 209 keys selects. The tokens are the transformers model's with the same pattern."""
    from sparse_attn.integrations.vllm import parse_pattern
    spec, stats = "topk:11:16", {}
    assert _ok(llama, spec, stats=stats) == _by_hand(llama, parse_pattern(spec))
    assert 0 < stats["decode_dense_covered"] < stats["decode_calls"], stats


@pytest.mark.parametrize("spec,words", [("infllmv2:foo=1", "foo"), ("topk:x", "SPARSE_ATTN_VLLM_PATTERN")])
def test_refused_at_engine_start(llama, spec, words):
    tokens, err = _generate(llama, spec)
    assert tokens is None and "ValueError" in err and words in err, err[-2000:]


def test_huge_pages_once_per_storage(monkeypatch):
    """The backend starts moving a KV cache storage into 2 MB pages at its first write, in the
    background, keeping its contents; layers sharing the storage do not repeat it;
    `SPARSE_ATTN_VLLM_HUGE_PAGES=0` skips it."""
    import torch

    from sparse_attn.cache import huge_pages
    from sparse_attn.integrations.vllm import backend

    kv = torch.randn(64, 2, 64, 256)  # vLLM's (pages, Hkv, page, 2 D), 8 MB: at least three whole 2 MB pages
    before = kv.clone()
    job = backend.huge_pages_once(kv)
    if sys.platform.startswith("linux"):
        assert job is not None and job.wait(60) and job.seconds is not None
        assert huge_pages.huge_bytes(kv) is not None
    assert torch.equal(kv, before)
    assert backend.huge_pages_once(kv[1:]) is None  # the same storage: once
    monkeypatch.setenv(backend.HUGE_PAGES_ENV, "0")
    other = torch.randn(16, 2, 64, 256)
    had = huge_pages.huge_bytes(other)  # (0 here unless THP is "always")
    assert backend.huge_pages_once(other) is None and huge_pages.huge_bytes(other) == had


@pytest.mark.parametrize("spec,names", [("dense", ["cpu", "cpu_decode"]),
                                        ("infllmv2", ["cpu", "cpu_decode", "cpu_infllmv2", "cpu_infllmv2_pages"])])
def test_kernels_load_when_the_layers_are_built(monkeypatch, spec, names):
    """A layer's impl loads the C++ extensions it will call when vLLM builds it (engine start), so
    the first request does not pay their loads (10-45 ms each with the build cached)."""
    from sparse_attn._build import jit
    from sparse_attn.integrations.vllm import backend

    monkeypatch.setenv("SPARSE_ATTN_VLLM_PATTERN", spec)
    for name in names:
        monkeypatch.delitem(jit._LOADED, name, raising=False)
    impl = backend.SparseAttnImpl(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2)
    assert type(impl.pattern).__name__ == ("InfLLMv2" if spec == "infllmv2" else "Dense")
    assert all(name in jit._LOADED for name in names), sorted(jit._LOADED)
