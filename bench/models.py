"""Decode speed of real model families through the transformers integration (docs/integrations.md).

    python -m bench.models                         # every family at 32K tokens of context
    python -m bench.models --context 8192 --families llama,qwen3_next --steps 8

One row per family and implementation, in one process: greedy decode steps (`Sq = 1`, batch 1) on
top of `--context` cached tokens, tiny widths (hidden 64, 4 layers, 4 query / 2 kv heads of 16)
but the family's real layer mix (sliding windows of 4096, Gemma 3's local/global alternation,
GPT-OSS's sinks, the hybrids' linear layers):

- `own`: the model's own attention (`sdpa`; `eager` for Gemma 2 and GPT-OSS, which have no sdpa
  path) and its own linear layers (transformers' PyTorch fallbacks: no fla on this machine);
- `sparse_attn dense`: `register_transformers(.., sa.Dense())` (the same function as `own`) plus
  `use_linear_kernels`;
- `sparse_attn topk`: the full layers on `sa.TopK(16, block_size=64)` (sliding layers keep their
  window) plus `use_linear_kernels`.

The cache is filled once per family by a prefill that runs sparse_attn with `SlidingWindow(64)` on
the full layers (so no `S x S` eager matrix is ever built; what the cached keys hold does not
change the time of a step). The implementations then alternate step by step (`--steps` each),
each step's time is one token: tokens/s is 1 / the median. The ratio column is against `own` in the
same run. The machine is shared: the load average is printed beside the table.
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time

import torch

FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gemma2", "gpt_oss", "qwen3_next", "kimi_linear", "minimax"]
NO_SDPA = {"gemma2", "gpt_oss"}
HYBRID = {"qwen3_next", "kimi_linear", "minimax"}


def config(family: str, context: int, window: int):
    import transformers as T

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=context + 1024)
    moe = dict(num_experts_per_tok=2)
    make = {
        "llama": lambda: T.LlamaConfig(**common),
        "mistral": lambda: T.MistralConfig(**common, sliding_window=window),
        "qwen2": lambda: T.Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                                       max_window_layers=2),
        "gemma3": lambda: T.Gemma3TextConfig(**common, head_dim=16, sliding_window=window, sliding_window_pattern=2),
        "gemma2": lambda: T.Gemma2Config(**common, head_dim=16, sliding_window=window),
        "gpt_oss": lambda: T.GptOssConfig(**dict(common, intermediate_size=32), head_dim=16, sliding_window=window,
                                          num_local_experts=4, **moe),
        "qwen3_next": lambda: T.Qwen3NextConfig(**common, head_dim=16, linear_num_key_heads=2,
                                                linear_num_value_heads=4, linear_key_head_dim=16,
                                                linear_value_head_dim=16, num_experts=4, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=32, **moe),
        "kimi_linear": lambda: T.KimiLinearConfig(**dict(common, num_key_value_heads=4), pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2,
                                                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                                  kv_lora_rank=32, linear_head_dim=16, linear_num_heads=4,
                                                  num_local_experts=4, moe_intermediate_size=32,
                                                  layer_types=["linear_attention", "full_attention"] * 2, **moe),
        "minimax": lambda: T.MiniMaxConfig(**common, head_dim=16, num_local_experts=4, block_size=64, **moe),
    }
    return make[family]()


def layer_mix(model) -> str:
    types = getattr(model.config, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if getattr(model.config, "sliding_window", None) else "full_attention"] * \
            model.config.num_hidden_layers
    short = {"full_attention": "F", "sliding_attention": "S", "linear_attention": "L"}
    return "".join(short.get(t, "?") for t in types)


def run_family(family: str, *, context: int, steps: int, window: int, names: dict) -> list[tuple]:
    from transformers import AutoModelForCausalLM

    from sparse_attn.integrations.transformers import use_linear_kernels

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(family, context, window)).eval()
    own = "eager" if family in NO_SDPA else "sdpa"
    ids = torch.randint(3, 128, (1, context))
    hybrid = family in HYBRID
    with torch.no_grad():
        if hybrid:
            use_linear_kernels(model)
        model.set_attn_implementation(names["prefill"])
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        impls = [("own " + own, own, False), ("sparse_attn dense", names["dense"], True),
                 ("sparse_attn topk", names["topk"], True)]
        times = {label: [] for label, *_ in impls}
        for _ in range(steps):
            for label, impl, linear in impls:
                if hybrid:
                    use_linear_kernels(model, enable=linear)
                model.set_attn_implementation(impl)
                t0 = time.perf_counter()
                out = model(token, use_cache=True, **{cache_kw: cache})
                times[label].append(time.perf_counter() - t0)
                cache = out.past_key_values
    base = statistics.median(times[impls[0][0]])
    rows = []
    for label, *_ in impls:
        med = statistics.median(times[label])
        rows.append((family, layer_mix(model), context, label, 1.0 / med, base / med, prefill_s))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--window", type=int, default=4096, help="sliding window of the sliding layers")
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sparse_attn as sa
    from sparse_attn.integrations.transformers import register_transformers

    names = {"prefill": register_transformers("bench_prefill", sa.SlidingWindow(64)),
             "dense": register_transformers("bench_dense", sa.Dense()),
             "topk": register_transformers("bench_topk", sa.TopK(16, block_size=64))}
    fams = [f for f in args.families.split(",") if f]
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        raise SystemExit(f"--families: unknown {bad}; known: {FAMILIES}")
    print(f"# bench.models context={args.context} steps={args.steps} window={args.window} "
          f"threads={torch.get_num_threads()} load={os.getloadavg()}")
    print("| family | layers | context | implementation | tokens/s | vs own | prefill s |")
    print("|---|---|---|---|---|---|---|")
    for fam in fams:
        try:
            rows = run_family(fam, context=args.context, steps=args.steps, window=args.window, names=names)
        except ValueError as e:  # refused by the integration: say so in the table
            print(f"| {fam} | | {args.context} | refused: {e} | | | |", flush=True)
            continue
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.2f}x | {r[6]:.1f} |", flush=True)
    print(f"# load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
