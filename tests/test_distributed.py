"""Context parallelism (sparse_attn.distributed) against the float64 oracle on the full sequence:
gloo process groups of 2, 3 and 4 ranks on CPU (torch.multiprocessing), every softmax pattern,
both layouts, forward and gradients, lengths that do not divide by the world size; linear
attention's and the delta rule's state scans; the sharded decode cache; and the bytes each pattern sends.

One spawn of 4 processes serves every world size (a subgroup per size runs every case:
tests/distributed_cases.py); the tests below
read its per-rank results. Errors are the contract's float32 bound on CPU (1e-5).
"""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_cases as cases
from delta_oracle import delta_bound

BOUND = 1e-5
WORLDS = (2, 3, 4)
_RESULTS: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, tmp_path_factory) -> list:
    """Per-rank results of `world`; the first call runs every world size in one spawn."""
    if not _RESULTS:
        out = tmp_path_factory.mktemp("cp")
        n = max(WORLDS)
        ctx = mp.start_processes(cases.run_rank, args=(n, f"tcp://127.0.0.1:{_free_port()}", str(out), WORLDS[::-1]),
                                 nprocs=n, join=False, start_method="spawn")
        deadline = time.monotonic() + 400
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.terminate()
                pytest.fail("ranks did not finish in 400 s")
        for w in WORLDS:
            _RESULTS[w] = [json.loads((out / f"w{w}-rank{r}.json").read_text()) for r in range(w)]
    return _RESULTS[world]


def _case(world, name, tmp_path_factory):
    per_rank = _run(world, tmp_path_factory)
    crashes = {k: v for r in per_rank for k, v in r.items() if k.startswith("crash")}
    assert not crashes, crashes
    return [r[name] for r in per_rank]


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in this torch")

ATTN = [f"attn-{p}-{lay}" for p in ("dense", "window", "window_sinks", "block_sparse", "topk", "dense_noncausal",
                                    "infllmv2", "infllmv2_exact", "infllmv2_dense")
        for lay in ("zigzag", "contiguous")]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ATTN)
def test_cp_attention_matches_oracle(world, name, tmp_path_factory):
    for rank, errs in enumerate(_case(world, name, tmp_path_factory)):
        assert errs != ["non-finite"], f"rank {rank}: NaN/inf in output or gradients"
        assert max(errs) <= BOUND, f"rank {rank} (out, dq, dk, dv) errors {errs}"


@pytest.mark.parametrize("name", [f"transport-{t}-{p}" for t in ("ring", "allgather")
                                  for p in ("dense", "topk", "window_sinks")])
def test_cp_attention_both_transports_mqa(name, tmp_path_factory):
    for rank, errs in enumerate(_case(2, name, tmp_path_factory)):
        assert max(errs) <= BOUND, f"rank {rank}: {errs}"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_cp_attention_ranks_without_tokens(layout, tmp_path_factory):
    for rank, errs in enumerate(_case(4, f"tiny-dense-{layout}", tmp_path_factory)):
        assert max(errs) <= BOUND, f"rank {rank}: {errs}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["none", "per-head", "per-token"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_cp_linear_attention_matches_oracle(world, kind, layout, tmp_path_factory):
    for rank, errs in enumerate(_case(world, f"linear-{kind}-{layout}", tmp_path_factory)):
        assert max(errs) <= BOUND, f"rank {rank} (out, state, dq, dk, dv[, ddecay, ds0]) errors {errs}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["none", "per-token", "per-channel"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_cp_delta_rule_matches_oracle(world, kind, layout, tmp_path_factory):
    bound = delta_bound(torch.float32)  # the contract's delta-rule float32 bound (1e-4: triangular solves)
    for rank, errs in enumerate(_case(world, f"delta-{kind}-{layout}", tmp_path_factory)):
        assert max(errs) <= bound, f"rank {rank} (out, state, dq, dk, dv, dbeta[, ddecay][, ds0]) errors {errs}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("pattern", ["dense", "window_sinks", "topk", "block_sparse", "int8_dense", "infllmv2",
                                     "infllmv2_exact", "infllmv2_dense", "infllmv2_c3"])
def test_sharded_cache_decode(world, pattern, tmp_path_factory):
    for rank, errs in enumerate(_case(world, f"cache-{pattern}", tmp_path_factory)):
        assert max(errs) <= BOUND, f"rank {rank}: {errs}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_sparse_patterns_send_far_less(world, layout, tmp_path_factory):
    got = {p: _case(world, f"traffic-{p}-{layout}", tmp_path_factory) for p in ("dense", "window", "topk", "infllmv2")}
    for p, ranks in got.items():
        for rank, r in enumerate(ranks):
            assert r["err"] <= BOUND, f"{p} rank {rank}: error {r['err']}"
    total = {p: sum(r["kv"] + r["stats"] for r in ranks) for p, ranks in got.items()}
    assert total["dense"] > 0
    assert total["window"] <= 0.25 * total["dense"], total
    assert total["topk"] <= 0.5 * total["dense"], total
    assert total["infllmv2"] <= 0.5 * total["dense"], total  # chunk sums + the picked blocks, never all of K
    # a window only talks to its neighbours: contiguous rank r to r + 1 (round 1); zigzag also round -1
    rounds = got["window"][0]["rounds"]
    assert rounds == ([1] if layout == "contiguous" else sorted({1, world - 1})), rounds


def test_importing_sparse_attn_leaves_distributed_unloaded():
    import subprocess
    import sys

    code = ("import sys, sparse_attn; assert 'sparse_attn.distributed' not in sys.modules; "
            "import sparse_attn as sa; sa.distributed.shard; assert 'sparse_attn.distributed' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors_without_process_group():
    import sparse_attn as sa
    from sparse_attn import distributed as cp

    x = torch.randn(1, 2, 8, 4)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="process group"):
            cp.cp_attention(x, x, x, sa.Dense())
    with pytest.raises(ValueError, match="layout"):
        cp.cp_attention(x, x, x, sa.Dense(), layout="striped")
    with pytest.raises(ValueError, match="WindowLinear"):
        cp.cp_attention(x, x, x, sa.WindowLinear(4), gate=torch.zeros(2))
    with pytest.raises(ValueError, match="transport"):
        cp.cp_attention(x, x, x, sa.Dense(), transport="carrier-pigeon")
