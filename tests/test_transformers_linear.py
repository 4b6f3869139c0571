"""`use_linear_kernels`: the linear layers of Qwen3-Next (Gated DeltaNet), Kimi Linear (KDA) and
MiniMax (lightning attention) on sparse_attn's `delta_rule` / `linear_attention`, against the same
model running transformers' own code for them (the softmax layers run eager in both)."""
import inspect

import pytest
import torch

import hf_models
import oracle

pytest.importorskip("transformers")
import sparse_attn.integrations.transformers.linear as sa_linear  # noqa: E402
from sparse_attn.integrations.transformers import use_linear_kernels  # noqa: E402

F32 = dict(dtype=torch.float32, device="cpu")


def _counting(monkeypatch):
    """Count the sparse_attn kernel calls the switched layers make (so a test cannot pass on the
    model's own code)."""
    calls = {"n": 0}
    for fn in ("delta_rule", "linear_attention"):
        orig = getattr(sa_linear, fn)

        def wrapped(*a, _orig=orig, **kw):
            calls["n"] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(sa_linear, fn, wrapped)
    return calls


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", hf_models.LINEAR_FAMILIES)
def test_linear_layers_match_the_models_own(family, monkeypatch):
    """Prefill logits, a chunked prefill through the cache (state handed on), and greedy generate
    with the cache (decode steps Sq = 1) equal the model's own linear layers."""
    own = hf_models.build(family, seed=5)
    mine = hf_models.build(family, seed=5)
    n_linear = [hf_models.layer_kind(own, i) for i in range(4)].count("linear_attention")
    calls = _counting(monkeypatch)
    assert use_linear_kernels(mine) == n_linear > 0
    assert use_linear_kernels(mine) == n_linear  # idempotent
    ids = torch.randint(3, 128, (2, 45))
    ref = _logits(own, ids)
    assert calls["n"] == 0  # the unswitched model still runs transformers' functions
    oracle.assert_close_contract(_logits(mine, ids), ref, **F32, what=f"{family} prefill logits")
    assert calls["n"] == n_linear

    # chunked prefill: 30 tokens, then 15 more through the cache (Sq > 1 from a cached state)
    with torch.no_grad():
        first = mine(ids[:, :30], use_cache=True)
        kw = "cache" if "cache" in inspect.signature(mine.forward).parameters else "past_key_values"  # 5.x name
        rest = mine(ids[:, 30:], use_cache=True, **{kw: first.past_key_values}).logits
    oracle.assert_close_contract(rest, ref[:, 30:], **F32, what=f"{family} chunked prefill logits")

    prompt = ids[:1, :30]
    with torch.no_grad():
        g_own = own.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
        before = calls["n"]
        g_mine = mine.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True, output_logits=True)
    assert calls["n"] - before == 4 * n_linear  # the prefill and 3 decode steps per layer
    assert torch.equal(g_mine.sequences, g_own.sequences)
    oracle.assert_close_contract(torch.stack(g_mine.logits, 1), torch.stack(g_own.logits, 1), **F32,
                                 what=f"{family} decode logits")

    assert use_linear_kernels(mine, enable=False) == n_linear  # back to transformers' own code
    before = calls["n"]
    torch.testing.assert_close(_logits(mine, ids), ref, rtol=0, atol=0)
    assert calls["n"] == before


def test_unknown_model_raises():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no linear layer"):
        use_linear_kernels(hf_models.build("llama"))
    with pytest.raises(TypeError, match="model"):
        use_linear_kernels("qwen3_next")
