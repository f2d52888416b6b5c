// Internals shared by the CUDA GEMM kernels (cuda_kernels.cu: the LUT kernel
// and the launch logic; cuda_gemm_expanded.cu: the expanded-operand kernel).
#ifndef APPROX_JAX_XLA_KERNELS_CUDA_GEMM_INTERNAL_H_
#define APPROX_JAX_XLA_KERNELS_CUDA_GEMM_INTERNAL_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace approx_jax {
namespace cuda_gemm {

constexpr int kThreads = 256;

// A k-chunk is computed by the exact scalar path when any of its operands has
// a biased exponent >= this: covers Inf/NaN and every possible overflow, since
// two exponents <= 190 give e0 = ea + eb - 127 <= 253.
constexpr uint32_t kSlowExponent = 191;

struct GemmParams {
  const float* a;
  const float* b;
  const uint32_t* lut;
  float* out;
  int64_t designs, batch, m, k, n;
  int64_t a_ds, a_bs, b_ds, b_bs, lut_ds;
  int64_t m_tiles;  // parallel split-K: blockIdx.x = m_tile + m_tiles * chunk
  int64_t kspan;    // k per chunk (== k when not chunked)
  int64_t splits;   // number of k-chunks (1 when not chunked)
  int parallel;     // 1: one chunk per block, partials to out = scratch
                    // [splits][db][M][N]; 0: each block folds all chunks
                    // into out in ascending order
  int mbits;
  int lw;              // log2(banks per LUT copy), shared-LUT mode only
  uint32_t lut_words;  // words staged in shared memory (copies * 4^M)
  int vec_a, vec_b, vec_out;
  // LUT kernel with the LUT in global memory: per design, the bitmask of
  // families (1 << LutFamily) its LUT does not match (LutFamilyKernel), or
  // nullptr: every entry is loaded.
  const int* families;
};

// The expanded-operand kernel (cuda_gemm_expanded.cu) serves 1 <= M <= 7.
// Its block tile for a problem of width `mbits` and `n` columns, or false
// when the expanded kernel is not used (M >= 8, or disabled by the env knob
// APPROX_JAX_CUDA_EXPANDED=0, which selects the LUT kernel: a testing and
// benchmarking aid; both give the same bits).
bool ExpandedTile(int mbits, int64_t n, int64_t* bm, int64_t* bn);

// Shared memory the expanded kernel needs for this problem (bytes).
int64_t ExpandedSmemBytes(int mbits, int64_t n);

// Launches the expanded kernel (ExpandedTile must have returned true and
// ExpandedSmemBytes must fit `optin`). Returns "" or an error.
std::string LaunchExpandedGemm(GemmParams gp, int64_t grid_splits, cudaStream_t stream);

std::string CudaErr(const char* what, cudaError_t e);

}  // namespace cuda_gemm
}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_CUDA_GEMM_INTERNAL_H_
