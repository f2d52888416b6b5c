// Deterministic split-K rule of the CPU approximate GEMM (shared by the kernel
// and tools/gemm_harness.cc, whose bit-exact reference follows the same order).
//
// Weight-gradient GEMMs have a tiny output and a huge K (dW = patches^T @ dy:
// K = batch * H * W). Parallelising over output blocks alone runs them on one
// thread, so for such shapes K is cut into contiguous chunks of SplitKChunk(p)
// terms: chunk s covers k in [s * L, min(K, (s + 1) * L)). Each chunk's sum is
// formed sequentially over k ascending from +0 (P_s), and the output is
//   out = ((P_0 + P_1) + P_2) + ... + P_{S-1}
// (ascending s, one float32 addition each; S = ceil(K / L)).
//
// The rule depends on m, n and k only (not on the thread count, the ISA, the
// batch/design counts or mbits), so results are identical for any number of
// threads, and a batched or vmapped call gives the bits of the single calls.
// When SplitKChunk(p) >= p.k the order is the plain sequential sum over k.
#ifndef APPROX_JAX_XLA_KERNELS_CPU_GEMM_SPLIT_H_
#define APPROX_JAX_XLA_KERNELS_CPU_GEMM_SPLIT_H_

#include <cstdint>

#include "cpu_gemm.h"
#include "split_k.h"

namespace approx_jax {

// Chunk length L (>= p.k: no split): the rule shared with the CUDA GEMM.
inline int64_t SplitKChunk(const GemmProblem& p) { return SplitKChunkLength(p.m, p.n, p.k); }

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_CPU_GEMM_SPLIT_H_
