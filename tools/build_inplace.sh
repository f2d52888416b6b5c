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
cp "$build_dir"/_cpu_kernels*.so approx_jax/
ls "$build_dir"/_cuda_kernels*.so >/dev/null 2>&1 && cp "$build_dir"/_cuda_kernels*.so approx_jax/ || true
echo "built into approx_jax/"
