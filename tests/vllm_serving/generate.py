"""Greedy generation of the tiny model in a fresh process (one backend per process: vLLM's
plugins load once per process). Prints one JSON line: `{"tokens": [[...], ...], ...}`.

    SPARSE_ATTN_VLLM_PATTERN=dense python tests/vllm_serving/generate.py MODEL_DIR --prompt-len 300
"""
from __future__ import annotations

import argparse
import json
import os
import time


def prompts(n: int, count: int, vocab: int = 512, seed: int = 0):
    """`count` prompts of `n` token ids (random, fixed seed; ids of ordinary tokens)."""
    import random
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for _ in range(count)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=None, help="max_num_batched_tokens (chunked prefill)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {}
    if a.chunk:
        kw["max_num_batched_tokens"] = a.chunk
    if a.block_size:
        kw["block_size"] = a.block_size
    t0 = time.perf_counter()
    llm = LLM(model=a.model, max_model_len=a.max_model_len, enforce_eager=True, dtype=a.dtype, seed=0,
              gpu_memory_utilization=0.3, enable_prefix_caching=False, **kw)
    t1 = time.perf_counter()
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    ps = [TokensPrompt(prompt_token_ids=p) for p in prompts(a.prompt_len, a.num_prompts)]
    outs = llm.generate(ps, sp, use_tqdm=False)
    t2 = time.perf_counter()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    path = AttentionBackendEnum.CPU_ATTN.get_path()
    stats = None
    if path.startswith("sparse_attn"):  # what the plugin's forward did (direct / gathered prefills)
        from sparse_attn.integrations.vllm.backend import STATS
        stats = dict(STATS)
    print(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "init_s": t1 - t0,
                      "generate_s": t2 - t1, "backend": path, "stats": stats}))


if __name__ == "__main__":
    main()
