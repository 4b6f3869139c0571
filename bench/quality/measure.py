"""What a pattern loses against dense attention on the trained model, measured three ways.

* task accuracy with the pattern in the model (end to end: every layer runs the pattern);
* per layer and head, on the dense model's own q, k, v (one dense forward, captured): the share of
  the dense attention probability mass that lies inside the keys the pattern visits, at the
  answer rows (where the retrieval happens) and at rows spread over the sequence;
* per layer and head, the relative error of the pattern's attention output against dense on those
  same q, k, v (`||o_pattern - o_dense|| / ||o_dense||`, over the answer rows and over all rows).

Dense probabilities are computed for the chosen rows only, in float32, never `S x S`.
"""
from __future__ import annotations

import torch

import sparse_attn as sa

from .model import DENSE, Mixer, Model
from .task import make_batch

#: rows spread over the sequence for the "all rows" mass (besides the answer rows)
SPREAD_ROWS = 128


def visible_keys(pattern, q, k, rows: torch.Tensor) -> torch.Tensor | None:
    """Bool `(H, len(rows), S)`: keys the pattern's softmax visits from each row (causal), None
    for a layer without a softmax over keys (linear attention). WindowLinear: its window."""
    s = k.shape[2]
    j = torch.arange(s)
    causal = j[None, :] <= rows[:, None]  # (R, S)
    h = q.shape[1]
    if pattern is None or isinstance(pattern, sa.Dense):
        return causal.expand(h, -1, -1)
    if isinstance(pattern, (sa.SlidingWindow, sa.WindowLinear)):
        near = rows[:, None] - j[None, :] < pattern.window
        sinks = j[None, :] < pattern.sinks
        return (causal & (near | sinks)).expand(h, -1, -1)
    if isinstance(pattern, (sa.TopK, sa.InfLLMv2)):
        sel = sa.select_blocks(q, k, pattern)[0]  # (Hkv, S, nb): the selection of every row at once
        blocks = sel[:, rows]  # (Hkv, R, nb)
        per_key = blocks[..., j // pattern.block_size]  # (Hkv, R, S)
        g = h // k.shape[1]
        return per_key.repeat_interleave(g, dim=0) & causal
    raise TypeError(f"no visible-key rule for {type(pattern).__name__}")


def dense_mass(q, k, rows, visible) -> torch.Tensor:
    """Mean over `rows` of the dense softmax probability inside `visible`, per head `(H,)`."""
    qr = q[0][:, rows].float()  # (H, R, D)
    scores = torch.einsum("hrd,hsd->hrs", qr, k[0].float()) * q.shape[-1] ** -0.5
    causal = torch.arange(k.shape[2])[None, None, :] <= rows[None, :, None]
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return (p * visible).sum(-1).mean(-1)


def rel_err(a, b, rows=None) -> torch.Tensor:
    """Per head `(H,)` relative error of `a` against `b` `(1, H, S, D)`, over `rows` or all rows."""
    if rows is not None:
        a, b = a[:, :, rows], b[:, :, rows]
    sq = lambda x: x.float().pow(2).sum(dim=(0, 2, 3))
    return (sq(a - b) / sq(b).clamp_min(1e-30)).sqrt()


def mixers_for(spec, layers: int):
    """A pattern entry -> one Mixer per layer. `spec`: a sparse_attn pattern (every layer), or
    ("hybrid", n_linear): the first n_linear layers linear attention, the rest dense."""
    if isinstance(spec, tuple) and spec[0] == "hybrid":
        return [Mixer("linear") if i < spec[1] else DENSE for i in range(layers)]
    if isinstance(spec, sa.Dense):
        return [DENSE] * layers
    return [Mixer("pattern", spec)] * layers


@torch.no_grad()
def evaluate(model: Model, length: int, patterns: dict, *, seqs: int, pairs: int, seed: int, log=None) -> dict:
    """{pattern name: {"acc", "layers": [{"mass_answer", "mass_spread", "err_answer", "err_all"} per
    layer, each a list per head]}} at `length`, over `seqs` sequences (seeded: the same sequences
    for every pattern and every model)."""
    g = torch.Generator().manual_seed(seed + length)
    out = {name: {"correct": 0, "count": 0, "layers": None} for name in patterns}
    n_layers = len(model.layers)
    for _ in range(seqs):
        b = make_batch(1, length, pairs=pairs, generator=g)
        capture: list = []
        model(b.tokens, None, capture=capture, positions=b.answer_pos)  # the dense trajectory
        ans = b.answer_pos[0]
        spread = torch.linspace(length // 8, length - 1, SPREAD_ROWS).long()
        for name, spec in patterns.items():
            mixers = mixers_for(spec, n_layers)
            logits = model(b.tokens, mixers, positions=b.answer_pos)
            tgt = b.targets[0, ans]
            r = out[name]
            r["correct"] += int((logits[0].argmax(-1) == tgt).sum())
            r["count"] += len(ans)
            per_layer = []
            for layer, m, (q, k, v, o_dense) in zip(model.layers, mixers, capture):
                o = layer.mix(q, k, v, m)
                pat = None if m.kind == "sdpa" else m.pattern
                entry = {"err_answer": rel_err(o, o_dense, ans), "err_all": rel_err(o, o_dense)}
                if m.kind != "linear":
                    entry["mass_answer"] = dense_mass(q, k, ans, visible_keys(pat, q, k, ans))
                    entry["mass_spread"] = dense_mass(q, k, spread, visible_keys(pat, q, k, spread))
                per_layer.append(entry)
            if r["layers"] is None:
                r["layers"] = [{k2: v2 / seqs for k2, v2 in e.items()} for e in per_layer]
            else:
                for acc, e in zip(r["layers"], per_layer):
                    for k2, v2 in e.items():
                        acc[k2] = acc[k2] + v2 / seqs
    result = {}
    for name, r in out.items():
        result[name] = {"acc": r["correct"] / max(r["count"], 1), "answers": r["count"],
                        "layers": [{k2: [round(float(x), 5) for x in v2] for k2, v2 in e.items()} for e in r["layers"]]}
        if log:
            log(f"    {length:6d} {name:18s} acc {result[name]['acc']:.3f}")
    return result
