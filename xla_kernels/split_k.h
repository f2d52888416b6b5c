// The deterministic split-K rule shared by the CPU and CUDA GEMMs.
//
// Weight-gradient GEMMs have a tiny output and a huge K (dW = patches^T @ dy,
// K = batch * H * W); parallelising over output tiles alone leaves the machine
// idle. For such shapes K is cut into contiguous chunks of L terms: chunk s
// covers k in [s * L, min(K, (s + 1) * L)), each chunk is summed over k
// ascending from +0 (P_s), and out = ((P_0 + P_1) + P_2) + ... + P_{S-1}.
//
// Both backends use this one rule, so CPU and GPU sums are bit-identical. It
// reads m, n and k of one matrix product only (never the thread count, the
// device, the ISA, mbits, or the batch/design counts), so results do not depend
// on the machine and a vmapped or batched call gives the bits of single calls.
#ifndef APPROX_JAX_XLA_KERNELS_SPLIT_K_H_
#define APPROX_JAX_XLA_KERNELS_SPLIT_K_H_

#include <cstdint>

namespace approx_jax {

// Split only when K >= kSplitKMinK and the partial sums (chunks * m * n
// floats) fit in kSplitKMaxPartials; chunks are multiples of kSplitKAlign (a
// multiple of every CPU and CUDA k block), at least kSplitKMinChunk long, and
// there are at most kSplitKMaxChunks of them. (Outputs up to ~1M elements with
// a long K split: a GPU needs hundreds of blocks, which the output tiles of
// e.g. a ResNet weight gradient, 1152 x 128, cannot give; the CPU keeps the
// partials in at most 64 MiB.)
constexpr int64_t kSplitKMinK = 4096;
constexpr int64_t kSplitKMaxPartials = int64_t{1} << 24;
constexpr int64_t kSplitKMinChunk = 1024;
constexpr int64_t kSplitKMaxChunks = 64;
constexpr int64_t kSplitKAlign = 256;

// Chunk length L for an [m, k] x [k, n] product; L >= k means no split.
inline int64_t SplitKChunkLength(int64_t m, int64_t n, int64_t k) {
  if (k < kSplitKMinK || m <= 0 || n <= 0) return k;
  const int64_t per = (k + kSplitKMaxChunks - 1) / kSplitKMaxChunks;
  int64_t chunk = (per + kSplitKAlign - 1) / kSplitKAlign * kSplitKAlign;
  if (chunk < kSplitKMinChunk) chunk = kSplitKMinChunk;
  if (chunk >= k) return k;
  const int64_t chunks = (k + chunk - 1) / chunk;
  if (m > kSplitKMaxPartials / chunks / n) return k;  // chunks * m * n > kSplitKMaxPartials
  return chunk;
}

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_SPLIT_K_H_
