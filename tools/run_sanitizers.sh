#!/usr/bin/env bash
# Builds the CPU module with AddressSanitizer + UndefinedBehaviorSanitizer
# (cmake -DAPPROX_JAX_SANITIZE=ON) into a separate build directory and runs a
# focused test subset against it: the hypothesis property tests (ci profile),
# the validation tests and the determinism tests.
#
# The sanitized module is placed in a temporary copy of the package (never in
# approx_jax/ of the checkout, which other builds and test runs use). Python
# itself is not instrumented, so libasan is LD_PRELOADed and leak detection is
# off (the interpreter leaks by design).
#
# Usage: tools/run_sanitizers.sh [BUILD_DIR] [pytest args...]
#   BUILD_DIR   default _build_sanitize
#   pytest args default: tests/test_properties.py tests/test_validation.py
#               tests/test_determinism.py
# Environment: CXX (compiler, default g++), HYPOTHESIS_PROFILE (default ci),
#   KEEP_TMP=1 keeps the temporary package copy.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
build_dir=${1:-_build_sanitize}
shift || true
if [ "$#" -gt 0 ]; then
  tests=("$@")
else
  tests=(tests/test_properties.py tests/test_validation.py tests/test_determinism.py)
fi
cxx=${CXX:-g++}

echo "== building the sanitized CPU module in $build_dir"
cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DAPPROX_JAX_CUDA=OFF \
  -DAPPROX_JAX_SANITIZE=ON \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$build_dir"
so=$(ls "$build_dir"/_cpu_kernels*.so)
if ! nm -D "$so" | grep "__asan_\|__ubsan_" >/dev/null; then  # no -q: SIGPIPE + pipefail
  echo "error: $so is not instrumented (APPROX_JAX_SANITIZE had no effect)" >&2
  exit 2
fi

libasan=$("$cxx" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
  echo "error: libasan not found ($cxx -print-file-name=libasan.so -> $libasan)" >&2
  exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/approx_jax_sanitize.XXXXXX")
if [ "${KEEP_TMP:-0}" != 1 ]; then
  trap 'rm -rf "$tmp"' EXIT
fi
# Package copy (Python sources + the sanitized module) and the built-in C models
# (found next to the package, as in a source checkout).
mkdir -p "$tmp/approx_jax"
(cd approx_jax && tar --exclude='__pycache__' --exclude='*.so' -cf - .) | tar -xf - -C "$tmp/approx_jax"
cp "$so" "$tmp/approx_jax/"
cp -r multipliers "$tmp/multipliers"
echo "== package copy: $tmp (module: $(basename "$so"))"

# libstdc++ must be loaded when the ASan runtime initialises: python is a C
# program, and without it ASan's __cxa_throw interceptor has no real function to
# forward to ("CHECK failed: ... real___cxa_throw != 0") at jaxlib's first throw.
libstdcxx=$("$cxx" -print-file-name=libstdc++.so)
export LD_PRELOAD="$libasan:$libstdcxx${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$tmp"
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export JAX_PLATFORMS=cpu

# Run from the copy so that neither the checkout's approx_jax/ nor its .so is
# importable; check that the sanitized module is the one that loads.
cd "$tmp"
python3 - <<'EOF'
import approx_jax, approx_jax._cpu_kernels as k
from approx_jax._src import ffi
assert "cpu" in ffi.registered_platforms(), "kernels not registered"
print("== approx_jax from", approx_jax.__file__)
print("== kernels from", k.__file__)
EOF

echo "== pytest (${tests[*]}) with ASan+UBSan, HYPOTHESIS_PROFILE=$HYPOTHESIS_PROFILE"
args=()
for t in "${tests[@]}"; do
  case "$t" in
    -*) args+=("$t") ;;
    /*) args+=("$t") ;;
    *) args+=("$repo/$t") ;;
  esac
done
set +e
python3 -m pytest -p no:cacheprovider -q --rootdir "$repo" "${args[@]}" 2>&1 | tee "$tmp/pytest.log"
status=${PIPESTATUS[0]}
set -e
if grep -q "ERROR: AddressSanitizer\|runtime error:\|ERROR: LeakSanitizer" "$tmp/pytest.log"; then
  echo "== sanitizer reports found (see above)" >&2
  status=3
fi
echo "== exit status $status"
exit "$status"
