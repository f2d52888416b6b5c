// CUDA kernels behind the `approx_jax_gemm` and `approx_jax_multiply` targets.
//
// Numerics: every product equals ApproxMulBits (approx_math.h, SPEC section 2)
// bit for bit, and out[d, b, i, j] = (((+0 + P_0) + P_1) + ... + P_{K-1}) with
// k ascending, one float32 round-to-nearest addition per term -- the same
// order as the reference loop, fixed per output element (no atomics), so
// results are deterministic.
//
// Split-K (weight gradients: tiny output, K = batch * H * W): K is summed in
// contiguous chunks by the rule of split_k.h, shared with the CPU GEMM
// (SplitKChunks): out = ((P_0 + P_1) + ...) + P_{S-1}, each P_s an ascending
// sum from +0 over its chunk. The order depends on one product's m, n, k only
// (not on batch, design count or device), so vmapped/stacked calls give the
// bits of single calls, and CPU and GPU agree. When the output has fewer than 2 * SMs block tiles,
// block (m_tile, s) computes P_s into scratch [S][D*B][M][N] and a second kernel adds the partials
// in ascending s (parallel split-K); otherwise each block folds P_0, P_1, ... into its output tile
// in that order.
//
// GEMM design (SIMT, profile-free):
// * Block tile 128x128 (256x64 when N <= 64), k-chunks of 8, 256 threads,
//   8x8 outputs per thread (rows ty*4+{0..3} and BM/2+ty*4+{0..3}, likewise
//   columns), shared-memory tiles double-buffered so there is one barrier per
//   k-chunk.
// * Operands are decomposed once, when a chunk is stored into shared memory:
//   per element a "scale" v = sign * 2^(e-127) (a float with zero mantissa;
//   +-0 for zero or subnormal operands) and the element's part of the LUT
//   address (its truncated mantissa, pre-shifted).
// * The LUT is staged in shared memory as floats L = 2^c * (1 + r/2^M), i.e.
//   kernel entry + 0x3f800000. The inner loop per multiply-accumulate is
//       addr = aoff_i + boff_j            (one integer add)
//       L    = lut_smem[addr]             (one LDS)
//       x    = v_a * v_b                  (mul.rn.ftz: exact power of two,
//                                          flushed to +-0 exactly when
//                                          e0 = ea + eb - 127 <= 0)
//       acc  = fma(x, L, acc)
//   For normal operands with 1 <= e0 <= 253, x * L = s * 2^(e0+c-127) *
//   (1 + r/2^M) is exactly representable and equals the SPEC product, so
//   fma(x, L, acc) == fadd(acc, P) bit for bit (the fma rounds once, the
//   exact x*L needs no rounding). Zero/subnormal operands and underflow give
//   x = +-0 with the SPEC sign, hence the same sum. Overflow, Inf and NaN can
//   only occur when some operand has a biased exponent >= 191 (|x| >= 2^64);
//   a chunk containing such an operand is flagged (one __syncthreads_or) and
//   computed by the exact scalar path (ApproxMulBits + __fadd_rn) from global
//   memory instead.
// * Bank conflicts: a random LUT access per lane would conflict ~3.5-way.
//   The staged LUT is replicated C times (C a power of two <= 32): copy g
//   lives only in banks [g*W, (g+1)*W), W = 32/C, and lane l reads copy
//   l/W, so at most W lanes compete for W banks (conflict-free for C = 32,
//   which fits for M <= 5: 4^5 * 4 B * 32 = 128 KB). The address of entry
//   (ia << M) | ib in that layout is
//       (ia << (M - lw + 5)) + ((ib >> lw) << 5 | (ib & (W-1))) + (l & ~(W-1))
//   words, lw = log2(W): a sum of a per-A, a per-B and a per-lane term, all
//   precomputed. C is the largest that fits the device's opt-in shared
//   memory and a cap (default 128 KB, env APPROX_JAX_CUDA_LUT_SMEM_KB).
// * When the LUT does not fit in shared memory (M >= 8, 256 KB .. 16 MB) the
//   same kernel reads it from global memory / L2 through __ldg, one random
//   4-byte read per product, unless the design's LUT equals the closed form
//   of a built-in family (lut_family.h: Mitchell, truncate, MBM), checked on
//   the device per call by LutFamilyKernel (a flag per design in scratch):
//   then the entry is computed from the two indices in a few integer
//   operations instead. Same entries, so the same bits.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "approx_math.h"
#include "cuda_gemm_internal.h"
#include "cuda_kernels.h"
#include "lut_family.h"
#include "split_k.h"

namespace approx_jax {
namespace cuda_gemm {

std::string CudaErr(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
}

std::mutex& LaunchAttributeMutex() {
  static std::mutex mutex;
  return mutex;
}

}  // namespace cuda_gemm

namespace {

using cuda_gemm::CudaErr;
using cuda_gemm::GemmParams;
using cuda_gemm::kSlowExponent;
using cuda_gemm::kThreads;
using cuda_gemm::LoadWords4;
constexpr int kBK = 8;

// Block tile of kBM x kBN outputs, 8 x 8 per thread (256 threads).
template <int kBM_, int kBN_>
struct Tile {
  static constexpr int kBM = kBM_;
  static constexpr int kBN = kBN_;
  static constexpr int kTY = kBM / 8;       // thread rows
  static constexpr int kTX = kBN / 8;       // thread columns
  static constexpr int kAStride = kBM + 4;  // padded: transposed A store is conflict-free
  static constexpr int kBStride = kBN;
  static constexpr int kAWords = kBK * kAStride;                 // one A array of one stage
  static constexpr int kBWords = kBK * kBStride;                 // one B array of one stage
  static constexpr int kStageWords = 2 * kAWords + 2 * kBWords;  // values + offsets
  static constexpr int kTileBytes = 2 * kStageWords * 4;         // double-buffered
  static_assert(kTY * kTX == kThreads, "8x8 outputs per thread");
  static_assert(kTX % 8 == 0 && kTY % 4 == 0, "a warp covers 4 x 8 threads");
  static_assert(kBM % 128 == 0, "A loads: two threads per row, 128 rows per pass");
  static_assert(2 * kBN <= kThreads, "B loads: one float4 per thread at most");
  static_assert(kTileBytes % 16 == 0, "tile area must keep the LUT 16-byte aligned");
  static_assert(kAWords % 4 == 0 && kBWords % 4 == 0 && kAStride % 32 == 4, "layout");
};
using WideTile = Tile<128, 128>;
using TallTile = Tile<256, 64>;  // N <= 64 (e.g. conv layers with 64 channels)

constexpr uint32_t kOneBits = 0x3f800000u;  // 1.0f

__device__ __forceinline__ float MulFtz(float x, float y) {
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(y));
  return r;
}

// sign * 2^(e-127) for a normal operand, +-0 for zero/subnormal ones.
__device__ __forceinline__ float ScaleOf(uint32_t bits) {
  const uint32_t e = (bits >> 23) & 0xffu;
  return __uint_as_float(bits & (e == 0 ? kSignMask : 0xff800000u));
}

template <bool kShared>
__device__ __forceinline__ uint32_t OffsetA(uint32_t bits, int mbits, int lw) {
  const uint32_t i = (bits & kMantMask) >> (23 - mbits);
  return kShared ? (i << (mbits - lw + 7)) : (i << mbits);  // bytes / entries
}

template <bool kShared>
__device__ __forceinline__ uint32_t OffsetB(uint32_t bits, int mbits, int lw) {
  const uint32_t i = (bits & kMantMask) >> (23 - mbits);
  if (!kShared) return i;
  return (((i >> lw) << 5) | (i & ((1u << lw) - 1u))) << 2;  // bytes
}

// Row (column) within the tile of a thread's i-th row (column): t*4 + i for
// i < 4, half + t*4 + (i-4) otherwise, half = kBM/2 (kBN/2).
template <int kHalf>
__device__ __forceinline__ int RowOf(int t, int i) {
  return (i < 4) ? (t * 4 + i) : (kHalf + t * 4 + (i - 4));
}

// The family whose closed form a LUT equals, from the bitmask of families
// (1 << LutFamily) it does not match; kFamilyNone if none (the order and
// MBM's minimum width of LutFamilyBy).
__device__ __forceinline__ int FamilyOfMismatches(int mismatches, int mbits) {
  if (!(mismatches & (1 << kFamilyMitchell))) return kFamilyMitchell;
  if (!(mismatches & (1 << kFamilyTruncate))) return kFamilyTruncate;
  if (mbits >= kMbmMinBits && !(mismatches & (1 << kFamilyMbm))) return kFamilyMbm;
  return kFamilyNone;
}

// mismatches[d] |= the families (1 << LutFamily) whose closed form differs
// from design d's LUT at some entry (mismatches zeroed before). Grid
// (blocks, designs); every entry is compared with all three closed forms.
__global__ void __launch_bounds__(256)
    LutFamilyKernel(const uint32_t* __restrict__ lut, int64_t lut_ds, int64_t designs, int mbits,
                    int* mismatches) {
  const uint32_t entries = 1u << (2 * mbits);
  const uint32_t mask = (1u << mbits) - 1u;
  for (int64_t d = blockIdx.y; d < designs; d += gridDim.y) {
    const uint32_t* dl = lut + d * lut_ds;
    int bad = mbits >= kMbmMinBits ? 0 : (1 << kFamilyMbm);
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < entries;
         e += gridDim.x * blockDim.x) {
      const uint32_t v = __ldg(dl + e), ia = e >> mbits, ib = e & mask;
      if (v != FamilyEntry<kFamilyMitchell>(mbits, ia, ib)) bad |= 1 << kFamilyMitchell;
      if (v != FamilyEntry<kFamilyTruncate>(mbits, ia, ib)) bad |= 1 << kFamilyTruncate;
      if (mbits >= kMbmMinBits && v != FamilyEntry<kFamilyMbm>(mbits, ia, ib)) {
        bad |= 1 << kFamilyMbm;
      }
    }
    // One flag per family for the block, then one atomic per block.
    const int m1 = __syncthreads_or(bad & (1 << kFamilyMitchell));
    const int m2 = __syncthreads_or(bad & (1 << kFamilyTruncate));
    const int m3 = __syncthreads_or(bad & (1 << kFamilyMbm));
    const int block_bad = (m1 ? 1 << kFamilyMitchell : 0) | (m2 ? 1 << kFamilyTruncate : 0) |
                          (m3 ? 1 << kFamilyMbm : 0);
    if (threadIdx.x == 0 && block_bad != 0) atomicOr(mismatches + d, block_bad);
  }
}

// not_widened[d] = the bitmask of shifts s in [1, mbits) (bit s) for which
// design d's LUT is not a narrower LUT widened by s: some entry (u, v)
// differs from entry (u & ~low, v & ~low), low = 2^s - 1 (the CPU's
// WidenedBy, cpu_gemm.cc). One block of kWidthCheckThreads per design
// (grid.x, looping past 65535; at M = 7 each thread checks 16 entries, a few
// microseconds): the mask is written, so no memset is needed before it.
constexpr int kWidthCheckThreads = 1024;
__global__ void __launch_bounds__(kWidthCheckThreads)
    LutWidthKernel(const uint32_t* __restrict__ lut, int64_t lut_ds, int64_t designs, int mbits,
                   int* not_widened) {
  const uint32_t entries = 1u << (2 * mbits);
  const uint32_t mask = (1u << mbits) - 1u;
  for (int64_t d = blockIdx.x; d < designs; d += gridDim.x) {
    const uint32_t* dl = lut + d * lut_ds;
    int bad = 0;
    for (uint32_t e = threadIdx.x; e < entries; e += blockDim.x) {
      const uint32_t v = __ldg(dl + e), ia = e >> mbits, ib = e & mask;
      for (int s = 1; s < mbits; ++s) {
        const uint32_t low = (1u << s) - 1u;
        if (v != __ldg(dl + (((ia & ~low) << mbits) | (ib & ~low)))) bad |= 1 << s;
      }
    }
    // One barrier per shift (at most 10; mbits is uniform over the block).
    int block_bad = 0;
    for (int s = 1; s < mbits; ++s) {
      if (__syncthreads_or(bad & (1 << s))) block_bad |= 1 << s;
    }
    if (threadIdx.x == 0) not_widened[d] = block_bad;
  }
}

template <bool kShared, class T>
__global__ void __launch_bounds__(kThreads) ApproxGemmKernel(const GemmParams p) {
  constexpr int kBM = T::kBM, kBN = T::kBN;
  constexpr int kAStride = T::kAStride, kBStride = T::kBStride;
  constexpr int kAWords = T::kAWords, kBWords = T::kBWords;
  constexpr int kStageWords = T::kStageWords, kTileBytes = T::kTileBytes;
  constexpr int kHalfM = kBM / 2, kHalfN = kBN / 2;
  constexpr int kWarpCols = T::kTX / 8;  // warps across the tile's columns
  extern __shared__ __align__(16) unsigned char smem[];
  float* const tiles = reinterpret_cast<float*>(smem);
  unsigned char* const lut_s = smem + kTileBytes;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // A warp covers 4 thread-rows x 8 thread-columns: its fragment reads touch
  // at most 128 contiguous bytes per instruction (one wavefront).
  const int ty = (warp / kWarpCols) * 4 + (lane >> 3);
  const int tx = (warp % kWarpCols) * 8 + (lane & 7);
  const int mb = p.mbits;
  const int lw = p.lw;
  const uint32_t goff = kShared ? (static_cast<uint32_t>(lane & ~((1 << lw) - 1)) << 2) : 0u;

  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t db_total = p.designs * p.batch;
  const int64_t n_tiles = (N + kBN - 1) / kBN;
  // K is summed in chunks [s * kspan, min(K, (s + 1) * kspan)), each from +0
  // in ascending k. Parallel mode: this block does chunk s_lo only and
  // writes it to partial s_lo. Otherwise it does every chunk in ascending s
  // and folds them into out: out = P_0, then out = out + P_s.
  const int64_t s_lo = p.parallel ? static_cast<int64_t>(blockIdx.x) / p.m_tiles : 0;
  const int64_t s_hi = p.parallel ? s_lo + 1 : p.splits;
  const int64_t row0 =
      (static_cast<int64_t>(blockIdx.x) - (p.parallel ? s_lo * p.m_tiles : 0)) * kBM;

  // Global -> shared mapping. A: thread loads 4 consecutive k of rows
  // a_row + 128 * q. B: threads tid < 2 * kBN load 4 consecutive columns of
  // one k-row.
  constexpr int kAPasses = kBM / 128;
  const int a_row = tid >> 1;
  const int a_kk = (tid & 1) * 4;
  const bool b_loader = tid < 2 * kBN;
  const int b_kk = tid / (kBN / 4);
  const int b_col = (tid % (kBN / 4)) * 4;

  int64_t staged_design = -1;
  for (int64_t z = blockIdx.z; z < db_total; z += gridDim.z) {
    const int64_t d = z / p.batch;
    const int64_t bi = z - d * p.batch;
    const float* __restrict__ A = p.a + d * p.a_ds + bi * p.a_bs;
    const float* __restrict__ B = p.b + d * p.b_ds + bi * p.b_bs;
    const uint32_t* __restrict__ glut = p.lut + d * p.lut_ds;
    float* __restrict__ O = p.out + ((p.parallel ? s_lo * db_total : 0) + z) * M * N;
    // A global-memory LUT that equals a family's closed form is computed.
    const int family =
        (!kShared && p.families != nullptr) ? FamilyOfMismatches(p.families[d], mb) : kFamilyNone;

    if (kShared && d != staged_design) {
      __syncthreads();  // nobody still reads the previous design's LUT
      uint32_t* ls = reinterpret_cast<uint32_t*>(lut_s);
      const uint32_t wmask = (1u << lw) - 1u;
      for (uint32_t w = tid; w < p.lut_words; w += kThreads) {
        const uint32_t e = ((w >> 5) << lw) + (w & wmask);
        ls[w] = __ldg(glut + e) + kOneBits;
      }
      staged_design = d;  // made visible by the barrier before the first chunk
    }

    for (int64_t nt = blockIdx.y; nt < n_tiles; nt += gridDim.y) {
      for (int64_t sc = s_lo; sc < s_hi; ++sc) {
        const int64_t col0 = nt * kBN;
        const int64_t kbeg = sc * p.kspan;
        const int64_t kend = min(K, kbeg + p.kspan);
        const int nchunks = static_cast<int>((kend - kbeg + kBK - 1) / kBK);
        // Fold this chunk's sum into out (which holds chunks < sc).
        const bool fold = !p.parallel && sc > 0;
        __syncthreads();  // previous tile/chunk no longer reads the stage buffers

        float acc[8][8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

        uint32_t ra[kAPasses][4], rb[4];
        auto load_chunk = [&](int64_t k0) {
#pragma unroll
          for (int q = 0; q < kAPasses; ++q)
            LoadWords4(A, K, row0 + a_row + 128 * q, M, k0 + a_kk, kend, p.vec_a, ra[q]);
          if (b_loader) {
            LoadWords4(B, N, k0 + b_kk, kend, col0 + b_col, N, p.vec_b, rb);
          } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) rb[c] = 0u;
          }
        };
        // Decomposes the registers into stage `s`; returns this thread's slow flag.
        auto store_chunk = [&](int s) -> int {
          float* av = tiles + s * kStageWords;
          uint32_t* ao = reinterpret_cast<uint32_t*>(av + kAWords);
          float* bv = av + 2 * kAWords;
          uint32_t* bo = reinterpret_cast<uint32_t*>(bv + kBWords);
          uint32_t emax = 0;
#pragma unroll
          for (int q = 0; q < kAPasses; ++q) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int idx = (a_kk + c) * kAStride + a_row + 128 * q;
              av[idx] = ScaleOf(ra[q][c]);
              ao[idx] = OffsetA<kShared>(ra[q][c], mb, lw);
              emax = max(emax, (ra[q][c] >> 23) & 0xffu);
            }
          }
          float4 v;
          uint4 o;
          v.x = ScaleOf(rb[0]);
          v.y = ScaleOf(rb[1]);
          v.z = ScaleOf(rb[2]);
          v.w = ScaleOf(rb[3]);
          o.x = OffsetB<kShared>(rb[0], mb, lw);
          o.y = OffsetB<kShared>(rb[1], mb, lw);
          o.z = OffsetB<kShared>(rb[2], mb, lw);
          o.w = OffsetB<kShared>(rb[3], mb, lw);
#pragma unroll
          for (int c = 0; c < 4; ++c) emax = max(emax, (rb[c] >> 23) & 0xffu);
          if (b_loader) {
            *reinterpret_cast<float4*>(bv + b_kk * kBStride + b_col) = v;
            *reinterpret_cast<uint4*>(bo + b_kk * kBStride + b_col) = o;
          }
          return emax >= kSlowExponent ? 1 : 0;
        };

        load_chunk(kbeg);
        int slow = __syncthreads_or(store_chunk(0));
        for (int t = 0; t < nchunks; ++t) {
          const int64_t k0 = kbeg + static_cast<int64_t>(t) * kBK;
          const bool has_next = t + 1 < nchunks;
          if (has_next) load_chunk(k0 + kBK);  // in flight during the compute
          if (!slow) {
            const float* av = tiles + (t & 1) * kStageWords;
            const uint32_t* ao = reinterpret_cast<const uint32_t*>(av + kAWords);
            const float* bv = av + 2 * kAWords;
            const uint32_t* bo = reinterpret_cast<const uint32_t*>(bv + kBWords);
            // One instantiation of the chunk's products per way of reading the
            // LUT (family uniform over the block: no divergence).
            auto fast_chunk = [&](auto family_tag) {
              constexpr int kFamily = decltype(family_tag)::value;
#pragma unroll
              for (int kk = 0; kk < kBK; ++kk) {
                const float4 a0 = *reinterpret_cast<const float4*>(av + kk * kAStride + ty * 4);
                const float4 a1 =
                    *reinterpret_cast<const float4*>(av + kk * kAStride + kHalfM + ty * 4);
                const uint4 ao0 = *reinterpret_cast<const uint4*>(ao + kk * kAStride + ty * 4);
                const uint4 ao1 =
                    *reinterpret_cast<const uint4*>(ao + kk * kAStride + kHalfM + ty * 4);
                const float4 b0 = *reinterpret_cast<const float4*>(bv + kk * kBStride + tx * 4);
                const float4 b1 =
                    *reinterpret_cast<const float4*>(bv + kk * kBStride + kHalfN + tx * 4);
                const uint4 bo0 = *reinterpret_cast<const uint4*>(bo + kk * kBStride + tx * 4);
                const uint4 bo1 =
                    *reinterpret_cast<const uint4*>(bo + kk * kBStride + kHalfN + tx * 4);
                const float fa[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                const uint32_t oa[8] = {ao0.x + goff, ao0.y + goff, ao0.z + goff, ao0.w + goff,
                                        ao1.x + goff, ao1.y + goff, ao1.z + goff, ao1.w + goff};
                const float fb[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
                const uint32_t ob[8] = {bo0.x, bo0.y, bo0.z, bo0.w, bo1.x, bo1.y, bo1.z, bo1.w};
#pragma unroll
                for (int i = 0; i < 8; ++i) {
#pragma unroll
                  for (int j = 0; j < 8; ++j) {
                    float l;
                    if (kShared) {
                      l = *reinterpret_cast<const float*>(lut_s + (oa[i] + ob[j]));
                    } else if (kFamily == kFamilyNone) {
                      l = __uint_as_float(__ldg(glut + (oa[i] + ob[j])) + kOneBits);
                    } else {  // (oa[i] = ia << M here)
                      l = __uint_as_float(FamilyEntry<kFamily>(mb, oa[i] >> mb, ob[j]) + kOneBits);
                    }
                    acc[i][j] = __fmaf_rn(MulFtz(fa[i], fb[j]), l, acc[i][j]);
                  }
                }
              }
            };
            if constexpr (kShared) {
              fast_chunk(std::integral_constant<int, kFamilyNone>{});
            } else {
              switch (family) {
                case kFamilyMitchell:
                  fast_chunk(std::integral_constant<int, kFamilyMitchell>{});
                  break;
                case kFamilyTruncate:
                  fast_chunk(std::integral_constant<int, kFamilyTruncate>{});
                  break;
                case kFamilyMbm:
                  fast_chunk(std::integral_constant<int, kFamilyMbm>{});
                  break;
                default:
                  fast_chunk(std::integral_constant<int, kFamilyNone>{});
              }
            }
          } else {
            // Exact scalar path for chunks holding Inf/NaN or huge operands.
            const int64_t krem = kend - k0;
            const int kn = krem < kBK ? static_cast<int>(krem) : kBK;
#pragma unroll 1
            for (int kk = 0; kk < kn; ++kk) {
              const int64_t k = k0 + kk;
              uint32_t xa[8], xb[8];
#pragma unroll
              for (int i = 0; i < 8; ++i) {
                const int64_t row = row0 + RowOf<kHalfM>(ty, i);
                xa[i] = row < M ? __float_as_uint(__ldg(A + row * K + k)) : 0u;
              }
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                const int64_t col = col0 + RowOf<kHalfN>(tx, j);
                xb[j] = col < N ? __float_as_uint(__ldg(B + k * N + col)) : 0u;
              }
#pragma unroll
              for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j)
                  acc[i][j] =
                      __fadd_rn(acc[i][j], __uint_as_float(ApproxMulBits(xa[i], xb[j], glut, mb)));
            }
          }
          if (has_next) slow = __syncthreads_or(store_chunk((t + 1) & 1));
        }

        // Epilogue.
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t row = row0 + RowOf<kHalfM>(ty, i);
          if (row >= M) continue;
          float* orow = O + row * N;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t col = col0 + h * kHalfN + tx * 4;
            // (A fold re-reads what this same thread stored for chunk sc - 1.)
            if (p.vec_out && col + 3 < N) {
              float4 v = make_float4(acc[i][h * 4], acc[i][h * 4 + 1], acc[i][h * 4 + 2],
                                     acc[i][h * 4 + 3]);
              if (fold) {
                const float4 prev = *reinterpret_cast<const float4*>(orow + col);
                v.x = __fadd_rn(prev.x, v.x);
                v.y = __fadd_rn(prev.y, v.y);
                v.z = __fadd_rn(prev.z, v.z);
                v.w = __fadd_rn(prev.w, v.w);
              }
              *reinterpret_cast<float4*>(orow + col) = v;
            } else {
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                if (col + c < N) {
                  orow[col + c] =
                      fold ? __fadd_rn(orow[col + c], acc[i][h * 4 + c]) : acc[i][h * 4 + c];
                }
              }
            }
          }
        }
      }
    }
  }
}

// Split-K reduction: out[i] = ((part[0][i] + part[1][i]) + ...) +
// part[splits-1][i], ascending s, one float32 round-to-nearest addition each
// (part[0] is itself a sum from +0, never -0, so +0 + part[0] == part[0]).
__global__ void __launch_bounds__(256)
    SplitKReduceKernel(const float* __restrict__ part, float* __restrict__ out, int64_t total,
                       int64_t splits) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = part[i];
    for (int64_t s = 1; s < splits; ++s) acc = __fadd_rn(acc, part[s * total + i]);
    out[i] = acc;
  }
}

__global__ void __launch_bounds__(256)
    ApproxMultiplyKernel(const float* __restrict__ a, const float* __restrict__ b,
                         const uint32_t* __restrict__ lut, float* __restrict__ out, int64_t designs,
                         int64_t n, int64_t sa, int64_t sb, int64_t sl, int mbits) {
  for (int64_t d = blockIdx.y; d < designs; d += gridDim.y) {
    const float* da = a + d * sa;
    const float* db = b + d * sb;
    const uint32_t* dl = lut + d * sl;
    float* dout = out + d * n;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      dout[i] = __uint_as_float(
          ApproxMulBits(__float_as_uint(__ldg(da + i)), __float_as_uint(__ldg(db + i)), dl, mbits));
    }
  }
}

int64_t LutSmemCapBytes() {
  int64_t kb = 128;
  if (const char* s = std::getenv("APPROX_JAX_CUDA_LUT_SMEM_KB")) {
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    if (end != s && v >= 0) kb = v;
  }
  return kb * 1024;
}

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// The LUT kernel's replication of its LUT in shared memory: the largest
// number of copies (a power of two <= 32) that fits the cap and, beside the
// tile area, the device's opt-in shared memory; 0: the LUT stays in global
// memory (see the file comment).
int LutCopies(int mbits, int64_t tile_bytes, int optin) {
  const int64_t entries = int64_t{1} << (2 * mbits);
  const int64_t cap = LutSmemCapBytes();
  for (int c = 32; c >= 1; c /= 2) {
    const int w = 32 / c;
    if (w > (1 << mbits)) break;  // layout needs W <= 2^M
    const int64_t bytes = c * entries * 4;
    if (bytes <= cap && tile_bytes + bytes <= optin) return c;
  }
  return 0;
}

template <class T>
std::string LaunchGemmTiled(GemmParams gp, int64_t splits, int optin, cudaStream_t stream) {
  const int64_t entries = int64_t{1} << (2 * gp.mbits);
  const int copies = LutCopies(gp.mbits, T::kTileBytes, optin);
  const bool shared_lut = copies > 0;
  if (shared_lut) gp.families = nullptr;  // (closed forms replace global reads only)
  size_t smem = T::kTileBytes;
  gp.lw = 0;
  gp.lut_words = 0;
  if (shared_lut) {
    const int w = 32 / copies;
    while ((1 << gp.lw) < w) ++gp.lw;
    gp.lut_words = static_cast<uint32_t>(copies * entries);
    smem += static_cast<size_t>(gp.lut_words) * 4;
  }
  const int64_t db = gp.designs * gp.batch;
  const int64_t m_tiles = (gp.m + T::kBM - 1) / T::kBM;
  const int64_t n_tiles = (gp.n + T::kBN - 1) / T::kBN;
  if (m_tiles * splits > 0x7fffffff) return "approx_jax_gemm: too many rows for one launch";
  gp.m_tiles = m_tiles;
  const dim3 grid(static_cast<unsigned>(m_tiles * splits),
                  static_cast<unsigned>(std::min<int64_t>(n_tiles, 65535)),
                  static_cast<unsigned>(std::min<int64_t>(db, 65535)));
  cudaError_t e;
  std::lock_guard<std::mutex> lock(cuda_gemm::LaunchAttributeMutex());
  if (shared_lut) {
    e = cudaFuncSetAttribute(ApproxGemmKernel<true, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return CudaErr("cudaFuncSetAttribute", e);
    ApproxGemmKernel<true, T><<<grid, kThreads, smem, stream>>>(gp);
  } else {
    if (smem > 48 * 1024) {
      e = cudaFuncSetAttribute(ApproxGemmKernel<false, T>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return CudaErr("cudaFuncSetAttribute", e);
    }
    ApproxGemmKernel<false, T><<<grid, kThreads, smem, stream>>>(gp);
  }
  e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : CudaErr("approx_jax_gemm launch", e);
}

// Chunking rule: SplitKChunkLength (split_k.h), shared with the CPU GEMM so
// CPU and GPU sums are bit-identical; the env override forces ~want chunks.
// Parallel split-K only when the output has fewer than kSplitTilesPerSm *
// SMs block tiles and the partials fit in kMaxScratchFloats.
constexpr int64_t kSplitTilesPerSm = 2;
constexpr int64_t kMaxScratchFloats = int64_t{64} << 20;  // 256 MiB

// 0: the built-in rule; else the requested number of chunks (1 = none).
int64_t SplitKOverride() {
  if (const char* s = std::getenv("APPROX_JAX_CUDA_SPLIT_K")) {
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    if (end != s && v >= 1) return v;
  }
  return 0;
}

// What the kernel choice needs of the current device, queried once per plan
// and once per launch.
struct DeviceLimits {
  int optin = 0;  // shared memory per block, opt-in maximum (bytes)
  int sms = 0;    // multiprocessors
};

std::string QueryDevice(DeviceLimits* dev) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return CudaErr("cudaGetDevice", e);
  e = cudaDeviceGetAttribute(&dev->optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&dev->sms, cudaDevAttrMultiProcessorCount, device);
  return e == cudaSuccess ? std::string() : CudaErr("cudaDeviceGetAttribute", e);
}

enum class GemmKernel { kExpanded, kLutTall, kLutWide };

// The one kernel and block-tile choice, made by PlanApproxGemm (its split-K
// mode decision must see the tile that will run) and again by
// LaunchApproxGemm for the plan's `splits`: the expanded-operand kernel when
// it serves the problem (M <= 7, not disabled by APPROX_JAX_CUDA_EXPANDED=0)
// and its shared memory fits the device, with its opt-in 128 x 64 tile where
// ExpandedFillTile says so (`small`); else the LUT kernel, with 256 x 64
// tiles for narrow outputs (N <= 64, e.g. 64-channel conv layers would waste
// half of a 128-wide tile).
GemmKernel ChooseKernel(const CudaGemmProblem& p, int64_t splits, const DeviceLimits& dev,
                        int64_t* bm, int64_t* bn, bool* small = nullptr) {
  const bool fill =
      cuda_gemm::ExpandedFillTile(p.mbits, p.m, p.n, p.designs * p.batch, splits, dev.sms);
  if (small) *small = false;
  if (cuda_gemm::ExpandedTile(p.mbits, p.n, fill, bm, bn) &&
      cuda_gemm::ExpandedSmemBytes(p.mbits, p.n, fill) <= dev.optin) {
    if (small) *small = fill;
    return GemmKernel::kExpanded;
  }
  const bool tall = p.n <= TallTile::kBN;
  *bm = tall ? TallTile::kBM : WideTile::kBM;
  *bn = tall ? TallTile::kBN : WideTile::kBN;
  return tall ? GemmKernel::kLutTall : GemmKernel::kLutWide;
}

}  // namespace

void SplitKChunks(int64_t m, int64_t n, int64_t k, int64_t want, int64_t* splits, int64_t* kspan) {
  if (k <= 0) {
    *splits = 1;
    *kspan = k;
    return;
  }
  if (want <= 0) {  // built-in rule (a multiple of kSplitKAlign, hence of kBK)
    static_assert(kSplitKAlign % kBK == 0, "split-K chunks must be whole k-chunks");
    *kspan = SplitKChunkLength(m, n, k);
  } else {
    const int64_t per = (k + want - 1) / want;
    *kspan = (per + kBK - 1) / kBK * kBK;
  }
  *splits = (k + *kspan - 1) / *kspan;
  if (*splits <= 1) {
    *splits = 1;
    *kspan = k;
  }
}

namespace {

// The split-K execution mode of a plan whose chunks are set (parallel and
// partials_bytes), given its block tile (bm x bn) on a device of `sms` SMs.
void PlanSplitMode(const CudaGemmProblem& p, int64_t bm, int64_t bn, int sms, CudaGemmPlan* plan) {
  if (plan->splits < 2) return;
  // The summation order is now fixed; only the execution mode remains.
  const int64_t outputs = p.designs * p.batch * p.m * p.n;
  if (plan->splits > kMaxScratchFloats / outputs) return;  // fold in-block
  const int64_t tiles = p.designs * p.batch * ((p.m + bm - 1) / bm) * ((p.n + bn - 1) / bn);
  if (tiles < kSplitTilesPerSm * std::max(sms, 1)) {
    plan->parallel = true;
    plan->partials_bytes = static_cast<size_t>(plan->splits * outputs) * sizeof(float);
  }
}

// Whether the closed forms may replace LUT reads: the LUT kernel runs with
// its LUT in global memory, and APPROX_JAX_CUDA_FORMULA is not "0".
bool UsesClosedForms(const CudaGemmProblem& p, GemmKernel kernel, int optin) {
  const char* s = std::getenv("APPROX_JAX_CUDA_FORMULA");
  if (s && std::strcmp(s, "0") == 0) return false;
  switch (kernel) {
    case GemmKernel::kExpanded:
      return false;
    case GemmKernel::kLutTall:
      return LutCopies(p.mbits, TallTile::kTileBytes, optin) == 0;
    case GemmKernel::kLutWide:
      return LutCopies(p.mbits, WideTile::kTileBytes, optin) == 0;
  }
  return false;
}

// Whether the expanded kernel runs and may use narrow planes (M >= 2, and
// APPROX_JAX_CUDA_NARROW is not "0").
bool UsesNarrowPlanes(const CudaGemmProblem& p, GemmKernel kernel) {
  const char* s = std::getenv("APPROX_JAX_CUDA_NARROW");
  if ((s && std::strcmp(s, "0") == 0) || p.mbits < 2) return false;
  return kernel == GemmKernel::kExpanded;
}

// The per-design words of a plan's scratch from byte `offset`, or nullptr
// when the scratch is missing or either is not 16-byte aligned.
int* ScratchWords(float* scratch, int64_t offset) {
  if (scratch == nullptr || !Aligned16(scratch) || offset % 16 != 0) return nullptr;
  return reinterpret_cast<int*>(reinterpret_cast<char*>(scratch) + offset);
}

}  // namespace

std::string PlanApproxGemm(const CudaGemmProblem& p, CudaGemmPlan* plan) {
  *plan = CudaGemmPlan();
  plan->kspan = p.k;
  const int64_t db = p.designs * p.batch;
  if (db == 0 || p.m == 0 || p.n == 0 || p.k == 0) return {};
  SplitKChunks(p.m, p.n, p.k, SplitKOverride(), &plan->splits, &plan->kspan);
  DeviceLimits dev;
  if (std::string err = QueryDevice(&dev); !err.empty()) return err;
  int64_t bm = 0, bn = 0;
  const GemmKernel kernel = ChooseKernel(p, plan->splits, dev, &bm, &bn);
  PlanSplitMode(p, bm, bn, dev.sms, plan);
  plan->scratch_bytes = plan->partials_bytes;
  // At most one per-design word array (the kernels exclude each other),
  // 16-byte aligned after the partials.
  const int64_t words_at = static_cast<int64_t>((plan->partials_bytes + 15) / 16 * 16);
  const size_t words_end = static_cast<size_t>(words_at) + p.designs * sizeof(int);
  if (UsesClosedForms(p, kernel, dev.optin)) {
    plan->families_offset = words_at;
    plan->scratch_bytes = words_end;
  } else if (UsesNarrowPlanes(p, kernel)) {
    plan->widths_offset = words_at;
    plan->scratch_bytes = words_end;
  }
  return {};
}

std::string LaunchApproxGemm(const CudaGemmProblem& p, const CudaGemmPlan& plan, float* scratch,
                             cudaStream_t stream) {
  // Launch errors are read back with cudaGetLastError: clear one that an
  // earlier call left when it returned early (a failed attribute set or
  // memset), which would otherwise fail this call.
  (void)cudaGetLastError();
  const int64_t db = p.designs * p.batch;
  if (db == 0 || p.m == 0 || p.n == 0) return {};
  if (p.k == 0) {  // XLA does not zero outputs
    const cudaError_t e =
        cudaMemsetAsync(p.out, 0, static_cast<size_t>(db * p.m * p.n) * sizeof(float), stream);
    return e == cudaSuccess ? std::string() : CudaErr("cudaMemsetAsync", e);
  }
  DeviceLimits dev;
  if (std::string err = QueryDevice(&dev); !err.empty()) return err;
  cudaError_t e = cudaSuccess;

  GemmParams gp{};  // (value-initialised: a plan leaves some fields unused)
  gp.a = p.a;
  gp.b = p.b;
  gp.lut = p.lut;
  const bool chunked = plan.splits > 1;
  const bool parallel = chunked && plan.parallel;
  if (chunked && (plan.kspan <= 0 || plan.kspan % kBK != 0 ||
                  plan.kspan * (plan.splits - 1) >= p.k || plan.kspan * plan.splits < p.k)) {
    return "approx_jax_gemm: bad split-K plan";
  }
  if (parallel && (scratch == nullptr || !Aligned16(scratch))) {
    return "approx_jax_gemm: split-K scratch missing or misaligned";
  }
  gp.out = parallel ? scratch : p.out;
  gp.families = nullptr;
  if (plan.families_offset >= 0) {
    // Which families' closed forms each design's LUT equals (before the GEMM,
    // on the same stream).
    int* mismatches = ScratchWords(scratch, plan.families_offset);
    if (mismatches == nullptr) return "approx_jax_gemm: closed-form scratch missing or misaligned";
    e = cudaMemsetAsync(mismatches, 0, static_cast<size_t>(p.designs) * sizeof(int), stream);
    if (e != cudaSuccess) return CudaErr("cudaMemsetAsync", e);
    constexpr int kBlock = 256;
    const int64_t entries = int64_t{1} << (2 * p.mbits);
    const dim3 fgrid(
        static_cast<unsigned>(std::min<int64_t>((entries + 16 * kBlock - 1) / (16 * kBlock), 128)),
        static_cast<unsigned>(std::min<int64_t>(p.designs, 65535)));
    LutFamilyKernel<<<fgrid, kBlock, 0, stream>>>(p.lut, p.lut_design_stride, p.designs, p.mbits,
                                                  mismatches);
    e = cudaGetLastError();
    if (e != cudaSuccess) return CudaErr("approx_jax_gemm LUT family check launch", e);
    gp.families = mismatches;
  }
  gp.not_widened = nullptr;
  if (plan.widths_offset >= 0) {
    // Each design's effective index width for the expanded kernel (before
    // the GEMM, on the same stream).
    int* not_widened = ScratchWords(scratch, plan.widths_offset);
    if (not_widened == nullptr)
      return "approx_jax_gemm: narrow-plane scratch missing or misaligned";
    LutWidthKernel<<<static_cast<unsigned>(std::min<int64_t>(p.designs, 65535)), kWidthCheckThreads,
                     0, stream>>>(p.lut, p.lut_design_stride, p.designs, p.mbits, not_widened);
    e = cudaGetLastError();
    if (e != cudaSuccess) return CudaErr("approx_jax_gemm LUT width check launch", e);
    gp.not_widened = not_widened;
  }
  gp.kspan = chunked ? plan.kspan : p.k;
  gp.splits = chunked ? plan.splits : 1;
  gp.parallel = parallel ? 1 : 0;
  gp.designs = p.designs;
  gp.batch = p.batch;
  gp.m = p.m;
  gp.k = p.k;
  gp.n = p.n;
  gp.a_ds = p.a_design_stride;
  gp.a_bs = p.a_batch_stride;
  gp.b_ds = p.b_design_stride;
  gp.b_bs = p.b_batch_stride;
  gp.lut_ds = p.lut_design_stride;
  gp.mbits = p.mbits;
  gp.vec_a = (p.k % 4 == 0 && Aligned16(p.a) && gp.a_ds % 4 == 0 && gp.a_bs % 4 == 0) ? 1 : 0;
  gp.vec_b = (p.n % 4 == 0 && Aligned16(p.b) && gp.b_ds % 4 == 0 && gp.b_bs % 4 == 0) ? 1 : 0;
  gp.vec_out = (p.n % 4 == 0 && Aligned16(gp.out)) ? 1 : 0;
  const int64_t grid_splits = parallel ? plan.splits : 1;
  int64_t bm = 0, bn = 0;
  bool small = false;
  std::string err;
  switch (ChooseKernel(p, plan.splits, dev, &bm, &bn, &small)) {
    case GemmKernel::kExpanded:
      err = cuda_gemm::LaunchExpandedGemm(gp, grid_splits, small, stream);
      break;
    case GemmKernel::kLutTall:
      err = LaunchGemmTiled<TallTile>(gp, grid_splits, dev.optin, stream);
      break;
    case GemmKernel::kLutWide:
      err = LaunchGemmTiled<WideTile>(gp, grid_splits, dev.optin, stream);
      break;
  }
  if (!err.empty() || !parallel) return err;
  const int64_t total = db * p.m * p.n;
  constexpr int kBlock = 256;
  const int64_t blocks = std::min<int64_t>((total + kBlock - 1) / kBlock, 65535);
  SplitKReduceKernel<<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(scratch, p.out, total,
                                                                           plan.splits);
  e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : CudaErr("approx_jax_gemm split-K reduce launch", e);
}

std::string LaunchApproxMultiply(const CudaMultiplyProblem& p, cudaStream_t stream) {
  (void)cudaGetLastError();  // as in LaunchApproxGemm
  if (p.designs == 0 || p.n == 0) return {};
  constexpr int kBlock = 256;
  const int64_t blocks = std::min<int64_t>((p.n + kBlock - 1) / kBlock, 8192);
  dim3 grid(static_cast<unsigned>(blocks),
            static_cast<unsigned>(std::min<int64_t>(p.designs, 65535)));
  ApproxMultiplyKernel<<<grid, kBlock, 0, stream>>>(p.a, p.b, p.lut, p.out, p.designs, p.n,
                                                    p.a_design_stride, p.b_design_stride,
                                                    p.lut_design_stride, p.mbits);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : CudaErr("approx_jax_multiply launch", e);
}

}  // namespace approx_jax
