"""Tiny random transformers models built from configs (no download), one per family the
integration covers; shared by tests/test_transformers_models.py and test_transformers_linear.py.

Widths are tiny (hidden 64, 4 layers, head dim 16) but every layer mix is the family's own:
sliding windows of 24 tokens (the tests run 45-token prompts, so windows matter), Gemma 3's
local/global alternation, GPT-OSS's alternate sliding layers with sinks, the hybrids' linear
layers. `initializer_range=0.1` (instead of 0.02) makes the attention scores far from uniform, so
a wrong window or a wrong pattern shows in the logits.
"""
from __future__ import annotations

import torch

WINDOW = 24
SOFTMAX_FAMILIES = ["llama", "mistral", "qwen2", "gemma3", "gemma2", "gpt_oss", "kimi_linear", "qwen3_next",
                    "minimax"]
LINEAR_FAMILIES = ["qwen3_next", "kimi_linear", "minimax"]


def config(family: str):
    import transformers as T

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, initializer_range=0.1,
                  attention_dropout=0.0)
    moe = dict(num_experts_per_tok=2)
    if family == "llama":
        return T.LlamaConfig(**common)
    if family == "mistral":
        return T.MistralConfig(**common, sliding_window=WINDOW)
    if family == "qwen2":  # layers 0-1 full, 2-3 sliding
        return T.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
    if family == "gemma3":  # sliding, full, sliding, full
        return T.Gemma3TextConfig(**common, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2,
                                  query_pre_attn_scalar=16)
    if family == "gemma2":  # sliding, full, ... with attention logit soft-capping (5: it bites)
        return T.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                              attn_logit_softcapping=5.0)
    if family == "gpt_oss":  # sliding, full, ... with learned sinks
        c = dict(common, intermediate_size=32)
        return T.GptOssConfig(**c, head_dim=16, sliding_window=WINDOW, num_local_experts=4, **moe)
    if family == "qwen3_next":  # linear, linear, linear, full
        return T.Qwen3NextConfig(**common, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                 linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=32, **moe)
    if family == "kimi_linear":  # MLA layers: q/k head dim 16 + 8 = 24, v head dim 16; kv heads = heads (MLA)
        return T.KimiLinearConfig(**dict(common, num_key_value_heads=4), pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, qk_nope_head_dim=16,
                                  qk_rope_head_dim=8, v_head_dim=16, kv_lora_rank=32, linear_head_dim=16,
                                  linear_num_heads=4, num_local_experts=4, moe_intermediate_size=32,
                                  layer_types=["linear_attention", "full_attention", "linear_attention",
                                               "full_attention"], **moe)
    if family == "minimax":  # full, linear, full, linear (lightning blocks of 16 tokens)
        return T.MiniMaxConfig(**common, head_dim=16, num_local_experts=4, block_size=16, **moe)
    raise ValueError(f"unknown family {family!r}")


def build(family: str, seed: int = 0):
    """A float32 model of `family` in eval mode, weights drawn from `seed`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(family), attn_implementation="eager").eval()


def layer_kind(model, layer_idx: int) -> str:
    """The attention the model was trained with on layer `layer_idx`: "full_attention",
    "sliding_attention" or "linear_attention" (from the config, not from the integration)."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return types[layer_idx]
    return "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
