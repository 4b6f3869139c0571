"""bench.quality: its measurements follow the contract's visible-key rules, a pattern that covers
every key measures as dense, training is seeded, and the whole pipeline runs at toy sizes (CI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import sparse_attn as sa
from bench.quality.measure import dense_mass, mixers_for, rel_err, visible_keys
from bench.quality.model import DENSE, Config, Model
from bench.quality.task import FILLER, KEYS, VOCAB, make_batch
from bench.quality.train import Phase, run_phases

ROOT = Path(__file__).resolve().parent.parent


def _qk(h=2, s=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, h, s, d, generator=g), torch.randn(1, h, s, d, generator=g)


def test_visible_keys_follow_the_contract():
    q, k = _qk()
    rows = torch.tensor([0, 5, 63, 64, 130, 199])
    j = torch.arange(200)
    win = visible_keys(sa.SlidingWindow(50, sinks=3), q, k, rows)
    want = (j[None] <= rows[:, None]) & ((rows[:, None] - j[None] < 50) | (j[None] < 3))
    assert torch.equal(win[0], want) and torch.equal(win[1], want)
    pat = sa.TopK(2, block_size=32)
    vis = visible_keys(pat, q, k, rows)
    sel = sa.select_blocks(q, k, pat)[0]  # (Hkv, S, nb)
    for h in range(2):
        for i, r in enumerate(rows.tolist()):
            blocks = sel[h, r].nonzero().flatten().tolist()
            want = torch.zeros(200, dtype=torch.bool)
            for b in blocks:
                want[b * 32:(b + 1) * 32] = True
            want &= j <= r
            assert torch.equal(vis[h, i], want), (h, r)


def test_mass_is_the_softmax_share_inside_the_visible_keys():
    q, k = _qk(s=100)
    rows = torch.tensor([10, 50, 99])
    vis = visible_keys(sa.SlidingWindow(8), q, k, rows)
    got = dense_mass(q, k, rows, vis)
    q64, k64 = q.double(), k.double()
    for h in range(2):
        share = 0.0
        for r in rows.tolist():
            p = torch.softmax(q64[0, h, r] @ k64[0, h, :r + 1].T / 4.0, dim=-1)
            share += p[max(0, r - 7):].sum().item() / len(rows)
        assert abs(got[h].item() - share) < 1e-5
    full = dense_mass(q, k, rows, visible_keys(sa.Dense(), q, k, rows))
    assert torch.allclose(full, torch.ones(2), atol=1e-5)


def test_pattern_covering_every_key_measures_as_dense():
    torch.manual_seed(0)
    model = Model(Config(vocab=VOCAB, d_model=32, heads=2, layers=2))
    b = make_batch(1, 300, pairs=4, generator=torch.Generator().manual_seed(1))
    capture = []
    with torch.no_grad():
        dense_logits = model(b.tokens, None, capture=capture, positions=b.answer_pos)
        everything = sa.TopK(1000, block_size=32)  # selects every causal block: dense
        logits = model(b.tokens, mixers_for(everything, 2), positions=b.answer_pos)
        assert (logits - dense_logits).abs().max() < 1e-4
        small = sa.TopK(1, block_size=32)
        for layer, (q, k, v, o) in zip(model.layers, capture):
            assert rel_err(layer.mix(q, k, v, mixers_for(everything, 2)[0]), o).max() < 1e-5
            assert rel_err(layer.mix(q, k, v, mixers_for(small, 2)[0]), o).max() > 1e-3  # a real difference
            rows = b.answer_pos[0]
            assert torch.allclose(dense_mass(q, k, rows, visible_keys(everything, q, k, rows)), torch.ones(2), atol=1e-5)
    assert mixers_for(("hybrid", 1), 2)[0].kind == "linear" and mixers_for(("hybrid", 1), 2)[1] == DENSE


def test_task_plants_retrievable_pairs():
    b = make_batch(3, 512, pairs=16, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        for first, second in zip(b.pair_pos[i].tolist(), b.answer_pos[i].tolist()):
            key = b.tokens[i, first].item()
            assert FILLER <= key < FILLER + KEYS and b.tokens[i, second].item() == key
            assert b.targets[i, second].item() == b.tokens[i, first + 1].item() == b.tokens[i, second + 1].item()
        assert (b.targets[i] != -100).sum() == 16


def test_training_is_seeded():
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        m = Model(Config(vocab=VOCAB, d_model=32, heads=2, layers=1))
        run_phases(m, [Phase(64, 2, 2, 4)], lr=1e-3, seed=5, log_every=100)
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_quality_smoke_run(tmp_path):
    """Every step of `python -m bench.quality` at toy sizes: train, evaluate, fine-tune through
    sparse_attn's backward, evaluate again, write results.json and the docs (to a temp folder)."""
    env = dict(os.environ, SPARSE_ATTN_DISABLE_JIT="1")
    cmd = [sys.executable, "-m", "bench.quality", "--smoke", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "results.json").read_text())
    for key in ("zero_shot", "finetuned"):
        for per_len in out[key].values():
            assert set(per_len) >= {"dense", "topk4", "hybrid(L0 linear)"}
            for name, r in per_len.items():
                assert 0.0 <= r["acc"] <= 1.0
                for layer in r["layers"]:
                    assert all(0.0 <= m <= 1.0 + 1e-5 for m in layer.get("mass_answer", []))
                    if name == "dense":
                        assert max(layer["err_all"]) == 0.0
    assert (tmp_path / "model.pt").exists() and out["finetune_log"]
    from bench.quality.report import write_docs
    write_docs(out, doc=str(tmp_path / "quality.md"), plot=str(tmp_path / "plot.svg"))
    text = (tmp_path / "quality.md").read_text()
    assert "| topk4 |" in text and (tmp_path / "plot.svg").read_text().startswith("<svg")
