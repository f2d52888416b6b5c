#!/usr/bin/env bash
# Builds the CUDA kernels of xla_kernels/ for CPU emulation and runs the
# emulation harness (see emulation_harness.cc): bit-for-bit comparison of the
# CUDA launchers with the reference every CPU kernel is held to.
#
#   tools/cuda_emulation/run.sh [quick|full|smoke|grid-limits]
#   (runs take about 25 s / 3 min / 7 s / 6 min on one Zen 3 core)
#   CUDA_EMULATION_CXXFLAGS="-O1 -g -fsanitize=address,undefined" tools/cuda_emulation/run.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${CUDA_EMULATION_BUILD:-$(mktemp -d)}
mkdir -p "$out"
"${PYTHON:-python3}" "$here/rewrite_cu.py" "$root/xla_kernels/cuda_kernels.cu" "$out/cuda_kernels.cc"
"${PYTHON:-python3}" "$here/rewrite_cu.py" "$root/xla_kernels/cuda_gemm_expanded.cu" "$out/cuda_gemm_expanded.cc"
# The kernels pun through reinterpret_cast like all CUDA code: no strict
# aliasing. No FMA contraction: the kernels' own __fmaf_rn are the only fmas.
${CXX:-g++} -std=c++17 ${CUDA_EMULATION_CXXFLAGS:--O2} -fno-strict-aliasing -ffp-contract=off \
  -I"$here" -I"$root/xla_kernels" "$out/cuda_kernels.cc" "$out/cuda_gemm_expanded.cc" \
  "$here/emulation_harness.cc" -o "$out/emulation_harness"
"$out/emulation_harness" "${1:-quick}"
