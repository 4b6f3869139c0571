"""A tiny random Llama saved to a folder, with a tokenizer trained here (nothing is downloaded).

`make_tiny_llama(path)` writes `config.json`, the weights (safetensors) and a byte-level BPE
tokenizer that vLLM and transformers load with `LLM(model=path)` / `from_pretrained(path)`.
Head dim 64 (a size vLLM's CPU backend serves), GQA 4:2, two layers; random weights with a
fixed seed, so greedy generation is deterministic but meaningless.
"""
from __future__ import annotations

import os

WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be or "
         "has had it not first one their its new after who they have two been more other all time "
         "year years city during when can into most she would about up over only three second out "
         "also made than some any school world states national later between while where")


def _corpus(n_lines: int = 400):
    import random
    rng = random.Random(0)
    words = WORDS.split()
    for _ in range(n_lines):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))


def make_tiny_llama(path: str, *, layers: int = 2, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
                    vocab: int = 512, max_positions: int = 262144, sliding_window: int | None = None,
                    seed: int = 0) -> str:
    """Write the model to `path` (created) and return `path`. `sliding_window`: a Mistral model with
    that window on every layer instead of a Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 2, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                  max_position_embeddings=max_positions, bos_token_id=fast.bos_token_id,
                  eos_token_id=fast.eos_token_id, tie_word_embeddings=False, rope_theta=1e6,
                  torch_dtype="float32")
    torch.manual_seed(seed)
    if sliding_window is None:
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    with torch.no_grad():  # larger logits than the default init: greedy choices far from ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    return path
