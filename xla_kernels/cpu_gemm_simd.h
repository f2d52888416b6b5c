// Internal interface between the CPU GEMM dispatcher (cpu_gemm.cc) and the
// per-ISA kernels (cpu_gemm_avx512.cc, cpu_gemm_avx2.cc, both built from
// cpu_gemm_simd_impl.h). Only plain C types cross it: the ISA translation
// units are compiled with `#pragma GCC target`, so they must not instantiate
// inline library code that the linker could share with generic code.
#ifndef APPROX_JAX_XLA_KERNELS_CPU_GEMM_SIMD_H_
#define APPROX_JAX_XLA_KERNELS_CPU_GEMM_SIMD_H_

#include <cstddef>
#include <cstdint>

#include "cpu_gemm.h"
#include "lut_family.h"

namespace approx_jax {

// GemmProblem::lut_facts of distinct LUT d (0 when the LUT is shared), or
// kLutFactsUnknown.
inline int32_t LutFactsAt(const GemmProblem& p, int64_t d) {
  return p.lut_facts == nullptr ? kLutFactsUnknown : p.lut_facts[p.lut_design_stride == 0 ? 0 : d];
}

// Width-(m - s) LUT `narrow` whose widening to m is `lut` (entry (u, v) of
// the narrow LUT: the wide one's at (u << s, v << s)).
inline void NarrowLut(const uint32_t* lut, int m, int s, uint32_t* narrow) {
  const int w = m - s;
  for (uint32_t u = 0; u < (1u << w); ++u) {
    const uint32_t* src = lut + ((size_t{u} << s) << m);
    uint32_t* dst = narrow + (size_t{u} << w);
    for (uint32_t v = 0; v < (1u << w); ++v) dst[v] = src[size_t{v} << s];
  }
}

namespace gemm_internal {

using TaskFn = void (*)(void* arg, int64_t task);

// Runs fn(arg, 0 .. num_tasks-1), possibly concurrently (wraps ParallelFor).
struct Runner {
  void* ctx;
  void (*run)(void* ctx, int64_t num_tasks, TaskFn fn, void* arg);
};

// Per-thread, 64-byte aligned scratch buffer `slot` (0..kScratchSlots-1) of at
// least `bytes` bytes, kept between calls; nullptr when allocation fails.
constexpr int kScratchSlots = 8;
void* ThreadScratch(int slot, size_t bytes);

// Tuning facts about the machine (cached).
int HardwareThreads();
size_t L2CacheBytes();

// Strategy override for the harness: 0 = automatic, 1 = expanded tiles,
// 2 = LUT gathers, 3 = the direct kernel (PrefersDirect).
extern int g_force_strategy;
// ISA override for the harness: 0 = best available, 1 = scalar, 2 = AVX2,
// 3 = AVX-512 (an unsupported choice falls back to the best available below it).
extern int g_force_isa;
// Tile-size budget override in bytes for tuning (0 = automatic).
extern int64_t g_tile_budget;
// Harness override of a task's a-pack budget in bytes (0 = kPackBudget; a
// small one makes the planner cut rows and design groups to their floors).
extern int64_t g_pack_budget;
// Harness override: 1 = treat every design as an independent problem (no
// reuse of a/b work shared across designs); for benchmarking only.
extern int g_no_design_sharing;
// Harness override of the AVX-512 column-block width: 0 = chosen by n
// (16 for n <= 16, 32 for n <= 32, else 64), or 16 / 32 / 64.
extern int g_force_width;
// Harness override: 1 = float32 tiles even where bfloat16 tiles would do
// (as env APPROX_JAX_CPU_BF16_TILES=0).
extern int g_force_f32_tiles;
// Harness override of the gather path's LUT-row streaming (Plan::stream):
// 0 = automatic, 1 = never, 2 = always.
extern int g_force_stream;
// Harness override of how a transposed problem (cpu_gemm.cc GemmTransposed)
// reads b^T: 0 = automatic, 1 = a transposed copy, 2 = in place.
extern int g_force_plain_t;
// Harness override of the bfloat16 tile builder: 0 = automatic (the byte
// lookup wherever the CPU has AVX-512 VBMI), 1 = the permute builder.
extern int g_force_permute_tiles;
// Harness override of the streamed kernel's four-row gathers
// (KSplit::quad_gathers): 0 = automatic, 1 = one row per gather.
extern int g_force_row_gathers;
// Harness override of the AVX2 bfloat16 tile builder: 0 = automatic (pair
// table rows at 4 <= M <= 7), 1 = one gather per tile value.
extern int g_force_gather_tiles;
// Harness override: 1 = permute tiles at M <= 3 on AVX2 (KSplit::perm_tiles).
extern int g_force_perm_tiles;
// Harness override (GEMM_NO_C_PREFETCH): 1 = no prefetch of the next
// panel's output block in the tile and gather kernels' panel loop (to
// measure it).
extern int g_no_c_prefetch;
// Plans that streamed LUT rows so far (a counter for the harness).
extern int64_t g_stream_plans;
// Transposed problems that read b^T in place so far (a counter for the harness).
extern int64_t g_plain_t_runs;
// Matrix-vector products run as their transposed problem so far (a counter
// for the harness).
extern int64_t g_matvec_runs;
// Smallest M whose gathers stream LUT rows (automatic mode; a tuning knob).
extern int g_stream_min_bits;
// ... where the four-row gathers run (KSplit::quad_gathers, AVX-512).
constexpr int kQuadStreamMinBits = 8;
// The smallest M that streams, with or without the four-row gathers (the
// one bound of StreamsLutRows and cpu_gemm.cc PrefersTransposedStream).
inline int StreamMinBits(bool four_row_gathers) {
  return four_row_gathers && kQuadStreamMinBits < g_stream_min_bits ? kQuadStreamMinBits
                                                                    : g_stream_min_bits;
}
// Tile path: a row chunk of a task has at least g_min_rows_mul * 2^M rows (each
// task builds the tiles of its columns, so fewer, taller row chunks build less;
// 1024x1568x64 M=7 measured 6.8 ms with 2, 4.5 ms with 4). Harness knob.
extern int g_min_rows_mul;

// Which part of the problem one kernel call computes (see cpu_gemm_split.h):
// problems [prob_begin, prob_begin + probs) of the design x batch grid, k in
// chunks of `chunk` terms (`chunks` of them). With part == nullptr (chunks ==
// 1, chunk >= k) the sums go to p.out; else chunk s of problem prob_begin + q
// is written to part + (s * probs + q) * m * n, each summed from +0.
//
// eff_bits / eff_lut (optional, one entry per design): a design whose width-M
// LUT is the exact widening of a width-M' LUT (every entry depends only on the
// top M' bits of both mantissa indices, as multipliers.stack() produces for
// narrower designs in a stack) gives bit-identical products with M' and the
// narrow LUT; the tile path then builds 2^M' tiles instead of 2^M, and the
// gather and permute paths look up the smaller LUT.
struct KSplit {
  int64_t chunk;
  int64_t chunks;
  int64_t prob_begin;
  int64_t probs;
  float* part;
  const int* eff_bits = nullptr;
  const uint32_t* const* eff_lut = nullptr;
  // Optional, one entry per design: the LutFamily (lut_family.h) its LUT
  // equals, checked entry by entry; the gather path then computes that
  // design's entries instead of loading them.
  const int* families = nullptr;
  // Optional, one entry per design (M >= 8, gather path): a 16-bit copy of
  // its LUT (entry >> (23 - M), padded by one entry) for the gathers, or
  // null (the 32-bit LUT).
  const uint16_t* const* lut16 = nullptr;
  // LUT-row streaming on the gather path (Plan::stream): 1 = automatic,
  // 0 = never, 2 = always (cpu_gemm.cc StreamMode: env APPROX_JAX_CPU_STREAM
  // or the harness's g_force_stream).
  int stream_mode = 1;
  // bfloat16 tiles built by byte lookups (AVX-512 VBMI; BuildTilesBf16):
  // cpu_gemm.cc ByteTiles (env APPROX_JAX_CPU_VBMI=0 or the harness's
  // g_force_permute_tiles turn it off). Same tile bits either way.
  bool byte_tiles = true;
  // Four-row 64-bit gathers on the streamed path (kIsaQuadGather; QuadStep):
  // cpu_gemm.cc QuadGathers (env APPROX_JAX_CPU_QUAD=0 or the harness's
  // g_force_row_gathers keep one row per gather). Same products either way.
  bool quad_gathers = true;
  // bfloat16 tiles wherever they are exact (M <= 7, LUT low bits clear):
  // cpu_gemm.cc Bf16Tiles (env APPROX_JAX_CPU_BF16_TILES=0 or the harness's
  // g_force_f32_tiles keep float32 tiles). Same products either way.
  bool bf16_tiles = true;
  // bfloat16 tiles at 4 <= M <= 7 built from a pair table, two mantissa
  // values per gathered word (AVX2; BuildTilesBf16Pairs): cpu_gemm.cc
  // PairTiles (env APPROX_JAX_CPU_PAIR_TILES=0 or the harness's
  // g_force_gather_tiles turn it off). Same tile bits either way.
  bool pair_tiles = true;
  // Permute tiles at M <= 3 (AVX2; MicroPermTile), opt in: cpu_gemm.cc
  // PermTiles (env APPROX_JAX_CPU_PERM_TILES=1 or the harness's
  // g_force_perm_tiles). Same sums either way.
  bool perm_tiles = false;
  // Tile path at width <= 6: split the rows before the columns
  // (cpu_gemm_simd_impl.h RunGemm); env APPROX_JAX_CPU_ROWS_FIRST=0 splits
  // the columns first, as at width 7. Same sums either way.
  bool rows_first = true;
  // Optional, one entry per design: the width its family's closed form holds
  // at (families), when below M for some design (lut_family.h: a narrower
  // family's LUT widened to M). The gather path decomposes and packs that
  // design's operands at that width for the closed form; null: M.
  const int* family_bits = nullptr;
};

// The automatic strategy (before g_force_strategy): expanded tiles pay 2^M
// tile entries per b element, amortised over the rows of a task, so they need
// M <= 7 and enough rows; otherwise LUT gathers (or their closed form).
// (Gathers are slow on current x86 cores with the GDS mitigation, so tiles
// win unless the rows are very few. For M >= 8 expanding 2^M tiles re-reads
// the whole LUT per tile block: measured slower than gathers.)
inline bool PrefersGathers(int64_t m, int mbits) {
  const int64_t usize = int64_t{1} << mbits;
  return mbits > 7 || m < (usize / 4 > 2 ? usize / 4 : 2);
}

// Rows below which the closed form of a cheap family (Mitchell, truncate: a
// few vector operations per 16 products, any M) beats expanded tiles, which
// pay 2^M tile entries per b element amortised over the rows. Measured with
// Mitchell, 2 cores, b 1568x1024 and 1024^3 (GFLOP/s, tiles vs closed form):
// M = 7: 64 rows 12.8 vs 63.6, 256 rows 37 vs 73, 512^3 49 vs 65, 1024^3 70 vs
// 76; M = 6: 64 rows 30 vs 65, 256 rows 65 vs 71, 1024^3 93 vs 78; M = 5:
// 128 rows 72 vs 71, 256 rows 97 vs 72; 8192x576x64 (2048 rows a task) M = 7
// 69 vs 58. (MBM's closed form is 3-4x slower than
// Mitchell's, and its tiles use width M - 1: not a cheap family.)
inline int64_t CheapFamilyRows(int mbits) {
  return mbits > 7 ? INT64_MAX : (int64_t{mbits >= 7 ? 16 : (mbits == 6 ? 8 : 4)} << mbits);
}
inline bool IsCheapFamily(int family) {
  return family == kFamilyMitchell || family == kFamilyTruncate;
}
// Whether every design's family (`families`: one entry per design, or
// nullptr for none) satisfies is_family.
template <class IsFamily>
inline bool EveryDesignFamily(const GemmProblem& p, const int* families, IsFamily is_family) {
  if (families == nullptr) return false;
  for (int64_t d = 0; d < p.designs; ++d)
    if (!is_family(families[d])) return false;
  return true;
}
// Whether p runs the cheap closed forms instead of the tiles: every design a
// cheap family and few rows.
inline bool CheapClosedFormWins(const GemmProblem& p, const int* families) {
  return p.m < CheapFamilyRows(p.mbits) && EveryDesignFamily(p, families, IsCheapFamily);
}

// On the AVX2 unit (8 lanes, a 3-row tile kernel), at M = 7 with fewer than
// 2^M rows, the closed forms beat the tiles for MBM as well (which runs its
// tiles one bit narrower, but builds 64 of them per b element for few rows
// to share). Zen 3, harness, 2 threads, mbm7, ms, tiles vs closed form:
// 64x1024x10 0.55 vs 0.21, 128x1024x10 0.57 vs 0.36, 64^3 0.050 vs 0.037,
// 96^3 0.13 vs 0.09, 64x256x64 0.15 vs 0.10, 128^3 0.19 vs 0.18; from 256
// rows even (256x1024x10 0.70 vs 0.68). A problem that runs transposed
// (PrefersTransposed: many columns) is planned at its transposed rows,
// where the tiles stay (64x1568x1024 transposed tiles 7.7-8.1 vs 9.5-10.6).
// Every design must have a closed form (a stack may mix MBM with Mitchell
// and truncate).
inline bool Avx2ClosedFormsWin(const GemmProblem& p, const int* families) {
  return p.mbits == 7 && p.m < (int64_t{1} << p.mbits) &&
         EveryDesignFamily(p, families, [](int f) { return f == kFamilyMbm || IsCheapFamily(f); });
}

// The direct kernel (cpu_gemm_simd_impl.h RunDirect) computes each product
// from the two operands' bits, with no per-element preparation of b to
// amortise: it wins with one or two rows. Measured (harness, one thread, MBM
// LUTs, ms, direct vs the gather / tile paths): 1x1024x4096 M = 3 3.5 vs 5.7,
// M = 7 4.1 vs 7.8, M = 11 5.6 vs 10.1; at 4 rows it loses (M = 7 10.9 vs 6.6,
// M = 3 13.3 vs 5.7). (A variant with a's rows in the lanes for one to four
// columns measured no faster than the tiles at one column and slower at four.)
constexpr int64_t kDirectMaxRows = 2;
// A task's output block (rows x columns, summed in memory) stays within this
// many floats (16 KB, in L1), and is at least kDirectMinCols wide.
constexpr int64_t kDirectBlockFloats = 4096;
constexpr int64_t kDirectMinCols = 64;
inline bool PrefersDirect(const GemmProblem& p) {
  if (p.implicit_a != nullptr) return false;  // (a conv's patch matrix: the tile paths)
  if (g_force_strategy != 0) return g_force_strategy == 3;
  return p.m <= kDirectMaxRows;
}

enum SimdStatus : int { kSimdOk = 0, kSimdNoMemory = 1, kSimdDeclined = 2 };

// Return kSimdDeclined when they do not handle the problem (the caller then
// runs the scalar kernel), kSimdNoMemory when scratch allocation failed.
int GemmAvx512(const GemmProblem& p, const KSplit& ks, const Runner& runner);
int GemmAvx2(const GemmProblem& p, const KSplit& ks, const Runner& runner);

}  // namespace gemm_internal
}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_CPU_GEMM_SIMD_H_
