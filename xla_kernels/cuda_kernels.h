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

// Deterministic split-K plan. When the output has few block tiles for the
// device (tiles < 2 * SMs) and K is large, K is cut into `splits` contiguous
// chunks [s * kspan, min(K, (s + 1) * kspan)), kspan a multiple of 8; chunk s
// is summed in ascending k from +0.0f into a partial in scratch memory, and
// out = ((P_0 + P_1) + ...) + P_{splits-1}, partials added in ascending s.
// The plan depends only on the shapes, the device's SM count and the env
// knob APPROX_JAX_CUDA_SPLIT_K (unset: automatic; 1: never split; n >= 2:
// aim for n chunks whenever K > 8, a testing aid), never on timing, so
// results are deterministic. splits == 1 (no scratch) is the plain
// ascending-k sum.
struct CudaGemmPlan {
  int64_t splits = 1;
  int64_t kspan = 0;          // k per chunk (all but the last are full)
  size_t scratch_bytes = 0;   // splits * designs * batch * m * n floats
};

// Chunking rule (pure): `want` = requested number of chunks (>= 1).
// kspan = round_up(ceil(K / want), 8), splits = ceil(K / kspan).
void SplitKChunks(int64_t k, int64_t want, int64_t* splits, int64_t* kspan);

// Fills `plan` for `p` on the current device. Returns "" or an error.
std::string PlanApproxGemm(const CudaGemmProblem& p, CudaGemmPlan* plan);

// Enqueues the GEMM on `stream` following `plan` (from PlanApproxGemm for
// the same problem). `scratch` (device memory, 16-byte aligned, at least
// plan.scratch_bytes) is needed only when plan.scratch_bytes > 0. Without
// split-K, k is summed in ascending order starting from +0.0f (the same
// order as the reference loop). Returns an empty string on success, else an
// error message.
std::string LaunchApproxGemm(const CudaGemmProblem& p, const CudaGemmPlan& plan,
                             float* scratch, cudaStream_t stream);

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
