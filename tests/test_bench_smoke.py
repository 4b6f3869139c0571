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

import pytest
from conftest import needs_jit

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


def test_a_dense_baseline_is_keyed_as_dense_in_every_case():
    """SDPA makes the same dense causal call in a TopK case as in a dense one: its estimate must come
    from dense rates, not from our TopK kernel's (the first GPU run skipped SDPA at 128K as a 68 s
    call after our TopK kernel had run at 2% of the roofline)."""
    import types

    import torch

    from bench.runner import Calibration, calibration_key

    topk = types.SimpleNamespace(kind="prefill", dtype=torch.bfloat16, family="topk")
    sdpa = types.SimpleNamespace(computes="dense", group="sdpa", name="sdpa.flash")
    ours = types.SimpleNamespace(computes="pattern", group="sparse_attn", name="sparse_attn")
    assert calibration_key(topk, sdpa, "dense causal") == ("prefill", "sdpa.flash", torch.bfloat16, "dense")
    assert calibration_key(topk, ours, "triton.block_sparse") == ("prefill", "triton.block_sparse", torch.bfloat16,
                                                                  "topk")
    c = Calibration(roofline={})
    c.update(calibration_key(topk, ours, "triton.block_sparse"), roof_s=1.0, seconds=50.0)  # our slow TopK
    dense = types.SimpleNamespace(kind="prefill", dtype=torch.bfloat16, family="dense")
    c.update(calibration_key(dense, sdpa, "dense causal"), roof_s=1.0, seconds=1.5)  # SDPA on the dense case
    assert c.seconds(calibration_key(topk, sdpa, "dense causal"), 2.0) == 3.0


def test_eta_is_there_before_the_first_case_and_follows_the_measured_pace():
    from bench.progress import Progress

    p = Progress(3, stream=open(os.devnull, "w"), estimates=[10.0, 20.0, 30.0])
    assert p.eta() == 60.0  # from the estimates alone, before anything ran
    p.start_case(1, "a")
    p._t_case -= 20.0  # the first case took twice its estimate
    p.end_case(1, "a done")
    assert abs(p.scale() - 2.0) < 0.01
    assert abs(p.eta() - 100.0) < 0.5


def test_default_suite_is_a_slice_of_the_sweep_and_says_what_it_left_out():
    import torch

    from bench import suite
    from bench.cases import sweep

    cpu = torch.device("cpu")
    cases = sweep(cpu, False, [torch.float32])
    keep, left = suite.pick_cases(cases, cpu)
    kinds = {c.kind for c in keep}
    assert kinds == {"prefill", "decode", "train", "linear-prefill", "linear-decode", "delta-prefill", "delta-train"}
    assert all("length" in c.sweeps for c in keep) and len(keep) + len(left) == len(cases)
    assert {c.family for c in keep if c.kind == "prefill"} == {"dense", "window", "topk", "blocksparse", "windowlinear"}
    lines = suite.left_out_summary(left, [])
    assert len(lines) >= 4 and sum(int(ln.split(": ")[1].split()[0]) for ln in lines) == len(left)


def test_case_estimates_come_before_any_measurement():
    """The ETA's estimate of a case uses the scheduler's cost() of the kernel it would run (asked
    with zero-stride stand-ins: nothing allocated, nothing run) and is zero for a skipped row."""
    import torch

    from bench.cases import Case
    from bench.estimate import row_seconds, sparse_attn_call_s

    cpu = torch.device("cpu")
    case = Case("prefill", "topk", 16, 1, 32, 8, 1 << 20, 1 << 20, 128, torch.float32)  # 1M tokens: never allocated
    s = sparse_attn_call_s(case, case.make_pattern(cpu), cpu, backend="reference")
    assert s is not None and s > 1.0
    assert row_seconds(s, timing_s=1.0, budget_s=60.0, device=cpu) == (0.0 if 1.5 * s > 60 else s)
    assert row_seconds(0.01, timing_s=1.0, budget_s=60.0, device=cpu) == 0.01 + 0.3  # 30 calls at most


def test_long_generation_rows(tmp_path):
    """bench.longgen end to end at toy sizes: SDPA over a growing tensor, each pattern through the
    public cache API, linear attention through its state; tokens/s and cache bytes reported."""
    out = tmp_path / "lg.json"
    env = dict(os.environ, SPARSE_ATTN_DISABLE_JIT="1")
    cmd = [sys.executable, "-m", "bench.longgen", "--prompt", "256", "--new", "8", "--dtype", "float32",
           "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {(r["case"].split("/")[1], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    for key in (("dense", "sdpa (torch.cat + F.sdpa)"), ("dense", "sparse_attn"), ("window1024", "sparse_attn"),
                ("topk16", "sparse_attn"), ("windowlinear1024", "sparse_attn"), ("linear", "sparse_attn")):
        r = rows[key]
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["cache_bytes"] > 0, r
    assert 0.0 <= rows[("topk16", "sparse_attn")]["selection_share"] <= 1.0
    # what each holds: the float32 (Hq, D, D) state; K and V of the 264 tokens
    assert rows[("linear", "sparse_attn")]["cache_bytes"] == 8 * 128 * 128 * 4
    assert rows[("dense", "sdpa (torch.cat + F.sdpa)")]["cache_bytes"] == 2 * 2 * 264 * 128 * 4
    assert "ModelCache" in rows[("windowlinear1024", "sparse_attn")]["pattern"]  # its decode path


def test_prefill_ab_takes_the_vllm_plugins_patterns_plus_full():
    import argparse

    import pytest

    import sparse_attn as sa
    from bench.prefill_ab import parse_pattern

    assert parse_pattern("full") == sa.Dense(causal=False)
    assert parse_pattern("dense") == sa.Dense()
    assert parse_pattern("window:128:4") == sa.SlidingWindow(128, sinks=4)
    assert parse_pattern("topk:8:16") == sa.TopK(8, block_size=16)
    with pytest.raises(argparse.ArgumentTypeError, match="the window must be >= 1"):
        parse_pattern("window:0")


def test_top_blocks_ab_compares_a_revision_with_the_tree():
    """bench/top_blocks_ab.py loads a revision's selection and reports one row per case, same blocks."""
    import bench.top_blocks_ab as ab

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "top_blocks_ab.py"), "--rev", "HEAD",
                          "--rounds", "1", "--reps", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| (")]
    assert len(rows) == len(ab.CASES)
    assert all(row.endswith("| yes |") for row in rows), out.stdout


@needs_jit
def test_decode_ab_layouts_hold_the_same_cache():
    """bench/decode_ab.py's three layouts (odd context over 16-token pages: a partial last page) give the
    decode of the same keys, close to the float64 softmax: the tree's kernel returns the same bits from
    the contiguous and the paged cache (float32 products over K rows sum in an order that does not
    depend on where a row lies); the `vllm` pages keep float32 K as columns (the plugin's layout), summed
    in another order. The revision's build is not made here (minutes of compiling)."""
    import torch

    from bench import decode_ab

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 32, generator=g)
    k, v = torch.randn(1, 2, 1000, 32, generator=g), torch.randn(1, 2, 1000, 32, generator=g)
    outs = [decode_ab.decode_call(decode_ab._ext(), q, decode_ab.make_cache(layout, k, v, 16, g))[0]
            for layout in decode_ab.LAYOUTS]
    kk, vv = k.double().repeat_interleave(2, dim=1), v.double().repeat_interleave(2, dim=1)
    ref = torch.softmax(q.double() @ kk.transpose(-1, -2) * 32 ** -0.5, dim=-1) @ vv
    assert decode_ab.LAYOUTS == ("contiguous", "paged", "vllm")
    assert all(torch.allclose(o.double(), ref, atol=1e-5, rtol=1e-5) for o in outs)
    assert torch.equal(outs[1], outs[0])


def test_decode_ab_vllm_layout_is_the_plugins():
    """bench/decode_ab.py's `vllm` layout is the pool the vLLM plugin writes (its PyTorch writer,
    `write_pages_indexed`, through the same page table), not another packing of `(pages, Hkv, page, 2 D)`."""
    import torch

    from bench import decode_ab
    from sparse_attn.integrations.vllm.pages import write_pages_indexed

    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g)
    kp, vp, lengths, table, page_size = decode_ab.make_cache("vllm", k, v, 16, g)
    pool = kp.untyped_storage()
    assert vp.untyped_storage().data_ptr() == pool.data_ptr()
    ours = torch.zeros(table.shape[1], 2, 16, 16)
    pos = torch.arange(100)
    slots = table[0, pos // 16].long() * 16 + pos % 16
    write_pages_indexed(ours, k[0].transpose(0, 1), v[0].transpose(0, 1), slots)
    built = torch.empty(0).set_(pool, 0, ours.shape)
    assert torch.equal(built, ours)


def test_decode_ab_refuses_bad_arguments():
    """bench/decode_ab.py names a bad argument before it builds anything."""
    from bench import decode_ab

    for bad in (["--context", "0"], ["--hq", "3"], ["--threads", "0"], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            decode_ab.main(bad)
