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

// Split-K plan. The summation order follows SplitKChunkLength (split_k.h,
// the CPU GEMM's rule too): it reads one matrix product's m, n and k only
// (and the env knob APPROX_JAX_CUDA_SPLIT_K: unset = the built-in rule,
// 1 = never chunk, n >= 2 = aim for n chunks, a testing aid), never the
// batch or design count, the device or timing: results are deterministic,
// and a stacked/vmapped/batched GEMM gives the bits of its single-matrix
// parts. K >= 4096 is cut into `splits` contiguous chunks
// [s * kspan, min(K, (s + 1) * kspan)), kspan a multiple of 256 (>= 1024,
// at most 64 chunks, and none when chunks * m * n > 2^24); chunk s is summed
// in ascending k from +0.0f into P_s and out = ((P_0 + P_1) + ...) +
// P_{splits-1}, ascending s. Otherwise (splits == 1) the plain ascending-k
// sum from +0.0f.
// Execution (bit-identical either way): `parallel` (when the output has
// few block tiles for the device's SM count) runs one block per (tile,
// chunk) writing partials to scratch, then a reduction kernel; otherwise
// each block folds its chunks into out in ascending order.
// Closed forms (lut_family.h): when the LUT kernel would read its LUT from
// global memory (M >= 8), each design's LUT is first compared on the device
// with the closed forms of the built-in families, and a design whose LUT
// equals one has its entries computed instead of loaded (the same entries,
// so the same bits). APPROX_JAX_CUDA_FORMULA=0 turns this off (a testing and
// benchmarking aid).
// Narrow planes: when the expanded-operand kernel runs (M <= 7), each
// design's LUT is first checked on the device for being a narrower LUT
// widened to M (LutWidthKernel; mbm(M) is one, at M - 1 bits, and so is a
// design widened to a stack's width), and the kernel builds 2^M' planes for
// its effective index width M' instead of 2^M (same entries, same bits).
// APPROX_JAX_CUDA_NARROW=0 turns this off (a testing and benchmarking aid).
struct CudaGemmPlan {
  int64_t splits = 1;
  int64_t kspan = 0;  // k per chunk (all but the last are full)
  bool parallel = false;
  // Scratch: [0, partials_bytes) the parallel split-K partials (splits *
  // designs * batch * m * n floats); from families_offset (16-aligned, when
  // >= 0) one int32 per design, the families its LUT does not match; from
  // widths_offset (16-aligned, when >= 0; never with families_offset) one
  // int32 per design, the shifts by which its LUT is not widened.
  size_t partials_bytes = 0;
  int64_t families_offset = -1;
  int64_t widths_offset = -1;
  size_t scratch_bytes = 0;
};

// Chunking rule (pure). want <= 0: the built-in rule shared with the CPU GEMM
// (SplitKChunkLength in split_k.h); want >= 1 (testing override): kspan =
// round_up(ceil(K / want), 8). splits = ceil(K / kspan); splits == 1 gives
// kspan = K.
void SplitKChunks(int64_t m, int64_t n, int64_t k, int64_t want, int64_t* splits, int64_t* kspan);

// Fills `plan` for `p` on the current device. Returns "" or an error.
std::string PlanApproxGemm(const CudaGemmProblem& p, CudaGemmPlan* plan);

// Enqueues the GEMM on `stream` following `plan` (from PlanApproxGemm for
// the same problem). `scratch` (device memory, 16-byte aligned, at least
// plan.scratch_bytes) is needed only when plan.scratch_bytes > 0. Returns an
// empty string on success, else an error message.
std::string LaunchApproxGemm(const CudaGemmProblem& p, const CudaGemmPlan& plan, float* scratch,
                             cudaStream_t stream);

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
