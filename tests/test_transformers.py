"""The transformers integration (sparse_attn/integrations/transformers/) on a tiny random Llama.

transformers is a test dependency: .ci/run installs it, so the importorskip below only matters
outside CI.
"""
import subprocess
import sys

import pytest
import torch

import oracle
import sparse_attn as sa

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from sparse_attn.integrations.transformers import add_window_linear_gates, register_transformers  # noqa: E402

F32 = dict(dtype=torch.float32, device="cpu")
BS = 8  # block size of the TopK patterns: 45 tokens = 6 blocks


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _use(model, impl):
    """Switch the attention of a built model (transformers 5.x API; 4.5x: the config field)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def _logits(model, impl, ids, **kw):
    _use(model, impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def test_import_does_not_import_transformers():
    code = "import sys, sparse_attn; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", [None, "cpu"], ids=["auto", "cpu"])
def test_dense_equivalent_topk_matches_sdpa(backend):
    """TopK with topk >= the number of blocks is dense causal: logits equal attn_implementation="sdpa".
    The scheduler routes it to PyTorch's SDPA itself (auto); backend="cpu" runs the C++ block kernel."""
    if backend == "cpu":
        from sparse_attn.backends.cpu.kernels import CpuBlockSparse
        why = CpuBlockSparse().unavailable()
        if why:
            pytest.skip(f"the cpu backend did not build here: {why}")
    name = register_transformers(f"sparse_attn_test_topk_all_{backend}", sa.TopK(64, block_size=BS),
                                 backend=backend)
    model = _model()
    ids = torch.randint(0, 128, (2, 37))
    oracle.assert_close_contract(_logits(model, name, ids), _logits(model, "sdpa", ids), **F32, what="logits")


def _attention_inputs(model, ids):
    """Layer 0's q, k, v in (B, H, S, D) exactly as the model computes them, and its attention output."""
    attn = model.model.layers[0].self_attn
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["hidden"], seen["pos"], seen["out"] = kwargs.get("hidden_states", args[0] if args else None), \
            kwargs["position_embeddings"], out[0]

    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        h.remove()
    x = seen["hidden"]
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *seen["pos"])
    return attn, q, k, v, seen["out"]


@pytest.mark.parametrize("pattern", [sa.TopK(1, block_size=BS), sa.SlidingWindow(9, sinks=2),
                                     sa.WindowLinear(7, sinks=1)], ids=["topk", "window", "window_linear"])
def test_one_layer_equals_sparse_attn_applied_by_hand(pattern):
    """Layer 0 of the model under the registered pattern == o_proj(sparse_attn.attention(q, k, v))
    with q, k, v projected by hand (GQA heads not repeated), and == the float64 oracle."""
    name = register_transformers(f"sparse_attn_test_{type(pattern).__name__}", pattern)
    model = _model(1)
    if isinstance(pattern, sa.WindowLinear):
        assert add_window_linear_gates(model) == 2
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sparse_attn_gate.uniform_(-2, 2)
    _use(model, name)
    ids = torch.randint(0, 128, (2, 45))
    attn, q, k, v, out = _attention_inputs(model, ids)
    assert k.shape[1] == 2 and q.shape[1] == 4
    gate = getattr(attn, "sparse_attn_gate", None)
    with torch.no_grad():
        mine = sa.attention(q, k, v, pattern, scale=attn.scaling, gate=gate)
        ref = oracle.oracle_attention(q.double(), k.double(), v.double(), pattern, scale=attn.scaling,
                                      gate=None if gate is None else gate.double())
        by_hand = attn.o_proj(mine.transpose(1, 2).reshape(*ids.shape, -1))
        exact = attn.o_proj(ref.float().transpose(1, 2).reshape(*ids.shape, -1))
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-6)
    oracle.assert_close_contract(out, exact.to(out.dtype), **F32, what="layer-0 attention")
    # and the pattern is really sparse here: dense attention gives another result
    with torch.no_grad():
        dense = attn.o_proj(sa.attention(q, k, v, sa.Dense(), scale=attn.scaling).transpose(1, 2)
                            .reshape(*ids.shape, -1))
    assert oracle.rel_err(out, dense) > 1e-3


@pytest.mark.parametrize("pattern", [sa.TopK(1, block_size=BS), sa.WindowLinear(7, sinks=1)], ids=["topk", "wl"])
def test_generate_decode_equals_prefill(pattern):
    """generate() with the KV cache (decode steps Sq = 1 against Sk cached keys) gives the logits a
    cache-free forward over the whole generated sequence gives at the same positions."""
    name = register_transformers(f"sparse_attn_test_gen_{type(pattern).__name__}", pattern)
    model = _model(2)
    if isinstance(pattern, sa.WindowLinear):
        add_window_linear_gates(model, init=0.5)
    _use(model, name)
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    seq = gen.sequences
    assert seq.shape == (2, 48)
    step_logits = torch.stack(gen.logits, dim=1)  # (B, 8, V): logits that produced tokens 40..47
    full = _logits(model, name, seq[:, :-1], use_cache=False)[:, 39:]
    oracle.assert_close_contract(step_logits, full, **F32, what="decode vs prefill logits")
    assert torch.equal(full.argmax(-1), seq[:, 40:])


def test_left_padding_equals_unpadded_row():
    """A left-padded batch: each row's logits at its real tokens equal the row run alone."""
    name = register_transformers("sparse_attn_test_pad", sa.TopK(1, block_size=BS))
    model = _model(3)
    ids = torch.randint(1, 128, (2, 41))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # row 1: 9 pad tokens, then 32 tokens
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = _logits(model, name, ids, attention_mask=mask, position_ids=pos)
    alone0 = _logits(model, name, ids[:1])
    alone1 = _logits(model, name, ids[1:, 9:])
    oracle.assert_close_contract(padded[:1], alone0, **F32, what="row 0")
    oracle.assert_close_contract(padded[1:, 9:], alone1, **F32, what="row 1 (left padded)")
    with torch.no_grad():  # generate with the padded batch runs, and row 1 continues as if alone
        g = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        g1 = model.generate(ids[1:, 9:], attention_mask=mask[1:, 9:], max_new_tokens=4, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(g[1, 41:], g1[0, 32:])


def test_unsupported_inputs_raise():
    name = register_transformers("sparse_attn_test_errors", sa.SlidingWindow(8))
    model = _model(4)
    ids = torch.randint(1, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    with pytest.raises(ValueError, match="left padding"):
        _logits(model, name, ids, attention_mask=mask)
    wl = register_transformers("sparse_attn_test_nogate", sa.WindowLinear(8))
    with pytest.raises(ValueError, match="add_window_linear_gates"):
        _logits(model, wl, ids)
    with pytest.raises(TypeError, match="BlockSparse"):
        register_transformers("sparse_attn_test_bs", sa.BlockSparse(torch.ones(1, 1, 2, 2, dtype=torch.bool)))


def test_training_step_gates_get_gradients():
    """A training forward/backward through the integration: the per-layer gates are trained."""
    name = register_transformers("sparse_attn_test_train", sa.WindowLinear(6, sinks=1))
    model = _model(5)
    add_window_linear_gates(model)
    _use(model, name)
    model.train()
    ids = torch.randint(0, 128, (2, 30))
    loss = model(ids, labels=ids).loss
    loss.backward()
    for layer in model.model.layers:
        g = layer.self_attn.sparse_attn_gate.grad
        assert g is not None and g.shape == (4,) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_model_compiles_fullgraph():
    """A whole Llama forward with the registered pattern under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    name = register_transformers("sparse_attn_test_compile", sa.TopK(1, block_size=BS))
    model = _model(6)
    ids = torch.randint(0, 128, (2, 37))
    eager = _logits(model, name, ids, use_cache=False)
    with torch.no_grad():
        compiled = torch.compile(lambda x: model(x, use_cache=False).logits, fullgraph=True,
                                 backend="aot_eager")(ids)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
