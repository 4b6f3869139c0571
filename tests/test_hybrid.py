"""Hybrid stacks (linear-attention layers mixed with softmax layers): layer mix, prefill-then-decode
through the shared cache equals one full forward, gradients, bad arguments."""
import pytest
import torch

import oracle
import sparse_attn as sa
from conftest import randn
from sparse_attn.api.hybrid import HybridCache, hybrid_layers


def test_ratio_places_the_layers():
    stack = hybrid_layers(8, hidden=32, num_heads=2, ratio="3:1")
    assert stack.kinds() == ["linear"] * 3 + ["softmax"] + ["linear"] * 3 + ["softmax"]
    assert hybrid_layers(3, hidden=32, num_heads=2, ratio="0:1").kinds() == ["softmax"] * 3
    assert hybrid_layers(3, hidden=32, num_heads=2, ratio="1:0").kinds() == ["linear"] * 3
    assert hybrid_layers(5, hidden=32, num_heads=2, ratio="1:1").kinds() == ["linear", "softmax"] * 2 + ["linear"]


PATTERNS = [
    pytest.param(sa.TopK(1, block_size=16, sink_blocks=1, local_blocks=1), "per-head", id="topk-perhead"),
    pytest.param(sa.SlidingWindow(12, sinks=2), "per-token", id="window-pertoken"),
    pytest.param(sa.Dense(), None, id="dense-nodecay"),
    pytest.param(sa.WindowLinear(9, sinks=1), "per-head", id="windowlinear"),
]


@pytest.mark.parametrize("pattern,decay", PATTERNS)
def test_prefill_then_decode_equals_full_forward(pattern, decay):
    torch.manual_seed(1)
    stack = hybrid_layers(4, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, ratio="3:1",
                          softmax_pattern=pattern, decay=decay)
    x = randn(2, 75, 64)
    with torch.no_grad():
        full = stack(x)
        cache = stack.new_cache()
        pieces = [stack(x[:, :40], cache=cache)]
        pieces.append(stack(x[:, 40:43], cache=cache))  # a short chunk (speculative-decode shape)
        for t in range(43, 75):
            pieces.append(stack(x[:, t:t + 1], cache=cache))
    assert cache.length == 75
    got = torch.cat(pieces, dim=1)
    oracle.assert_close_contract(got, full, dtype=torch.float32, device="cpu", what="prefill + decode")
    # the cache: K/V for the softmax layer (all 75 tokens), a (B, H, D, Dv) state for each linear one
    assert [type(e).__name__ for e in cache.entries] == ["Tensor"] * 3 + ["tuple"]
    assert cache.entries[0].shape == (2, 4, 16, 16) and cache.entries[3][0].shape == (2, 2, 75, 16)
    # the decode path really runs: a linear layer's step is not the chunked kernel
    assert sa.api.linear.plan_linear(*(randn(2, 4, 1, 16) for _ in range(3))).kernel.name == \
        "reference.linear_recurrent"


def test_training_gradients_flow_to_every_parameter():
    stack = hybrid_layers(4, hidden=32, num_heads=2, ratio="1:1", softmax_pattern=sa.SlidingWindow(8),
                          decay="per-token")
    x = randn(2, 30, 32, requires_grad=True)
    stack(x).square().mean().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_linear_layer_matches_its_definition():
    """A single linear layer is x + W_o linear_attention(W_q x, W_k x, W_v x, decay) (float64 oracle)."""
    stack = hybrid_layers(1, hidden=24, num_heads=3, ratio="1:0", decay="per-head").double()
    layer = stack[0]
    x = randn(1, 50, 24, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (p(x).view(1, 50, 3, 8).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        decay = -torch.nn.functional.softplus(layer.decay_logit)
        o, _ = oracle.oracle_linear_attention(q, k, v, decay=decay)
        ref = x + layer.o_proj(o.transpose(1, 2).reshape(1, 50, 24))
        oracle.assert_close_contract(stack(x), ref, dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(ratio="3-1"), ValueError, "ratio"),
    (dict(ratio="0:0"), ValueError, "ratio"),
    (dict(num_heads=3, num_kv_heads=2), ValueError, "num_kv_heads"),
    (dict(decay="exp"), ValueError, "decay"),
    (dict(softmax_pattern="topk"), TypeError, "softmax_pattern"),
    (dict(num_heads=0), ValueError, "num_heads"),
])
def test_bad_arguments(kwargs, err, match):
    args = dict(hidden=32, num_heads=2, ratio="1:1")
    args.update(kwargs)
    with pytest.raises(err, match=match):
        hybrid_layers(2, **args)


def test_cache_object():
    c = HybridCache(3)
    assert len(c) == 3 and c.length == 0 and c.nbytes() == 0
