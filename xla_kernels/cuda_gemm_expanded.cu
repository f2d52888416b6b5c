// Expanded-operand CUDA GEMM for 1 <= M <= 7 (the default there).
//
// Same numbers as the LUT kernel (cuda_kernels.cu): every product is SPEC's
// (approx_math.h), summed in ascending k from +0 per split-K chunk with one
// float32 round-to-nearest addition each, so results are bit-identical to
// the LUT kernel, the CPU kernels and the reference order.
//
// Why another kernel: the LUT kernel does one shared-memory LUT load plus an
// address add and a scale multiply per multiply-accumulate, and random LUT
// addresses cost bank conflicts (for M = 7 about 4-way). Here B is expanded
// once per k-chunk into 2^M "planes", one per mantissa index u of A:
//     E_u[k, j] = sb * 2^(eb - 127) * L[u, v(b[k, j])],  L = 2^c * (1 + r/2^M)
// stored as bfloat16 (L has M + 1 <= 8 significant bits and the exponent
// fits: exact). With a' = sa * 2^(ea - 127) the product is a' * E_u, exactly
// the SPEC product whenever it is a normal number, so the inner loop is
//     acc[i][j] = fma(a'[i, k], E_{u(i, k)}[k, j], acc[i][j])
// one 16-byte load (8 bfloat16) per row and 8 columns, 8 widenings and
// 8 FMAs: about 2.5 instructions and 2 bytes of shared memory per
// multiply-accumulate, conflict-free. The FMA rounds only the sum because
// the product is exact.
//
// Exactness conditions, checked per k-chunk over all of the block's operands
// (one __syncthreads_or): every biased exponent is 0 (zero/subnormal, which
// count as zero and give a' = +-0 or E = +-0 with the SPEC sign) or in
// [64, 190]. Then e0 = ea + eb - 127 is in [1, 253], so SPEC's underflow
// flush never triggers, e0 + c <= 254 never overflows, and E_u is a normal
// bfloat16. A chunk with any other operand (Inf, NaN, |x| >= 2^64 or
// 0 < |x| < 2^-63) is computed by the exact scalar path (ApproxMulBits and
// __fadd_rn from global memory) instead.
//
// Layout (shared memory, per block):
// * A words, 2 stages [kBK][kBM + 4]: a' bits (sign and exponent, zero
//   mantissa) OR the byte offset of plane u, u * kPlaneBytes (a multiple of
//   128), OR swizzle(u) << 4 in bits 4..6 (zero/subnormal: just the sign).
// * B words [kBK][kBN]: the byte offset of row v of the transposed LUT (row
//   2^M is all zeros: zero/subnormal operands), and B scales [kBK][kBN / 2]:
//   bfloat16 sign+exponent of two adjacent columns per word.
// * E, one stage [2^M planes][kBK][kBN] bfloat16 (the barrier after each
//   chunk's FMAs precedes the next chunk's expansion, so a second stage
//   would never be in use; dropping it halved E); 16-byte vector q of a plane
//   u lives at position q ^ swizzle(u), swizzle(u) = (u >> 1) & 7, so both
//   the expansion's stores (lanes differ in u) and the main loop's loads (8
//   lanes of one row read 8 consecutive vectors) are conflict-free.
// * The transposed LUT Lt[v][u] = entry(u, v) >> 16 (uint16; for M <= 7 the
//   kernel entry (c << 23) | (r << (23 - M)) has 16 zero low bits, and its
//   high half is exactly the bfloat16 exponent/mantissa increment).
//
// Threads: 256 = 8 columns x 32 rows of threads; thread (tx, ty) owns rows
// ty * kTR + i (i < kTR) and columns g * 64 + tx * 8 + c (g < kG, c < 8).
// Tiles: kTR = 4, kG = 2 (128 x 128) for M <= 5 and N > 64; kTR = 8, kG = 1
// (256 x 64) otherwise; kBK = 8 except M = 7 (kBK = 4: 2^7 planes of 4 x 64
// values, 64 KB, so that the A100's 163 KB also hold them; the opt-in
// APPROX_JAX_CUDA_EXPANDED_M7_BK=8 runs M = 7 with the 256 x 64 tile of
// kBK = 8, 128 KB of planes, where it fits: half the barriers per k). The
// expansion costs 2^M / kBM per multiply-accumulate.
//
// Narrow planes: a LUT whose entries depend only on the top M' < M bits of
// both indices (MBM at M' = M - 1, whose forced low bit makes the last index
// bit irrelevant; a design widened to a stack's width) is expanded into 2^M'
// planes indexed by those bits (LutWidthKernel finds M' per design before
// the launch; the layout keeps its 2^M-plane size). Same entries, so the
// same products; mbm(7) then costs the expansion of a width-6 design.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "approx_math.h"
#include "cuda_gemm_internal.h"

namespace approx_jax {
namespace cuda_gemm {
namespace {

// Operands with a biased exponent in [1, kLowExponent) leave the fast path
// (their products could underflow).
constexpr uint32_t kLowExponent = 64;

template <int kTR_, int kG_, int kBK_>
struct ExpTile {
  static constexpr int kTR = kTR_;
  static constexpr int kG = kG_;
  static constexpr int kBK = kBK_;
  static constexpr int kBM = 32 * kTR;
  static constexpr int kBN = 64 * kG;
  static constexpr int kAStride = kBM + 4;  // words
  static constexpr int kPlaneBytes = kBK * kBN * 2;
  static constexpr int kAStageWords = kBK * kAStride;
  static constexpr int kBWords = kBK * kBN;
  static constexpr int kSWords = kBK * kBN / 2;
  // Byte offsets of the fixed-size areas; E and Lt follow (their size
  // depends on M).
  static constexpr int kAOff = 0;
  static constexpr int kBOff = kAOff + 2 * kAStageWords * 4;
  static constexpr int kSOff = kBOff + kBWords * 4;
  static constexpr int kEOff = (kSOff + kSWords * 4 + 127) / 128 * 128;
  static_assert(kPlaneBytes % 128 == 0, "plane offsets must keep bits 4..6 free");
  static_assert(kBK % 4 == 0 && kBN % 64 == 0, "tile shape");
  static_assert(kTR % 4 == 0, "rows per thread: whole 16-byte A loads");

  static int64_t SmemBytes(int mbits) {
    const int64_t planes = int64_t{1} << mbits;
    const int64_t e_bytes = planes * kPlaneBytes;
    const int64_t lt_bytes = (planes + 1) * planes * 2;
    return kEOff + e_bytes + (lt_bytes + 15) / 16 * 16;
  }
};

using TileWide = ExpTile<4, 2, 8>;    // 128 x 128, M <= 5, N > 64
using TileTall = ExpTile<8, 1, 8>;    // 256 x 64, M <= 6
using TileTall7 = ExpTile<8, 1, 4>;   // 256 x 64, M = 7
using TileSmall = ExpTile<4, 1, 8>;   // 128 x 64, opt-in for under-filled grids
using TileSmall7 = ExpTile<4, 1, 4>;  // 128 x 64, the same at M = 7

__device__ __forceinline__ uint32_t Swizzle(uint32_t u) { return (u >> 1) & 7u; }

__device__ __forceinline__ bool SlowExponent(uint32_t bits) {
  const uint32_t e = (bits >> 23) & 0xffu;
  return e >= kSlowExponent || (e != 0 && e < kLowExponent);
}

// kMinBlocks = 2 (opt-in, APPROX_JAX_CUDA_EXPANDED_BLOCKS=2, TileWide at
// M <= 5 only, not yet timed on a GPU): the register budget of two resident
// blocks per SM (128 per thread; ptxas spills a few hundred bytes, nearly
// all outside the FMA loop). With kMinBlocks = 1 ptxas uses 216-228
// registers, so an SM holds one block (8 warps) and idles at each of a
// chunk's two barriers; two blocks of TileWide fit the shared memory for
// M <= 5 (30 KB at M = 3, 47 KB at M = 4, 80 KB at M = 5). Same
// arithmetic, same bits.
template <class T, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) ExpandedGemmKernel(const GemmParams p) {
  constexpr int kTR = T::kTR, kG = T::kG, kBK = T::kBK, kBM = T::kBM, kBN = T::kBN;
  constexpr int kAStride = T::kAStride, kPlaneBytes = T::kPlaneBytes;
  constexpr int kVecPerK = kBN / 8;  // 16-byte vectors per k-row of a plane
  extern __shared__ __align__(128) unsigned char smem[];
  uint32_t* const a_words = reinterpret_cast<uint32_t*>(smem + T::kAOff);
  uint32_t* const b_rows = reinterpret_cast<uint32_t*>(smem + T::kBOff);
  uint32_t* const b_scales = reinterpret_cast<uint32_t*>(smem + T::kSOff);
  unsigned char* const e_area = smem + T::kEOff;

  const int mb = p.mbits;
  // The shared-memory layout is sized for 2^mb planes; a design whose LUT is
  // a widened narrower one (p.not_widened) uses the first 2^ibits of them,
  // indexed by the top ibits mantissa bits (its effective index width, set
  // when its Lt is staged; uniform over the block).
  const uint32_t stage_bytes = (1u << mb) * kPlaneBytes;
  unsigned char* const lt = e_area + stage_bytes;  // Lt[v][u], uint16
  int ibits = mb;
  uint32_t planes = 1u << mb;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int tx = lane & 7;
  const int ty = warp * 4 + (lane >> 3);
  const uint32_t tx_swz = static_cast<uint32_t>(tx) << 4;

  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t db_total = p.designs * p.batch;
  const int64_t n_tiles = (N + kBN - 1) / kBN;
  const int64_t s_lo = p.parallel ? static_cast<int64_t>(blockIdx.x) / p.m_tiles : 0;
  const int64_t s_hi = p.parallel ? s_lo + 1 : p.splits;
  const int64_t row0 =
      (static_cast<int64_t>(blockIdx.x) - (p.parallel ? s_lo * p.m_tiles : 0)) * kBM;

  // Global -> register mapping. A: float4 along k, kBK / 4 threads per row
  // (TileSmall7's 128 rows of 4 k need only half of the threads).
  constexpr int kAThreadsPerRow = kBK / 4;
  constexpr int kARowsPerPass = kThreads / kAThreadsPerRow;
  constexpr bool kAllLoadA = kBM >= kARowsPerPass;
  constexpr int kAPasses = kAllLoadA ? kBM / kARowsPerPass : 1;
  static_assert(kAllLoadA ? kAPasses * kARowsPerPass == kBM : kARowsPerPass % kBM == 0,
                "A loader mapping");
  const int a_row = tid / kAThreadsPerRow;
  const int a_kk = (tid % kAThreadsPerRow) * 4;
  const bool a_loader = kAllLoadA || a_row < kBM;
  // B: float4 along n.
  constexpr int kBVectors = kBK * kBN / 4;
  static_assert(kBVectors <= kThreads, "B loader mapping");
  const bool b_loader = tid < kBVectors;
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

    if (d != staged_design) {
      __syncthreads();  // nobody still reads the previous design's Lt
      ibits = p.not_widened != nullptr ? EffectiveIndexBits(p.not_widened[d], mb) : mb;
      planes = 1u << ibits;
      const int shift = mb - ibits;  // entry (u, v) of the narrow LUT: (u << shift, v << shift)
      uint16_t* lt16 = reinterpret_cast<uint16_t*>(lt);
      // Lanes take consecutive u: conflict-free 2-byte stores; the strided
      // reads hit L2 (the LUT is at most 64 KB).
      for (uint32_t w = tid; w < planes * planes; w += kThreads) {
        const uint32_t v = w >> ibits, u = w & (planes - 1u);
        lt16[w] = static_cast<uint16_t>(__ldg(glut + ((u << shift << mb) | (v << shift))) >> 16);
      }
      for (uint32_t u = tid; u < planes; u += kThreads) lt16[planes * planes + u] = 0;
      staged_design = d;  // visible after the barrier before the first expansion
    }

    for (int64_t nt = blockIdx.y; nt < n_tiles; nt += gridDim.y) {
      for (int64_t sc = s_lo; sc < s_hi; ++sc) {
        const int64_t col0 = nt * kBN;
        const int64_t kbeg = sc * p.kspan;
        const int64_t kend = min(K, kbeg + p.kspan);
        const int nchunks = static_cast<int>((kend - kbeg + kBK - 1) / kBK);
        const bool fold = !p.parallel && sc > 0;
        __syncthreads();  // the previous tile no longer reads any stage

        float acc[kTR][8 * kG];
#pragma unroll
        for (int i = 0; i < kTR; ++i)
#pragma unroll
          for (int j = 0; j < 8 * kG; ++j) acc[i][j] = 0.0f;

        uint32_t ra[kAPasses][4], rb[4];
        auto load_chunk = [&](int64_t k0) {
#pragma unroll
          for (int q = 0; q < kAPasses; ++q) {
            if (a_loader) {
              LoadWords4(A, K, row0 + a_row + kARowsPerPass * q, M, k0 + a_kk, kend, p.vec_a,
                         ra[q]);
            } else {
#pragma unroll
              for (int c = 0; c < 4; ++c) ra[q][c] = 0u;
            }
          }
          if (b_loader) {
            LoadWords4(B, N, k0 + b_kk, kend, col0 + b_col, N, p.vec_b, rb);
          } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) rb[c] = 0u;
          }
        };
        // Decomposes the registers into A stage `s` and the B words; returns
        // this thread's slow flag.
        auto store_chunk = [&](int s) -> int {
          uint32_t* aw = a_words + s * T::kAStageWords;
          int slow = 0;
#pragma unroll
          for (int q = 0; q < kAPasses; ++q) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint32_t x = ra[q][c];
              const uint32_t e = (x >> 23) & 0xffu;
              const uint32_t u = (x & kMantMask) >> (23 - ibits);
              const uint32_t word =
                  (e == 0) ? (x & kSignMask)
                           : ((x & 0xff800000u) | (u * kPlaneBytes) | (Swizzle(u) << 4));
              if (a_loader) aw[(a_kk + c) * kAStride + a_row + kARowsPerPass * q] = word;
              slow |= SlowExponent(x) ? 1 : 0;
            }
          }
          if (b_loader) {
            uint32_t rows[4], sc16[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const uint32_t x = rb[c];
              const uint32_t e = (x >> 23) & 0xffu;
              const uint32_t v = (e == 0) ? planes : ((x & kMantMask) >> (23 - ibits));
              rows[c] = v << (ibits + 1);
              sc16[c] = (x >> 16) & ((e == 0) ? 0x8000u : 0xff80u);
              slow |= SlowExponent(x) ? 1 : 0;
            }
            *reinterpret_cast<uint4*>(b_rows + b_kk * kBN + b_col) =
                make_uint4(rows[0], rows[1], rows[2], rows[3]);
            *reinterpret_cast<uint2*>(b_scales + b_kk * (kBN / 2) + b_col / 2) =
                make_uint2(sc16[0] | (sc16[1] << 16), sc16[2] | (sc16[3] << 16));
          }
          return slow;
        };
        // Builds E from the B words: each work item is one 16-byte vector
        // (8 columns) of the two planes u0 = 2 * up and u0 + 1.
        auto expand = [&]() {
          unsigned char* es = e_area;
          const uint32_t pairs = planes >> 1;  // ibits >= 1
          const uint32_t items = pairs * kBK * kVecPerK;
          for (uint32_t w = tid; w < items; w += kThreads) {
            const uint32_t up = w & (pairs - 1u);
            const uint32_t rest = w >> (ibits - 1);
            const uint32_t gv = rest % kVecPerK;
            const uint32_t kk = rest / kVecPerK;
            const uint32_t u0 = 2 * up;
            const uint4 r0 = *reinterpret_cast<const uint4*>(b_rows + kk * kBN + gv * 8);
            const uint4 r1 = *reinterpret_cast<const uint4*>(b_rows + kk * kBN + gv * 8 + 4);
            const uint4 sv = *reinterpret_cast<const uint4*>(b_scales + kk * (kBN / 2) + gv * 4);
            const uint32_t rows[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
            const uint32_t scl[4] = {sv.x, sv.y, sv.z, sv.w};
            const unsigned char* ltu = lt + 2 * u0;
            uint32_t lo[4], hi[4];
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              // Lt[v][u0] in the low half, Lt[v][u0 + 1] in the high half.
              const uint32_t w0 = *reinterpret_cast<const uint32_t*>(ltu + rows[2 * h]);
              const uint32_t w1 = *reinterpret_cast<const uint32_t*>(ltu + rows[2 * h + 1]);
              // No carry between the halves: each half is sign | (eb + c) << 7
              // | r bits with eb + c <= 191 (fast chunks), or a signed zero.
              lo[h] = __byte_perm(w0, w1, 0x5410) + scl[h];
              hi[h] = __byte_perm(w0, w1, 0x7632) + scl[h];
            }
            const uint32_t q = kk * kVecPerK + gv;
            const uint32_t pos = 16u * (q ^ Swizzle(u0));
            *reinterpret_cast<uint4*>(es + u0 * kPlaneBytes + pos) =
                make_uint4(lo[0], lo[1], lo[2], lo[3]);
            *reinterpret_cast<uint4*>(es + (u0 + 1) * kPlaneBytes + pos) =
                make_uint4(hi[0], hi[1], hi[2], hi[3]);
          }
        };
        auto compute = [&](int s) {
          const uint32_t* aw = a_words + s * T::kAStageWords;
          const unsigned char* es = e_area;
#pragma unroll
          for (int kk = 0; kk < kBK; ++kk) {
            uint32_t wa[kTR];
#pragma unroll
            for (int h = 0; h < kTR / 4; ++h) {
              const uint4 v =
                  *reinterpret_cast<const uint4*>(aw + kk * kAStride + ty * kTR + 4 * h);
              wa[4 * h] = v.x;
              wa[4 * h + 1] = v.y;
              wa[4 * h + 2] = v.z;
              wa[4 * h + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < kTR; ++i) {
              const float fa = __uint_as_float(wa[i] & 0xff800000u);
              const unsigned char* base = es + ((wa[i] & kMantMask) ^ tx_swz) + kk * (kBN * 2);
#pragma unroll
              for (int g = 0; g < kG; ++g) {
                const uint4 e = *reinterpret_cast<const uint4*>(base + g * 128);
                const uint32_t ev[4] = {e.x, e.y, e.z, e.w};
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                  float& c0 = acc[i][g * 8 + 2 * h];
                  float& c1 = acc[i][g * 8 + 2 * h + 1];
                  c0 = __fmaf_rn(fa, __uint_as_float(ev[h] << 16), c0);
                  c1 = __fmaf_rn(fa, __uint_as_float(ev[h] & 0xffff0000u), c1);
                }
              }
            }
          }
        };
        // Exact scalar path for a chunk holding Inf/NaN, huge or tiny operands.
        auto compute_slow = [&](int64_t k0) {
          const int64_t krem = kend - k0;
          const int kn = krem < kBK ? static_cast<int>(krem) : kBK;
#pragma unroll 1
          for (int kk = 0; kk < kn; ++kk) {
            const int64_t k = k0 + kk;
            uint32_t xb[8 * kG];
#pragma unroll
            for (int g = 0; g < kG; ++g)
#pragma unroll
              for (int c = 0; c < 8; ++c) {
                const int64_t col = col0 + g * 64 + tx * 8 + c;
                xb[g * 8 + c] = col < N ? __float_as_uint(__ldg(B + k * N + col)) : 0u;
              }
#pragma unroll
            for (int i = 0; i < kTR; ++i) {
              const int64_t row = row0 + ty * kTR + i;
              const uint32_t xa = row < M ? __float_as_uint(__ldg(A + row * K + k)) : 0u;
#pragma unroll
              for (int j = 0; j < 8 * kG; ++j)
                acc[i][j] =
                    __fadd_rn(acc[i][j], __uint_as_float(ApproxMulBits(xa, xb[j], glut, mb)));
            }
          }
        };

        // Pipeline: registers hold chunk t + 1 while chunk t is computed; two
        // barriers per chunk (B words -> E, E -> compute).
        load_chunk(kbeg);
        int slow_cur = __syncthreads_or(store_chunk(0));
        if (!slow_cur) expand();
        __syncthreads();
        if (nchunks > 1) load_chunk(kbeg + kBK);
        for (int t = 0; t < nchunks; ++t) {
          const int64_t k0 = kbeg + static_cast<int64_t>(t) * kBK;
          const bool has_next = t + 1 < nchunks;
          // A stage (t+1)&1 was last read by compute(t-1) and the B words by
          // expand() of chunk t, both before the last barrier.
          const int flag_next = has_next ? store_chunk((t + 1) & 1) : 0;
          if (t + 2 < nchunks) load_chunk(k0 + 2 * kBK);  // in flight during the compute
          if (!slow_cur) {
            compute(t & 1);
          } else {
            compute_slow(k0);
          }
          const int slow_next = __syncthreads_or(flag_next);
          if (has_next && !slow_next)
            expand();  // E was last read by compute(t), before the barrier
          __syncthreads();
          slow_cur = slow_next;
        }

        // Epilogue: 8 consecutive columns per row and column group.
#pragma unroll
        for (int i = 0; i < kTR; ++i) {
          const int64_t row = row0 + ty * kTR + i;
          if (row >= M) continue;
          float* orow = O + row * N;
#pragma unroll
          for (int g = 0; g < kG; ++g) {
            const int64_t col = col0 + g * 64 + tx * 8;
            // (A fold re-reads what this same thread stored for chunk sc - 1.)
            if (p.vec_out && col + 7 < N) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const float* a4 = &acc[i][g * 8 + 4 * h];
                float4 v = make_float4(a4[0], a4[1], a4[2], a4[3]);
                if (fold) {
                  const float4 prev = *reinterpret_cast<const float4*>(orow + col + 4 * h);
                  v.x = __fadd_rn(prev.x, v.x);
                  v.y = __fadd_rn(prev.y, v.y);
                  v.z = __fadd_rn(prev.z, v.z);
                  v.w = __fadd_rn(prev.w, v.w);
                }
                *reinterpret_cast<float4*>(orow + col + 4 * h) = v;
              }
            } else {
#pragma unroll
              for (int c = 0; c < 8; ++c) {
                if (col + c < N) {
                  const float v = acc[i][g * 8 + c];
                  orow[col + c] = fold ? __fadd_rn(orow[col + c], v) : v;
                }
              }
            }
          }
        }
      }
    }
  }
}

bool ExpandedEnabled() {
  const char* s = std::getenv("APPROX_JAX_CUDA_EXPANDED");
  return !(s != nullptr && std::strcmp(s, "0") == 0);
}

// APPROX_JAX_CUDA_EXPANDED_M7_BK=8: M = 7 runs the 256 x 64 tile with
// kBK = 8 (TileTall) instead of TileTall7, read at each launch (not yet timed
// on a GPU; its 128 KB of planes need more than an A100's 163 KB per block).
bool M7Bk8Requested() {
  const char* s = std::getenv("APPROX_JAX_CUDA_EXPANDED_M7_BK");
  return s != nullptr && std::strcmp(s, "8") == 0;
}

// 0: TileWide, 1: TileTall, 2: TileTall7, 3: TileSmall, 4: TileSmall7.
int TileKind(int mbits, int64_t n, bool small) {
  const bool bk8 = mbits < 7 || M7Bk8Requested();
  if (small) return bk8 ? 3 : 4;
  if (!bk8) return 2;
  if (mbits <= 5 && n > 64) return 0;
  return 1;
}

// APPROX_JAX_CUDA_EXPANDED_FILL=1: small tiles where they fill the GPU
// better (see ExpandedFillTile), read at each plan and launch.
bool FillRequested() {
  const char* s = std::getenv("APPROX_JAX_CUDA_EXPANDED_FILL");
  return s != nullptr && std::strcmp(s, "1") == 0;
}

// Block tiles of a grid, and the fraction of `sms` x waves they occupy.
double WaveEfficiency(int64_t tiles, int sms) {
  const int64_t waves = (tiles + sms - 1) / sms;
  return waves > 0 ? static_cast<double>(tiles) / static_cast<double>(waves * sms) : 1.0;
}

// APPROX_JAX_CUDA_EXPANDED_BLOCKS=2: the two-blocks-per-SM build of TileWide
// for M <= 5 (see ExpandedGemmKernel), read at each launch.
bool TwoBlocksRequested(int mbits) {
  const char* s = std::getenv("APPROX_JAX_CUDA_EXPANDED_BLOCKS");
  return mbits <= 5 && s != nullptr && std::strcmp(s, "2") == 0;
}

template <class T, int kMinBlocks = 1>
std::string Launch(GemmParams gp, int64_t grid_splits, cudaStream_t stream) {
  const int64_t db = gp.designs * gp.batch;
  const int64_t m_tiles = (gp.m + T::kBM - 1) / T::kBM;
  const int64_t n_tiles = (gp.n + T::kBN - 1) / T::kBN;
  if (m_tiles * grid_splits > 0x7fffffff) return "approx_jax_gemm: too many rows for one launch";
  gp.m_tiles = m_tiles;
  const dim3 grid(static_cast<unsigned>(m_tiles * grid_splits),
                  static_cast<unsigned>(std::min<int64_t>(n_tiles, 65535)),
                  static_cast<unsigned>(std::min<int64_t>(db, 65535)));
  const int smem = static_cast<int>(T::SmemBytes(gp.mbits));
  std::lock_guard<std::mutex> lock(LaunchAttributeMutex());
  cudaError_t e = cudaFuncSetAttribute(ExpandedGemmKernel<T, kMinBlocks>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return CudaErr("cudaFuncSetAttribute", e);
  ExpandedGemmKernel<T, kMinBlocks><<<grid, kThreads, smem, stream>>>(gp);
  e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : CudaErr("approx_jax_gemm expanded launch", e);
}

}  // namespace

bool ExpandedTile(int mbits, int64_t n, bool small, int64_t* bm, int64_t* bn) {
  if (mbits < 1 || mbits > 7 || !ExpandedEnabled()) return false;
  switch (TileKind(mbits, n, small)) {
    case 0:
      *bm = TileWide::kBM;
      *bn = TileWide::kBN;
      break;
    case 1:
      *bm = TileTall::kBM;
      *bn = TileTall::kBN;
      break;
    case 2:
      *bm = TileTall7::kBM;
      *bn = TileTall7::kBN;
      break;
    default:
      *bm = TileSmall::kBM;  // (TileSmall7: the same shape)
      *bn = TileSmall::kBN;
      break;
  }
  return true;
}

bool ExpandedFillTile(int mbits, int64_t m, int64_t n, int64_t problems, int64_t splits, int sms) {
  int64_t bm = 0, bn = 0, sbm = 0, sbn = 0;
  if (!FillRequested() || splits != 1 || sms < 1 || !ExpandedTile(mbits, n, false, &bm, &bn) ||
      !ExpandedTile(mbits, n, true, &sbm, &sbn)) {
    return false;
  }
  const int64_t tiles = problems * ((m + bm - 1) / bm) * ((n + bn - 1) / bn);
  const int64_t small_tiles = problems * ((m + sbm - 1) / sbm) * ((n + sbn - 1) / sbn);
  return WaveEfficiency(small_tiles, sms) > WaveEfficiency(tiles, sms);
}

int64_t ExpandedSmemBytes(int mbits, int64_t n, bool small) {
  switch (TileKind(mbits, n, small)) {
    case 0:
      return TileWide::SmemBytes(mbits);
    case 1:
      return TileTall::SmemBytes(mbits);
    case 2:
      return TileTall7::SmemBytes(mbits);
    case 3:
      return TileSmall::SmemBytes(mbits);
    default:
      return TileSmall7::SmemBytes(mbits);
  }
}

std::string LaunchExpandedGemm(GemmParams gp, int64_t grid_splits, bool small,
                               cudaStream_t stream) {
  switch (TileKind(gp.mbits, gp.n, small)) {
    case 0:
      if (TwoBlocksRequested(gp.mbits)) return Launch<TileWide, 2>(gp, grid_splits, stream);
      return Launch<TileWide>(gp, grid_splits, stream);
    case 1:
      return Launch<TileTall>(gp, grid_splits, stream);
    case 2:
      return Launch<TileTall7>(gp, grid_splits, stream);
    case 3:
      return Launch<TileSmall, 2>(gp, grid_splits, stream);
    default:
      return Launch<TileSmall7, 2>(gp, grid_splits, stream);
  }
}

}  // namespace cuda_gemm
}  // namespace approx_jax
