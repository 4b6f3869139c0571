"""Real model families through the registered attention (sparse_attn/integrations/transformers):
each layer runs what it was trained with (its own sliding window, scaling, softcap (Gemma 2), learned
sinks (GPT-OSS), Dv != D (Kimi Linear's MLA))
unless the user maps its layer type; the model's own eager attention is the reference.

transformers is a test dependency (.ci/run installs it); the importorskip only matters outside CI.
"""
import pytest
import torch

import hf_models
import oracle
import sparse_attn as sa

pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from sparse_attn.integrations.transformers import register_transformers  # noqa: E402

F32 = dict(dtype=torch.float32, device="cpu")
BS = 8
COVER = sa.TopK(64, block_size=BS)  # covers every block of these lengths: dense causal
SPARSE = sa.TopK(1, block_size=BS)


def _run(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", hf_models.SOFTMAX_FAMILIES)
def test_dense_covering_equals_eager(family):
    """Full layers under a covering TopK, sliding layers on their own window: the logits equal the
    model's own eager attention within the float32 bound, and so does greedy generate with the cache
    (token for token; the prompt is longer than the window, so sliding caches are trimmed)."""
    name = register_transformers(f"sa_test_cover_{family}", COVER)
    model = hf_models.build(family, seed=1)
    ids = torch.randint(3, 128, (2, 45))
    ref = _run(model, "eager", ids)
    oracle.assert_close_contract(_run(model, name, ids), ref, **F32, what=f"{family} logits")
    prompt = ids[:1, :30]
    gen = {}
    for impl in ("eager", name):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            gen[impl] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                       do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                                       output_logits=True)
    assert torch.equal(gen[name].sequences, gen["eager"].sequences)
    oracle.assert_close_contract(torch.stack(gen[name].logits, 1), torch.stack(gen["eager"].logits, 1), **F32,
                                 what=f"{family} decode logits")


def _record(name):
    """Register `name + "_rec"`: `name`'s functions, with every attention call recorded."""
    inner = AttentionInterface()[name]
    calls = []

    def rec(module, query, key, value, attention_mask, **kwargs):
        out, _ = inner(module, query, key, value, attention_mask, **kwargs)
        calls.append((module, query, key, value, kwargs, out))
        return out, None

    AttentionInterface.register(name + "_rec", rec)
    AttentionMaskInterface.register(name + "_rec", AttentionMaskInterface()[name])
    return name + "_rec", calls


def _by_hand(q, k, v, pattern, kwargs):
    opts = {}
    if kwargs.get("softcap") is not None:
        opts["softcap"] = kwargs["softcap"]
    if kwargs.get("s_aux") is not None:
        opts["sink_logits"] = kwargs["s_aux"]
    with torch.no_grad():
        return sa.attention(q, k, v, pattern, scale=kwargs["scaling"], **opts).transpose(1, 2)


@pytest.mark.parametrize("family", hf_models.SOFTMAX_FAMILIES)
def test_sparse_full_layers_local_layers_keep_window(family):
    """With a sparse TopK registered: every full-attention layer equals sparse_attn's TopK applied by
    hand to its q, k, v (and the float64 oracle where it has the options), every sliding layer equals
    SlidingWindow(its window); both differ from dense attention (the choice matters here)."""
    name, calls = _record(register_transformers(f"sa_test_sparse_{family}", SPARSE))
    model = hf_models.build(family, seed=2)
    ids = torch.randint(3, 128, (1, 45))
    _run(model, name, ids, use_cache=False)
    kinds = [hf_models.layer_kind(model, m.layer_idx) for m, *_ in calls]
    assert kinds and len(kinds) == sum(k != "linear_attention" for k in
                                       (hf_models.layer_kind(model, i) for i in range(4)))
    for (module, q, k, v, kwargs, out), kind in zip(calls, kinds):
        pattern = SPARSE if kind == "full_attention" else sa.SlidingWindow(hf_models.WINDOW)
        assert q.shape[-1] == (24 if family == "kimi_linear" else 16) and v.shape[-1] == 16  # MLA: Dv != D
        torch.testing.assert_close(out, _by_hand(q, k, v, pattern, kwargs), rtol=1e-5, atol=1e-6)
        exact = oracle.oracle_attention(q, k, v, pattern, scale=kwargs["scaling"], softcap=kwargs.get("softcap"),
                                        sink_logits=kwargs.get("s_aux")).transpose(1, 2)
        oracle.assert_close_contract(out, exact.float(), **F32, what=f"{family} layer {module.layer_idx}")
        assert oracle.rel_err(out, _by_hand(q, k, v, sa.Dense(), kwargs)) > 1e-3, f"{kind} is dense here"


def test_layer_type_mapping():
    """{"sliding_attention": p} replaces the sliding layers' window and leaves full layers dense;
    unknown layer types raise ValueError naming them."""
    name, calls = _record(register_transformers("sa_test_map", {"sliding_attention": sa.SlidingWindow(5, sinks=1)}))
    model = hf_models.build("gemma3", seed=3)
    ids = torch.randint(3, 128, (1, 40))
    _run(model, name, ids, use_cache=False)
    assert [m.layer_idx for m, *_ in calls] == [0, 1, 2, 3]
    for module, q, k, v, kwargs, out in calls:
        local = hf_models.layer_kind(model, module.layer_idx) == "sliding_attention"
        want = sa.SlidingWindow(5, sinks=1) if local else sa.Dense()
        torch.testing.assert_close(out, _by_hand(q, k, v, want, kwargs), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"'chunked_attention'.*'local'|'local'.*'chunked_attention'"):
        register_transformers("sa_test_badmap", {"chunked_attention": COVER, "local": COVER})
    with pytest.raises(TypeError, match="sliding_attention"):
        register_transformers("sa_test_badval", {"sliding_attention": 8})


def test_left_padding_with_sliding_layers():
    """A left-padded batch on a mixed model (Qwen2: full and sliding layers): each row's logits equal
    the row run alone, and batched generate continues row 1 as if alone."""
    name = register_transformers("sa_test_pad_mixed", COVER)
    model = hf_models.build("qwen2", seed=4)
    ids = torch.randint(3, 128, (2, 41))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = _run(model, name, ids, attention_mask=mask, position_ids=pos)
    oracle.assert_close_contract(padded[1:, 9:], _run(model, name, ids[1:, 9:]), **F32, what="left-padded row")
    with torch.no_grad():
        g = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        g1 = model.generate(ids[1:, 9:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(g[1, 41:], g1[0, 32:])
