#!/usr/bin/env bash
# Developer build: compiles the native modules with CMake into BUILD_DIR and
# copies them next to the Python sources, so `PYTHONPATH=. pytest` works
# without reinstalling. Usage: tools/build_inplace.sh [BUILD_DIR] [CUDA=ON|OFF]
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-_build_dev}
cuda=${2:-OFF}
cmake -S . -B "$build_dir" -G Ninja -DAPPROX_JAX_CUDA="$cuda" \
  -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$build_dir"
# Copy then rename: a running Python that has the old module mapped keeps its
# inode instead of crashing on a file rewritten in place.
for so in "$build_dir"/_cpu_kernels*.so "$build_dir"/_cuda_kernels*.so; do
  [ -f "$so" ] || continue
  cp "$so" "approx_jax/.$(basename "$so").tmp" && mv -f "approx_jax/.$(basename "$so").tmp" "approx_jax/$(basename "$so")"
done
echo "built into approx_jax/"
