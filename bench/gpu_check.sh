#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): install sparse_attn against the machine's own torch
# and Triton (no network there), run the GPU tests and/or the bench suite, leave everything under $OUT.
#   run(command="bash bench/gpu_check.sh tests")           # GPU tests (triton, cuda), then the rest
#   run(command="bash bench/gpu_check.sh bench --quick")   # quick bench sweep + markdown report
#   run(command="bash bench/gpu_check.sh all --quick")     # both (may not fit one 10-minute call)
#   run(command="bash bench/gpu_check.sh static")          # bench/gpu_static.py with the machine's Triton
#                                                          # (~1 min on 16 cores; CI runs it without a GPU)
# Each device call is limited to 10 minutes: run `tests` and `bench` as separate calls.
# Not yet run on a GPU (written 2026-11-23 in tasks without one): check its output the first time.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
[ $# -gt 0 ] && shift
OUT="${OUT:-/tmp/sparse_attn_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSE_ATTN_CACHE="${SPARSE_ATTN_CACHE:-$HOME/.cache/sparse_attn}"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} | tee "$OUT/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
tests_rc=0
bench_rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # the GPU kernels first (compiled Triton, the CUDA extension), so a timeout still leaves their results
  python3 -m pytest -q -ra tests/test_cuda_build.py tests/test_cuda_decode.py tests/test_triton_decode.py \
    tests/test_triton_attention.py tests/test_linear_triton.py 2>&1 | tee "$OUT/tests_gpu.txt"
  tests_rc=${PIPESTATUS[0]}
  python3 -m pytest -q -ra -x tests --deselect tests/test_bench_smoke.py 2>&1 | tail -40 > "$OUT/tests_all.txt"
  [ "${PIPESTATUS[0]}" -ne 0 ] && tests_rc=1
fi
static_rc=0
if [ "$what" = static ]; then
  python3 -m bench.gpu_static --jobs "$(nproc)" --json "$OUT/gpu_static.json" --markdown "$OUT/gpu_static.md" \
    2>&1 | tail -40 | tee "$OUT/gpu_static.txt"
  static_rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m bench --out "$OUT/bench.json" "$@" 2>"$OUT/bench_progress.txt" | tee "$OUT/bench.txt"
  bench_rc=${PIPESTATUS[0]}
  python3 -m bench.report "$OUT/bench.json" --out "$OUT/perf.md" 2>&1 | tail -3
fi
echo "tests rc=$tests_rc bench rc=$bench_rc static rc=$static_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$static_rc" -eq 0 ]
