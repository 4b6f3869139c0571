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
# earlier stages' results; the whole check keeps to 9 minutes (GPU_CHECK_TOTAL_S, 540: the build
# 150 s at most, the tests GPU_CHECK_TESTS_S = 220, the headline what is left, GPU_CHECK_HEADLINE_S). Without a GPU (CI, a laptop) the same script runs the CPU
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
  # the device tool copies the working tree but its git metadata lagged the tree on both 2026-12-04
  # runs: this fingerprint of the sources is what identifies the code (run the same line locally)
  echo "sources $(find sparse_attn csrc bench tests -type f \( -name '*.py' -o -name '*.h' -o -name '*.cpp' \
    -o -name '*.cu' -o -name '*.cuh' -o -name '*.sh' \) | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12)"
} 2>&1 | tee "$OUT/env.txt"
# no network on the GPU machine: no dependencies, no build isolation (its torch / Triton stay), and
# PEP 517 (without it pip ran the legacy `setup.py develop`, which newer setuptools turns into a
# pip call of its own with build isolation: offline, that failed on 2026-12-04). Its output is kept
# (install.txt) and everything below runs from the source tree whatever it did.
timeout 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index --use-pep517 -e . > "$OUT/install.txt" 2>&1 \
  && echo "pip install -e .: ok" || { echo "pip install -e .: failed (install.txt); running from the source tree"; tail -5 "$OUT/install.txt"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# the files that hold tests marked gpu (`grep -l "mark.gpu" tests/*.py`; a test checks the list)
GPU_TESTS=(tests/test_cuda_build.py tests/test_cuda_decode.py tests/test_triton_decode.py
           tests/test_triton_attention.py tests/test_linear_triton.py tests/test_window_linear_triton.py
           tests/test_delta_triton.py tests/test_infllmv2_triton.py tests/test_quant_triton_decode.py
           tests/test_linear_step.py tests/test_window_linear_step.py tests/test_sinks_softcap.py
           tests/test_head_dims_triton.py tests/test_varlen_triton.py tests/test_edges.py tests/test_window_linear.py)
rc=0
case "$what" in
  --smoke|smoke)
    stage "smoke: compiled Triton attention and decode against SDPA, the CUDA extension"
    timeout 150 "$PY" -m bench.gpu_smoke 2>&1 | tee "$OUT/smoke.txt"
    rc=${PIPESTATUS[0]}
    ;;
  all)
    # the extensions this machine runs, built once in a stage of their own (a GPU machine: the CUDA
    # one only; the first run's tests and headline each lost their budget to builds)
    stage "build the extensions (budget 150 s)"
    MAX_JOBS="$(nproc)" timeout 150 "$PY" -c "import torch; from bench.extensions import prepare; \
prepare(torch.device('cuda' if torch.cuda.is_available() else 'cpu'), print)" 2>&1 | tee "$OUT/build.txt"
    # the tests marked gpu (the GPU files' CPU-only argument checks run in CI), spread over the
    # machine's cores where pytest-xdist is installed: Triton's first compiles are CPU work
    workers=""
    "$PY" -c "import xdist" 2>/dev/null && workers="-n ${GPU_CHECK_WORKERS:-16}"
    tbudget="${GPU_CHECK_TESTS_S:-220}"
    echo "python -m pytest -q -ra -m gpu $workers ${GPU_TESTS[*]}" > "$OUT/tests_cmd.txt"
    stage "GPU tests: $(cat "$OUT/tests_cmd.txt") (budget $tbudget s)"
    timeout "$tbudget" "$PY" -m pytest -q -ra --durations=15 -p no:cacheprovider -m gpu $workers "${GPU_TESTS[@]}" \
      > "$OUT/tests_gpu.txt" 2>&1
    trc=$?
    tail -15 "$OUT/tests_gpu.txt"
    [ "$trc" -eq 124 ] && echo "GPU tests: stopped at the $tbudget s budget"
    # the headline gets what is left of the whole check's budget (page and slack: 20 s)
    hbudget="${GPU_CHECK_HEADLINE_S:-$(( ${GPU_CHECK_TOTAL_S:-540} - (SECONDS - T0) - 20 ))}"
    [ "$hbudget" -lt 60 ] && hbudget=60
    stage "headline targets: python -m bench --headline (budget $hbudget s)"
    timeout "$hbudget" "$PY" -m bench --headline --no-plots --budget 40 \
      --out "$OUT/headline.json" > "$OUT/headline.txt" 2> "$OUT/headline_progress.txt"
    hrc=$?
    tail -30 "$OUT/headline.txt"
    [ "$hrc" -eq 124 ] && echo "headline: stopped at the $hbudget s budget (see headline_progress.txt)"
    stage "page"
    "$PY" -m bench.gpu_page "$OUT" --tests-rc "$trc" --headline-rc "$hrc" > "$OUT/gpu-check.md"
    echo "wrote $OUT/gpu-check.md"
    rc=$(( trc != 0 || hrc != 0 ))
    ;;
  tests)
    timeout "${GPU_CHECK_TESTS_S:-540}" "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu "${GPU_TESTS[@]}" "$@" 2>&1 \
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
