"""`hybrid_layers(..., linear_kind="delta")`: Gated DeltaNet layers mixed with softmax layers, their
state in the hybrid cache; prefill + decode equals one forward, and a delta layer equals the float64
step-by-step evaluation of its projections."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sparse_attn as sa
from delta_oracle import oracle_delta_rule
from oracle import rel_err


def test_delta_stack_kinds_and_decode_equals_forward():
    stack = sa.hybrid_layers(4, hidden=32, num_heads=4, num_kv_heads=2, head_dim=8, ratio="3:1",
                             softmax_pattern=sa.SlidingWindow(5), linear_kind="delta")
    assert stack.kinds() == ["delta", "delta", "delta", "softmax"]
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        full = stack(x)
        cache = stack.new_cache()
        parts = [stack(x[:, :17], cache=cache)]
        sizes = []
        for t in range(17, 23):
            parts.append(stack(x[:, t:t + 1], cache=cache))
            sizes.append(cache.nbytes())
    assert rel_err(torch.cat(parts, dim=1), full) <= 1e-5
    assert len(set(sizes)) == 1  # delta states and the window's K/V: constant memory in decode
    assert tuple(cache.entries[0].shape) == (2, 4, 8, 8)


def test_delta_layer_equals_the_oracle():
    stack = sa.hybrid_layers(1, hidden=24, num_heads=4, num_kv_heads=2, head_dim=6, ratio="1:0",
                             linear_kind="delta")
    layer = stack[0]
    x = torch.randn(1, 30, 24)
    with torch.no_grad():
        y = stack(x)

        def heads(t, n):
            return t.view(1, 30, n, 6).transpose(1, 2)

        q, k, v = heads(layer.q_proj(x), 2), heads(layer.k_proj(x), 2), heads(layer.v_proj(x), 4)
        beta = torch.sigmoid(layer.b_proj(x)).transpose(1, 2)
        g = -F.softplus(layer.g_proj(x)).transpose(1, 2)
        o, _ = oracle_delta_rule(q, k, v, beta, decay=g, qk_l2norm=True)
        ref = x.double() + layer.o_proj.double()(o.transpose(1, 2).reshape(1, 30, 24))
    assert rel_err(y, ref) <= 1e-5
