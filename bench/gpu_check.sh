#!/usr/bin/env bash
# The whole GPU check in ONE call on a lent GPU machine (device tool; no network there): install
# sparse_attn against the machine's own torch and Triton, run the GPU tests, then the headline
# targets (python -m bench --headline), and write one page, $OUT/gpu-check.md, to commit to docs/perf/.
#   run(command="bash bench/gpu_check.sh", timeout_s=560)   # everything, <= 9 minutes on an H100/H200
#   run(command="bash bench/gpu_check.sh --smoke")          # a first check of about a minute: install,
#                                                           # one compiled Triton attention and decode
#                                                           # against SDPA, the CUDA extension's build
#   run(command="bash bench/gpu_check.sh static")           # bench/gpu_static.py with the machine's Triton
#   run(command="bash bench/gpu_check.sh bench --quick")    # the bench sweep (another call)
# Every stage runs under its own `timeout`, so a hang or a slow stage still leaves the page and the
# earlier stages' results; the stage budgets add up to 8.5 minutes (GPU_CHECK_TESTS_S,
# GPU_CHECK_HEADLINE_S override them). Without a GPU (CI, a laptop) the same script runs the CPU
# parts, which is how their time is known: `bash bench/gpu_check.sh` here runs the tests that need
# no GPU of the GPU list and the CPU headline sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
[ $# -gt 0 ] && shift
OUT="${OUT:-/tmp/sparse_attn_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPARSE_ATTN_CACHE="${SPARSE_ATTN_CACHE:-$HOME/.cache/sparse_attn}"
PY="${PYTHON:-python3}"
T0=$SECONDS
stage() { echo "== [$((SECONDS - T0)) s] $*"; }

stage "environment"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} 2>&1 | tee "$OUT/env.txt"
# no network on the GPU machine: no dependencies, no build isolation (its torch / Triton stay)
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3

GPU_TESTS=(tests/test_cuda_build.py tests/test_cuda_decode.py tests/test_triton_decode.py
           tests/test_triton_attention.py tests/test_linear_triton.py tests/test_window_linear_triton.py)
rc=0
case "$what" in
  --smoke|smoke)
    stage "smoke: compiled Triton attention and decode against SDPA, the CUDA extension"
    timeout 150 "$PY" -m bench.gpu_smoke 2>&1 | tee "$OUT/smoke.txt"
    rc=${PIPESTATUS[0]}
    ;;
  all)
    stage "GPU tests (budget ${GPU_CHECK_TESTS_S:-240} s)"
    timeout "${GPU_CHECK_TESTS_S:-240}" "$PY" -m pytest -q -ra -p no:cacheprovider "${GPU_TESTS[@]}" \
      > "$OUT/tests_gpu.txt" 2>&1
    trc=$?
    tail -15 "$OUT/tests_gpu.txt"
    [ "$trc" -eq 124 ] && echo "GPU tests: stopped at the ${GPU_CHECK_TESTS_S:-240} s budget"
    stage "headline targets: python -m bench --headline (budget ${GPU_CHECK_HEADLINE_S:-270} s)"
    timeout "${GPU_CHECK_HEADLINE_S:-270}" "$PY" -m bench --headline --no-plots --budget 40 \
      --out "$OUT/headline.json" > "$OUT/headline.txt" 2> "$OUT/headline_progress.txt"
    hrc=$?
    tail -30 "$OUT/headline.txt"
    [ "$hrc" -eq 124 ] && echo "headline: stopped at the ${GPU_CHECK_HEADLINE_S:-270} s budget (see headline_progress.txt)"
    stage "page"
    "$PY" -m bench.gpu_page "$OUT" --tests-rc "$trc" --headline-rc "$hrc" > "$OUT/gpu-check.md"
    echo "wrote $OUT/gpu-check.md"
    rc=$(( trc != 0 || hrc != 0 ))
    ;;
  tests)
    timeout "${GPU_CHECK_TESTS_S:-540}" "$PY" -m pytest -q -ra -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 \
      | tee "$OUT/tests_gpu.txt"
    rc=${PIPESTATUS[0]}
    ;;
  static)
    "$PY" -m bench.gpu_static --jobs "$(nproc)" --json "$OUT/gpu_static.json" --markdown "$OUT/gpu_static.md" \
      2>&1 | tail -40 | tee "$OUT/gpu_static.txt"
    rc=${PIPESTATUS[0]}
    ;;
  bench)
    "$PY" -m bench --out "$OUT/bench.json" "$@" 2>"$OUT/bench_progress.txt" | tee "$OUT/bench.txt"
    rc=${PIPESTATUS[0]}
    "$PY" -m bench.report "$OUT/bench.json" --out "$OUT/perf.md" 2>&1 | tail -3
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh [all|--smoke|tests|static|bench [bench args]]" >&2
    exit 2
    ;;
esac
stage "done: rc=$rc"
exit "$rc"
