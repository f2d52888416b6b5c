#!/usr/bin/env bash
# One-shot check on a GPU machine (no network): build + install approx_jax with
# its CUDA module, check the CUDA targets register and run on the GPU, run the
# GPU tests, the core tests on CUDA, and the GPU benchmark. Every step is
# time-limited and capped by what is left of the budget; a failing step is
# recorded and the script goes on, except that nothing runs after a failed
# build or registration (it would only fail test by test). Results are
# written as they come, so a run cut short keeps what it measured. Exit
# status 1 when a step failed or timed out.
#
# Usage (from the repository root):
#   OUT=/some/dir [GPU_CHECK_BUDGET_S=420] bash benchmarks/gpu_check.sh
# GPU_CHECK_BUDGET_S: seconds for the whole run (default 420; the build and
# the first checks take 60-120 s of it). Results: $OUT/gpu_check.log
# (everything), $OUT/summary.txt (one line per step, then the figures),
# $OUT/bench_gpu.json, $OUT/bench_vmap.txt, $OUT/pytest_*.txt.
set -u

OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
: > "$SUMMARY"
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
T0=$(date +%s)
ABORT=""  # set when a later step cannot work (no CUDA module)

left() { echo $((BUDGET - ($(date +%s) - T0))); }

skip() {  # skip NAME REASON
  printf '%-28s %-12s\n' "$1" "SKIPPED($2)" | tee -a "$SUMMARY"
}

# step NAME LIMIT_S CMD...: runs CMD with min(LIMIT_S, what is left of the
# budget) as its timeout, logs its output, records its status. Returns CMD's
# status (0 for a skipped step).
step() {
  local name="$1" limit="$2"
  shift 2
  if [ -n "$ABORT" ]; then
    skip "$name" "$ABORT"
    return 0
  fi
  local remaining
  remaining=$(left)
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$limit" -lt 10 ]; then
    skip "$name" "no time"
    return 0
  fi
  local t0 rc t1
  t0=$(date +%s)
  echo "===== [$name] $(date -u +%H:%M:%S) (limit ${limit}s): $*" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  t1=$(date +%s)
  local status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAIL(rc=$rc)"; fi
  printf '%-28s %-12s %4ss\n' "$name" "$status" "$((t1 - t0))" | tee -a "$SUMMARY"
  echo "===== [$name] -> $status in $((t1 - t0))s" >> "$LOG"
  return "$rc"
}

step nvidia-smi 20 nvidia-smi
step versions 60 "$PY" -c "import sys, jax, jaxlib; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
step nvcc-version 10 nvcc --version

# Build + install (no build isolation: uses the installed jaxlib's FFI headers;
# no index on the GPU machine: --no-index fails fast instead of waiting on one).
export APPROX_JAX_CUDA=ON
# Only the lent chip's architecture: a quicker build (CI builds 80, 90 and PTX).
export CUDAARCHS="${CUDAARCHS:-90-real}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
step pip-install 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
  --disable-pip-version-check -v . || ABORT="no build"

# Import from outside the source tree so the installed package (with the
# compiled modules) is the one imported. The product must have run on the GPU.
step cuda-registered 90 bash -c "cd /tmp && '$PY' - <<'EOF'
import jax, approx_jax
from approx_jax._src import ffi
print('platforms:', ffi.registered_platforms(), 'devices:', jax.devices())
assert 'cuda' in ffi.registered_platforms(), 'CUDA module not registered'
assert jax.default_backend() == 'gpu', f'default backend is {jax.default_backend()}, not gpu'
import approx_jax._cuda_kernels as ck
print(sorted(ck.registrations()))
import numpy as np, jax.numpy as jnp
from approx_jax._src import multipliers as mb
x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48), np.float32))
w = jnp.asarray(np.random.default_rng(1).standard_normal((48, 80), np.float32))
y = approx_jax._src.ops.approx_dot(x, w, mb.mbm(7))
platforms = {d.platform for d in y.devices()}
assert platforms == {'gpu'}, f'approx_dot ran on {platforms}'
print('gpu approx_dot ok', y.shape, y.devices(), float(jnp.abs(y - x @ w).max()))
EOF" || ABORT="no CUDA module"

# Run the tests against the installed package, not the source tree (which
# has no compiled modules): copy the tests (and the examples one of them
# runs) to a scratch directory. --maxfail rather than -x: one failure should
# not hide whether the rest work; faulthandler names a hanging test.
TESTDIR="$(mktemp -d)"
cp -r tests examples "$TESTDIR/"
[ -f pyproject.toml ] && cp pyproject.toml "$TESTDIR/"
PYTEST_FLAGS="-q -p no:cacheprovider -rs --maxfail=10 -o faulthandler_timeout=60"
# (JAX_PLATFORMS: a CUDA plugin that failed to start is an error, not a
# silent CPU run whose GPU tests all skip.)
step pytest-gpu 200 bash -c "cd '$TESTDIR' && JAX_PLATFORMS=cuda,cpu '$PY' -m pytest $PYTEST_FLAGS tests/test_gpu.py > '$OUT/pytest_gpu.txt' 2>&1; rc=\$?; tail -30 '$OUT/pytest_gpu.txt'; grep -qE '[1-9][0-9]* passed' '$OUT/pytest_gpu.txt' || { echo 'no test passed'; rc=1; }; exit \$rc"

# Core tests with CUDA as the default backend, in the time left (keep 150 s
# for the benchmark).
CORE_LIMIT=$(( $(left) - 150 ))
if [ "$CORE_LIMIT" -gt 30 ]; then
  step pytest-core-cuda "$CORE_LIMIT" bash -c "cd '$TESTDIR' && JAX_PLATFORMS=cuda,cpu '$PY' -m pytest $PYTEST_FLAGS tests/test_ops.py tests/test_vmap.py tests/test_conv.py tests/test_transform.py > '$OUT/pytest_core_cuda.txt' 2>&1; rc=\$?; tail -30 '$OUT/pytest_core_cuda.txt'; exit \$rc"
else
  skip pytest-core-cuda "no time"
fi

# The benchmark writes bench_gpu.json after every row.
step bench-gpu 230 bash -c "cd /tmp && OUT='$OUT' '$PY' '$REPO/benchmarks/bench_gpu.py' ${BENCH_GPU_ARGS:-}"
# vmap over 8 designs vs 8 single calls on the GPU (issue 4), if time is left.
step bench-vmap 90 bash -c "cd /tmp && '$PY' '$REPO/benchmarks/bench_vmap.py' --reps 3 > '$OUT/bench_vmap.txt' 2>&1; rc=\$?; tail -20 '$OUT/bench_vmap.txt'; exit \$rc"
# The CUDA launchers natively against the reference, every knob, then under
# compute-sanitizer's racecheck and memcheck (what the CPU emulation cannot
# see), if time is left.
step native-check 150 bash -c "nvcc -std=c++17 -O2 --fmad=false -ftz=false -arch=sm_90 -Ixla_kernels -Itools tools/gpu_native_check.cu xla_kernels/cuda_kernels.cu xla_kernels/cuda_gemm_expanded.cu -o '$OUT/gnc' && '$OUT/gnc' > '$OUT/native_check.txt' 2>&1; rc=\$?; tail -5 '$OUT/native_check.txt'; [ \$rc -eq 0 ] || exit \$rc; command -v compute-sanitizer > /dev/null || { echo 'no compute-sanitizer'; exit 0; }; for tool in racecheck memcheck; do compute-sanitizer --tool \$tool --error-exitcode 3 '$OUT/gnc' small > '$OUT/native_check_\$tool.txt' 2>&1 || { tail -20 '$OUT/native_check_\$tool.txt'; exit 3; }; tail -2 '$OUT/native_check_\$tool.txt'; done; rm -f '$OUT/gnc'"
rm -rf "$TESTDIR"

{
  echo "---- total $(( $(date +%s) - T0 ))s (budget ${BUDGET}s)"
  echo "---- pytest-gpu tail:"; tail -5 "$OUT/pytest_gpu.txt" 2>/dev/null
  echo "---- pytest-core-cuda tail:"; tail -5 "$OUT/pytest_core_cuda.txt" 2>/dev/null
  echo "---- native-check tail:"; tail -3 "$OUT/native_check.txt" 2>/dev/null
  echo "---- bench_vmap (8 designs in one call vs 8 calls):"; tail -12 "$OUT/bench_vmap.txt" 2>/dev/null
  echo "---- benchmark (ratios approx/native):"
  grep -E "^(GEMM|R18|conv|LeNet|ResNet|target)|^opt-in variants|^  (GEMM|R18) " "$LOG" | tail -100
} >> "$SUMMARY"
cat "$SUMMARY"
# Non-zero when a step failed or timed out (everything is written first).
if grep -qE "^[a-z0-9-]+ +(FAIL|TIMEOUT)" "$SUMMARY"; then exit 1; fi
exit 0
