"""The bench suite runs end to end (one tiny case, no compiler, no plots) and writes its outputs.

Timings are not checked here (speed targets live in the bench itself, as ratios in one run);
this only guards the bench's plumbing: cases, implementations, roofline, table, JSON and CSV."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, SPARSE_ATTN_DISABLE_JIT="1")
    cmd = [sys.executable, "-m", "bench", "--quick", "--filter", "prefill/dense/fp32/S1024", "--impl",
           "sparse_attn,sdpa.flash", "--no-plots", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    text = json.dumps(data)
    assert "sdpa" in text and "sparse_attn" in text
    csvs = list(tmp_path.glob("*.csv"))
    assert csvs, "no CSV written"
    rows = list(csv.DictReader(csvs[0].open()))
    assert rows and any("sparse_attn" in json.dumps(r) for r in rows)


def test_call_estimates_never_borrow_across_pattern_families():
    """The bench skips a call whose estimate overruns the budget; the estimate borrows rates seen
    earlier in the run, within one pattern family only (a window rate once made a reference TopK
    call look 100x cheaper than it was)."""
    import torch

    from bench.runner import PRIOR_FRACTION, Calibration

    c = Calibration(roofline={})
    c.update(("prefill", "k", torch.float32, "window"), roof_s=1.0, seconds=2.0)  # rate 0.5
    assert c.seconds(("prefill", "k", torch.float32, "window"), 3.0) == 6.0  # seen
    assert c.seconds(("prefill", "k", torch.bfloat16, "window"), 3.0) == 6.0  # other dtype, same family
    assert c.seconds(("train", "k", torch.float32, "window"), 3.0) == 6.0  # same regime
    assert c.seconds(("prefill", "other", torch.float32, "window"), 3.0) == 6.0  # fastest of the family
    assert c.seconds(("prefill", "k", torch.float32, "topk"), 3.0) == 3.0 / PRIOR_FRACTION  # not borrowed
    assert c.seconds(("decode", "k", torch.float32, "window"), 3.0) == 3.0 / PRIOR_FRACTION  # other regime
