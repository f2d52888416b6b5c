#!/usr/bin/env bash
# One-shot check on a GPU machine (no network): build + install approx_jax with
# its CUDA module, check the CUDA targets register, run the GPU tests, the core
# tests on CUDA, and the GPU benchmark. Every step is time-limited; a failing
# step is recorded and the script goes on. Whole run: < 8 minutes.
#
# Usage (from the repository root):  OUT=/some/dir bash benchmarks/gpu_check.sh
# Results: $OUT/gpu_check.log (everything), $OUT/summary.txt (one line per
# step), $OUT/bench_gpu.json, $OUT/pytest_*.txt.
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
T0=$(date +%s)

# step NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs output, records status.
step() {
  local name="$1" limit="$2"
  shift 2
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
  return 0
}

step nvidia-smi 20 nvidia-smi
step versions 60 "$PY" -c "import sys, jax, jaxlib; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
step nvcc-version 10 nvcc --version

# Build + install (no build isolation: uses the installed jaxlib's FFI headers).
export APPROX_JAX_CUDA=ON
# Only the lent chip's architecture: a quicker build (CI builds 80, 90 and PTX).
export CUDAARCHS="${CUDAARCHS:-90-real}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
step pip-install 300 "$PY" -m pip install --no-build-isolation --no-deps -v .

# Import from outside the source tree so the installed package (with the
# compiled modules) is the one imported.
step cuda-registered 90 bash -c "cd /tmp && '$PY' - <<'EOF'
import jax, approx_jax
from approx_jax._src import ffi
print('platforms:', ffi.registered_platforms(), 'devices:', jax.devices())
assert 'cuda' in ffi.registered_platforms(), 'CUDA module not registered'
import approx_jax._cuda_kernels as ck
print(sorted(ck.registrations()))
import numpy as np, jax.numpy as jnp
from approx_jax._src import multipliers as mb
x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48), np.float32))
w = jnp.asarray(np.random.default_rng(1).standard_normal((48, 80), np.float32))
y = approx_jax._src.ops.approx_dot(x, w, mb.mbm(7))
print('gpu approx_dot ok', y.shape, y.devices(), float(jnp.abs(y - x @ w).max()))
EOF"

# Run the tests against the installed package, not the source tree (which
# has no compiled modules): copy the tests to a scratch directory.
TESTDIR="$(mktemp -d)"
cp -r tests "$TESTDIR/"
[ -f pyproject.toml ] && cp pyproject.toml "$TESTDIR/"
step pytest-gpu 200 bash -c "cd '$TESTDIR' && '$PY' -m pytest -x -q tests/test_gpu.py -p no:cacheprovider -rs > '$OUT/pytest_gpu.txt' 2>&1; rc=\$?; tail -30 '$OUT/pytest_gpu.txt'; exit \$rc"

ELAPSED=$(( $(date +%s) - T0 ))
# Core tests with CUDA as the default backend, in the time left (keep ~100 s
# for the benchmark).
LEFT=$(( ${GPU_CHECK_BUDGET_S:-420} - ELAPSED - 130 ))
if [ "$LEFT" -gt 30 ]; then
  step pytest-core-cuda "$LEFT" bash -c "cd '$TESTDIR' && JAX_PLATFORMS=cuda,cpu '$PY' -m pytest -q tests/test_ops.py tests/test_vmap.py tests/test_conv.py tests/test_transform.py -p no:cacheprovider > '$OUT/pytest_core_cuda.txt' 2>&1; rc=\$?; tail -30 '$OUT/pytest_core_cuda.txt'; exit \$rc"
else
  printf '%-28s %-12s\n' pytest-core-cuda "SKIPPED(no time)" | tee -a "$SUMMARY"
fi

ELAPSED=$(( $(date +%s) - T0 ))
BENCH_LIMIT=$(( ${GPU_CHECK_BUDGET_S:-420} - ELAPSED ))
[ "$BENCH_LIMIT" -gt 230 ] && BENCH_LIMIT=230
if [ "$BENCH_LIMIT" -gt 30 ]; then
  step bench-gpu "$BENCH_LIMIT" bash -c "cd /tmp && OUT='$OUT' '$PY' '$REPO/benchmarks/bench_gpu.py' ${BENCH_GPU_ARGS:-}"
else
  printf '%-28s %-12s\n' bench-gpu "SKIPPED(no time)" | tee -a "$SUMMARY"
fi
# vmap over 8 designs vs 8 single calls on the GPU (issue 4), if time is left.
ELAPSED=$(( $(date +%s) - T0 ))
if [ "$ELAPSED" -lt "${GPU_CHECK_BUDGET_S:-420}" ]; then
  step bench-vmap 90 bash -c "cd /tmp && '$PY' '$REPO/benchmarks/bench_vmap.py' --reps 3 > '$OUT/bench_vmap.txt' 2>&1; rc=\$?; tail -20 '$OUT/bench_vmap.txt'; exit \$rc"
else
  printf '%-28s %-12s\n' bench-vmap "SKIPPED(no time)" | tee -a "$SUMMARY"
fi
rm -rf "$TESTDIR"

{
  echo "---- total $(( $(date +%s) - T0 ))s"
  echo "---- pytest-gpu tail:"; tail -5 "$OUT/pytest_gpu.txt" 2>/dev/null
  echo "---- pytest-core-cuda tail:"; tail -5 "$OUT/pytest_core_cuda.txt" 2>/dev/null
  echo "---- bench_vmap (8 designs in one call vs 8 calls):"; tail -12 "$OUT/bench_vmap.txt" 2>/dev/null
  echo "---- benchmark (ratios approx/native):"
  grep -E "^(GEMM|R18|conv|LeNet|ResNet|target)|^opt-in variants|^  (GEMM|R18) " "$LOG" | tail -100
} >> "$SUMMARY"
cat "$SUMMARY"
exit 0
