"""bench/gpu_check.sh's pieces that run anywhere: the headline cases (`python -m bench --headline`)
and the page it writes (`bench.gpu_page`), from a headline run's own JSON. The GPU parts run on a
lent GPU machine only (nothing GPU is timed or asserted here)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from bench import gpu_page, suite

ROOT = Path(__file__).resolve().parent.parent


def test_headline_cases_are_the_issue_targets():
    for dev, long in ((torch.device("cuda"), 128 * 1024), (torch.device("cpu"), 32 * 1024)):
        cases = suite.headline_cases(dev, torch.bfloat16)
        names = [c.name for c in cases]
        assert len(set(names)) == len(names), names
        kinds = {(c.kind, c.label) for c in cases}
        assert {("prefill", "dense"), ("prefill", "topk16"), ("train", "topk16"), ("prefill", "window4096"),
                ("decode", "dense"), ("decode", "topk16"), ("linear-prefill", "linear")} == kinds
        assert all(c.B == 8 for c in cases if c.kind == "decode")
        assert max(c.Sk for c in cases) >= long
    gpu = suite.headline_impls(torch.device("cuda"))
    assert {"flex", "sdpa.flash", "sparse_attn", "sparse_attn[cuda]", "sparse_attn[triton]"} <= set(gpu)


def test_gpu_check_script_parses_and_names_its_modes():
    res = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    for mode in ("--smoke", "bench.gpu_smoke", "bench --headline", "bench.gpu_page"):
        assert mode in text, mode


def test_page_from_a_headline_run(tmp_path):
    (tmp_path / "env.txt").write_text("Wed Dec  2 UTC 2026\nname, memory.total\nNVIDIA H200, 143771 MiB\n")
    (tmp_path / "tests_gpu.txt").write_text("....F.\nFAILED tests/test_triton_decode.py::test_x - boom\n"
                                            "1 failed, 5 passed in 12.0s\n")
    row = dict(case="prefill/dense/bf16/S16384", kind="prefill", impl="sparse_attn", kernel="triton.block_sparse",
               status="ok", ms=1.5, roofline_fraction=0.5, speedup_vs_sdpa=1.2, rel_error=1e-3, error_ok=True)
    (tmp_path / "headline.json").write_text(json.dumps({"roofline": {"copy_gbps": 4000.0}, "elapsed_s": 100,
                                                        "rows": [row]}))
    text = gpu_page.page(str(tmp_path), 1, 0)
    assert "NVIDIA H200" in text and "1 failed, 5 passed" in text and "FAILED tests/test_triton_decode.py" in text
    assert "GPU tests: failed (exit 1)" in text and "Headline targets: passed" in text
    assert "`prefill/dense/bf16/S16384`" in text and "1.20x" in text
    (tmp_path / "headline.json").write_text(json.dumps({"roofline": {"copy_gbps": 4000.0}, "elapsed_s": 50,
                                                        "rows": [row], "partial": "3 of 7 cases"}))
    (tmp_path / "install.txt").write_text("ERROR: something pip said\n")
    (tmp_path / "tests_cmd.txt").write_text("python -m pytest -q -ra -m gpu -n 8 tests/test_cuda_decode.py\n")
    text = gpu_page.page(str(tmp_path), 0, 124)
    assert "**Partial**: the run stopped after 3 of 7 cases" in text and "`prefill/dense/bf16/S16384`" in text
    assert "ERROR: something pip said" in text and "-m gpu -n 8 tests/test_cuda_decode.py" in text
    (tmp_path / "headline.json").unlink()
    (tmp_path / "headline_progress.txt").write_text("[1/7] prefill/dense ...\n")
    text = gpu_page.page(str(tmp_path), 0, 124)
    assert "stopped at its time budget" in text and "[1/7] prefill/dense" in text


def test_gpu_check_runs_every_file_with_gpu_tests():
    """bench/gpu_check.sh names the test files it runs with `-m gpu`: every file holding a test
    marked gpu must be among them (a new Triton test file would otherwise never run compiled)."""
    import re

    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    listed = set(re.findall(r"tests/test_\w+\.py", text.split("GPU_TESTS=(", 1)[1].split(")", 1)[0]))
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b|^def gpu\(", p.read_text(), re.M)}
    assert marked and marked <= listed, sorted(marked - listed)
