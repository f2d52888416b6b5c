// CUDA implementation of the `approx_jax_gemm` and `approx_jax_multiply` FFI
// targets (launchers callable from plain C++; the XLA FFI glue lives in
// cuda_module.cc). Contract: docs/DESIGN.md, numerics: SPEC section 2 through
// approx_math.h's ApproxMulBits, bit for bit.
#ifndef APPROX_JAX_XLA_KERNELS_CUDA_KERNELS_H_
#define APPROX_JAX_XLA_KERNELS_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace approx_jax {

// out[d, b, i, j] = sum_k P(a[d, b, i, k], w[d, b, k, j]; lut[d]).
// All pointers are device pointers. Strides in elements; a zero stride
// broadcasts an operand over that axis. Rows are contiguous (a: [M, K]
// row-major, b: [K, N] row-major, out: [D, B, M, N] dense).
struct CudaGemmProblem {
  const float* a = nullptr;
  const float* b = nullptr;
  const uint32_t* lut = nullptr;  // kernel format (approx_math.h)
  float* out = nullptr;
  int64_t designs = 1, batch = 1, m = 0, k = 0, n = 0;
  int64_t a_design_stride = 0, a_batch_stride = 0;
  int64_t b_design_stride = 0, b_batch_stride = 0;
  int64_t lut_design_stride = 0;
  int mbits = 7;
};

// Enqueues the GEMM on `stream`. k summed in ascending order starting from
// +0.0f (the same order as the reference loop), so results are deterministic.
// Returns an empty string on success, else an error message.
std::string LaunchApproxGemm(const CudaGemmProblem& p, cudaStream_t stream);

// out[d, i] = P(a[d * a_design_stride + i], b[d * b_design_stride + i];
//               lut + d * lut_design_stride), i < n.
struct CudaMultiplyProblem {
  const float* a = nullptr;
  const float* b = nullptr;
  const uint32_t* lut = nullptr;
  float* out = nullptr;
  int64_t designs = 1, n = 0;
  int64_t a_design_stride = 0, b_design_stride = 0, lut_design_stride = 0;
  int mbits = 7;
};

std::string LaunchApproxMultiply(const CudaMultiplyProblem& p, cudaStream_t stream);

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_CUDA_KERNELS_H_
