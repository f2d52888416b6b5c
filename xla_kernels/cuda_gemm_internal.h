// Internals shared by the CUDA GEMM kernels (cuda_kernels.cu: the LUT kernel
// and the launch logic; cuda_gemm_expanded.cu: the expanded-operand kernel).
#ifndef APPROX_JAX_XLA_KERNELS_CUDA_GEMM_INTERNAL_H_
#define APPROX_JAX_XLA_KERNELS_CUDA_GEMM_INTERNAL_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <mutex>
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
  // Expanded kernel: per design, the bitmask of index shifts s (1 << s) by
  // which its LUT is NOT a widened narrower LUT (LutWidthKernel), or nullptr:
  // every design is expanded at its full width.
  const int* not_widened;
};

// The index bits the expanded kernel needs for a LUT of width `mbits` whose
// LutWidthKernel mask is `not_widened`: mbits - s for the largest s < mbits
// such that the LUT is widened by every shift 1..s (an entry depends only on
// the top mbits - s bits of both indices; MBM's forced low bit makes mbm(M)
// one such LUT with s = 1, and so is a design widened to a stack's width).
// Its planes are then 2^(mbits - s) instead of 2^mbits: the same entries,
// hence the same products.
__host__ __device__ inline int EffectiveIndexBits(int not_widened, int mbits) {
  int s = 0;
  while (s + 1 < mbits && !(not_widened & (2 << s))) ++s;
  return mbits - s;
}

// Four consecutive floats m[r * ld + c .. c + 3] of a row-major matrix, as
// bits, into w; zeros where r >= r_end or (element by element) c + i >= c_end.
// vec: one 16-byte load, all four or none (the launcher sets vec only where
// rows are 16-byte aligned and c_end leaves no partial group). Both GEMM
// kernels stage their A and B chunks through it.
__device__ __forceinline__ void LoadWords4(const float* m, int64_t ld, int64_t r, int64_t r_end,
                                           int64_t c, int64_t c_end, bool vec, uint32_t (&w)[4]) {
  if (vec) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < r_end && c < c_end) v = __ldg(reinterpret_cast<const float4*>(m + r * ld + c));
    w[0] = __float_as_uint(v.x);
    w[1] = __float_as_uint(v.y);
    w[2] = __float_as_uint(v.z);
    w[3] = __float_as_uint(v.w);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = (r < r_end && c + i < c_end) ? __float_as_uint(__ldg(m + r * ld + c + i)) : 0u;
  }
}

// The expanded-operand kernel (cuda_gemm_expanded.cu) serves 1 <= M <= 7.
// Its block tile for a problem of width `mbits` and `n` columns (`small`:
// the 128 x 64 tile of ExpandedFillTile), or false when the expanded kernel
// is not used (M >= 8, or disabled by the env knob
// APPROX_JAX_CUDA_EXPANDED=0, which selects the LUT kernel: a testing and
// benchmarking aid; both give the same bits).
bool ExpandedTile(int mbits, int64_t n, bool small, int64_t* bm, int64_t* bn);

// Whether the 128 x 64 tile is used for a problem of `problems` (designs x
// batch) m x n outputs in `splits` k-chunks on a device of `sms` SMs: only
// under the opt-in APPROX_JAX_CUDA_EXPANDED_FILL=1 (not yet timed on a GPU),
// without split-K, and when its grid fills the SMs' waves better than the
// default tile's (e.g. 56 default tiles on 132 SMs). A tile shape never
// changes a result's bits (each output is summed over k in the same order).
bool ExpandedFillTile(int mbits, int64_t m, int64_t n, int64_t problems, int64_t splits, int sms);

// Shared memory the expanded kernel needs for this problem (bytes).
int64_t ExpandedSmemBytes(int mbits, int64_t n, bool small);

// Launches the expanded kernel (ExpandedTile must have returned true and
// ExpandedSmemBytes must fit `optin`, both for the same `small`). Returns ""
// or an error.
std::string LaunchExpandedGemm(GemmParams gp, int64_t grid_splits, bool small, cudaStream_t stream);

// Held from setting a kernel's maximum dynamic shared memory to its launch:
// the attribute is per kernel and device, process-wide, and its value depends
// on M, so a call on another host thread could lower it in between.
std::mutex& LaunchAttributeMutex();

std::string CudaErr(const char* what, cudaError_t e);

}  // namespace cuda_gemm
}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_CUDA_GEMM_INTERNAL_H_
