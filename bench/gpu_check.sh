#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): install sparse_attn against the machine's own torch
# and Triton (no network there), run the tests and the bench suite, and leave everything under $OUT.
#   run(command="bash bench/gpu_check.sh")            # full sweep
#   run(command="bash bench/gpu_check.sh --quick")    # quick sweep
# Not yet run on a GPU (written 2026-11-23 in a task without one): check its output the first time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sparse_attn_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSE_ATTN_CACHE="$OUT/.build-cache"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
} | tee "$OUT/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 -m pytest tests -q -ra 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
python3 -m bench --out "$OUT/bench.json" "$@" 2>"$OUT/bench_progress.txt" | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
rm -rf "$OUT/.build-cache"
echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
