// CPU approximate GEMM: dispatches to the vectorised kernels (AVX-512 or AVX2,
// chosen at run time; see cpu_gemm_simd_impl.h) and keeps a portable scalar
// kernel for other CPUs and for LUTs the fast paths decline.
//
// Every path sums each output element sequentially over k in ascending order
// starting from +0 (the naive kernel's order), and every product is exactly
// ApproxMulBits: results are bit-identical across paths, blockings and thread
// counts.
#include "cpu_gemm.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <thread>
#include <vector>

#include "approx_math.h"
#include "cpu_gemm_simd.h"
#include "cpu_gemm_split.h"

namespace approx_jax {
namespace gemm_internal {

int g_force_strategy = 0;
int g_force_isa = 0;
int64_t g_tile_budget = 0;
int64_t g_pack_budget = 0;
int g_no_design_sharing = 0;
int g_force_width = 0;
int g_force_f32_tiles = 0;
int g_no_c_prefetch = 0;
int g_force_stream = 0;
int g_force_plain_t = 0;
int g_force_permute_tiles = 0;
int g_force_row_gathers = 0;
int g_force_gather_tiles = 0;
int g_force_perm_tiles = 0;
int64_t g_stream_plans = 0;
int64_t g_plain_t_runs = 0;
int64_t g_matvec_runs = 0;
int g_stream_min_bits = 10;
int g_min_rows_mul = 4;

namespace {

struct ScratchSet {
  void* ptr[kScratchSlots] = {};
  size_t size[kScratchSlots] = {};
  ~ScratchSet() {
    for (void* p : ptr) std::free(p);
  }
};

thread_local ScratchSet t_scratch;

}  // namespace

void* ThreadScratch(int slot, size_t bytes) {
  ScratchSet& s = t_scratch;
  if (bytes == 0) bytes = 64;
  if (s.size[slot] >= bytes) return s.ptr[slot];
  std::free(s.ptr[slot]);
  s.ptr[slot] = nullptr;
  s.size[slot] = 0;
  // Round up (aligned_alloc wants a multiple of the alignment) and leave room
  // for vector over-reads of padded buffers.
  const size_t rounded = (bytes + 64 + 4095) & ~static_cast<size_t>(4095);
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) return nullptr;
  s.ptr[slot] = p;
  s.size[slot] = rounded - 64;
  return p;
}

int HardwareThreads() {
  static const int n = [] {
    unsigned h = std::thread::hardware_concurrency();
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
      h = static_cast<unsigned>(CPU_COUNT(&set));  // respects taskset/cgroups cpusets
#endif
    return h == 0 ? 1 : static_cast<int>(std::min(h, 256u));
  }();
  return n;
}

size_t L2CacheBytes() {
  static const size_t n = [] {
    long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (v < (64 << 10) || v > (64 << 20)) v = 1 << 20;
    return static_cast<size_t>(v);
  }();
  return n;
}

}  // namespace gemm_internal

namespace {

// Portable kernel: per output row, k ascending, row of accumulators; rows of
// problems [ks.prob_begin, +ks.probs), k chunk by k chunk (see KSplit).
void ScalarGemm(const GemmProblem& p, const gemm_internal::KSplit& ks,
                const ParallelFor& parallel_for) {
  const int64_t rows = ks.probs * p.m;
  constexpr int64_t kRowsPerTask = 8;
  const int64_t row_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(row_tasks * ks.chunks, [&](int64_t task) {
    const int64_t chunk = task / row_tasks;
    const int64_t rt = task % row_tasks;
    const int64_t kbeg = chunk * ks.chunk;
    const int64_t kend = std::min(p.k, kbeg + ks.chunk);
    const int64_t row_end = std::min(rows, (rt + 1) * kRowsPerTask);
    for (int64_t row = rt * kRowsPerTask; row < row_end; ++row) {
      const int64_t i = row % p.m;
      const int64_t db = ks.prob_begin + row / p.m;
      const int64_t bi = db % p.batch;
      const int64_t d = db / p.batch;
      const uint32_t* a_row = reinterpret_cast<const uint32_t*>(p.a + d * p.a_design_stride +
                                                                bi * p.a_batch_stride + i * p.k);
      const uint32_t* b_mat =
          reinterpret_cast<const uint32_t*>(p.b + d * p.b_design_stride + bi * p.b_batch_stride);
      const uint32_t* lut = p.lut + d * p.lut_design_stride;
      float* out_row =
          ks.part == nullptr ? p.out + (db * p.m + i) * p.n : ks.part + (chunk * rows + row) * p.n;
      std::fill(out_row, out_row + p.n, 0.0f);
      for (int64_t kk = kbeg; kk < kend; ++kk) {
        const uint32_t av = a_row[kk];
        if (p.b_plain_ld > 0) {  // b stored transposed (GemmProblem::b_plain_ld)
          for (int64_t j = 0; j < p.n; ++j)
            out_row[j] += BitsFloat(ApproxMulBits(av, b_mat[j * p.b_plain_ld + kk], lut, p.mbits));
          continue;
        }
        const uint32_t* b_row = b_mat + kk * p.n;
        for (int64_t j = 0; j < p.n; ++j) {
          out_row[j] += BitsFloat(ApproxMulBits(av, b_row[j], lut, p.mbits));
        }
      }
    }
  });
}

struct RunnerCtx {
  const ParallelFor* pf;
};

void RunViaParallelFor(void* ctx, int64_t num_tasks, gemm_internal::TaskFn fn, void* arg) {
  const ParallelFor& pf = *static_cast<RunnerCtx*>(ctx)->pf;
  pf(num_tasks, [fn, arg](int64_t t) { fn(arg, t); });
}

int BestIsa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return 3;
    // (The AVX2 unit also uses FMA: cpu_gemm_avx2.cc.)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
    return 1;
  }();
  return isa;
#else
  return 1;
#endif
}

// p with its implicit patch matrix (GemmProblem::implicit_a) materialised in
// `store`, for the scalar kernel, which reads a directly.
GemmProblem WithMaterialisedA(const GemmProblem& p, std::vector<float>* store,
                              const ParallelFor& parallel_for) {
  const int64_t nd = p.a_design_stride != 0 ? p.designs : 1;
  const int64_t nb = p.a_batch_stride != 0 ? p.batch : 1;
  const int64_t block = p.m * p.k;
  store->resize(static_cast<size_t>(nd * nb * block));
  constexpr int64_t kRows = 64;
  const int64_t row_tasks = (p.m + kRows - 1) / kRows;
  parallel_for(nd * nb * row_tasks, [&](int64_t t) {
    const int64_t db = t / row_tasks, i0 = (t % row_tasks) * kRows;
    const float* x = p.a + (db / nb) * p.a_design_stride + (db % nb) * p.a_batch_stride;
    GatherImplicitA(*p.implicit_a, x, i0, static_cast<int>(std::min(kRows, p.m - i0)), 0,
                    static_cast<int>(p.k), store->data() + db * block + i0 * p.k, p.k);
  });
  GemmProblem q = p;
  q.a = store->data();
  q.implicit_a = nullptr;
  q.a_design_stride = p.a_design_stride != 0 ? nb * block : 0;
  q.a_batch_stride = p.a_batch_stride != 0 ? block : 0;
  return q;
}

// The instruction set the kernels run: the best this CPU has, capped by env
// APPROX_JAX_CPU_ISA (1 scalar, 2 AVX2, 3 AVX-512), so that an AVX-512
// machine can run (and its tests check) the AVX2 unit, or by the harness.
int ChosenIsa() {
  int isa = BestIsa();
  if (const char* e = std::getenv("APPROX_JAX_CPU_ISA"))
    if (std::atoi(e) >= 1) isa = std::min(isa, std::atoi(e));
  if (gemm_internal::g_force_isa > 0) isa = std::min(isa, gemm_internal::g_force_isa);
  return isa;
}

// Runs the best kernel on the part of the problem `ks` names.
int RunPart(const GemmProblem& p, const gemm_internal::KSplit& ks,
            const ParallelFor& parallel_for) {
  const int isa = ChosenIsa();
  RunnerCtx rctx{&parallel_for};
  const gemm_internal::Runner runner{&rctx, &RunViaParallelFor};
  int status = gemm_internal::kSimdDeclined;
  if (isa >= 3) {
    status = gemm_internal::GemmAvx512(p, ks, runner);
  } else if (isa == 2) {
    status = gemm_internal::GemmAvx2(p, ks, runner);
  }
  if (status == gemm_internal::kSimdDeclined) {
    if (p.implicit_a != nullptr) {
      std::vector<float> patches;
      ScalarGemm(WithMaterialisedA(p, &patches, parallel_for), ks, parallel_for);
    } else {
      ScalarGemm(p, ks, parallel_for);
    }
    status = gemm_internal::kSimdOk;
  }
  return status;
}

// Split-K partials of one group of problems live in one buffer of at most
// this many floats (problems are processed in groups; never changes bits).
constexpr int64_t kSplitScratchFloats = int64_t{16} << 20;  // 64 MiB

// Distinct LUTs of a problem (a zero design stride shares one).
int64_t DistinctLuts(const GemmProblem& p) { return p.lut_design_stride == 0 ? 1 : p.designs; }

// Whether every distinct LUT of p has known facts.
bool AllLutFactsKnown(const GemmProblem& p) {
  for (int64_t d = 0; d < DistinctLuts(p); ++d)
    if (LutFactsAt(p, d) == kLutFactsUnknown) return false;
  return true;
}

// Products a problem computes: the measure of work the size rules compare.
double ProductCount(const GemmProblem& p) {
  return static_cast<double>(p.designs * p.batch) * p.m * p.n * p.k;
}

// An env knob of the automatic choices: 0 = never, 2 = always (tests),
// unset or anything else = automatic (1).
int EnvMode(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr ? std::atoi(e) : 1;
}

// Effective widths (see KSplit::eff_bits): per design the smallest M' whose
// widening is the LUT, and the narrow LUT. Only for the tile path (M <= 7).
struct EffectiveWidths {
  std::vector<int> bits;
  std::vector<const uint32_t*> luts;
  std::vector<std::vector<uint32_t>> storage;
};

// Whether every entry of the width-m LUT depends only on the top m - s bits of
// both indices, i.e. lut[u][v] == lut[u & ~low][v & ~low]: each row u equals
// row u & ~low, and those rows are constant over each aligned run of 2^s
// entries. Checked that way, row by row, with plain loops the compiler
// vectorises (the entry-by-entry form, a dependent load per entry, was 14% of
// a stack of 8 designs' 64x100x10 GEMM, run once per call and width).
// WidenedRowDiff is row u's part (nonzero where it fails; low = 2^s - 1).
uint32_t WidenedRowDiff(const uint32_t* lut, int m, uint32_t u, uint32_t low) {
  const uint32_t n = 1u << m;
  const uint32_t* row = lut + (size_t{u} << m);
  uint32_t diff = 0;
  if (u & low) {
    const uint32_t* base = lut + (size_t{u & ~low} << m);
    for (uint32_t v = 0; v < n; ++v) diff |= row[v] ^ base[v];
  } else {
    // (A mask rather than a branch, so that this loop vectorises too.)
    for (uint32_t v = 1; v < n; ++v) diff |= (row[v] ^ row[v - 1]) & (0u - ((v & low) != 0));
  }
  return diff;
}

bool WidenedBy(const uint32_t* lut, int m, int s) {
  const uint32_t low = (1u << s) - 1u;
  for (uint32_t u = 0; u < (1u << m); ++u)
    if (WidenedRowDiff(lut, m, u, low) != 0) return false;
  return true;
}

bool ComputeEffectiveWidths(const GemmProblem& p, EffectiveWidths* ew) {
  if (p.mbits > 7 || p.mbits < 2 || p.k == 0) return false;
  const int64_t luts = DistinctLuts(p);
  std::vector<int> bits(luts);
  bool any = false;
  for (int64_t d = 0; d < luts; ++d) {
    const uint32_t* l = p.lut + d * p.lut_design_stride;
    int s = 0;
    while (p.mbits - (s + 1) >= kMinMantissaBits && WidenedBy(l, p.mbits, s + 1)) ++s;
    bits[d] = p.mbits - s;
    any = any || s > 0;
  }
  if (!any) return false;
  ew->bits.resize(p.designs);
  ew->luts.resize(p.designs);
  ew->storage.resize(luts);
  for (int64_t d = 0; d < luts; ++d) {
    const uint32_t* l = p.lut + d * p.lut_design_stride;
    std::vector<uint32_t>& narrow = ew->storage[d];
    narrow.resize(size_t{1} << (2 * bits[d]));
    NarrowLut(l, p.mbits, p.mbits - bits[d], narrow.data());
  }
  for (int64_t d = 0; d < p.designs; ++d) {
    const int64_t src = p.lut_design_stride == 0 ? 0 : d;
    ew->bits[d] = bits[src];
    ew->luts[d] = ew->storage[src].data();
  }
  return true;
}

// Whether `work` products pay for one pass over each of `luts` LUTs of
// width m (the closed-form check, the 16-bit copy): at most 4^m entries each,
// read at memory speed (0.6 ms at M = 11), while a gather from an M = 11 LUT
// costs ~3 ns a product. Measured (2 cores, MBM, ms, gathers vs check +
// closed form): M = 11 16x64x64 0.78 vs 1.33, 32x128x128 1.40 vs 1.31,
// 64x256x256 6.5 vs 1.4; M = 9 16x64x64 0.055 vs 0.064, 32x128x128 0.16 vs
// 0.095. (The bound was 4 * 4^m before the check ran at memory speed: an
// mbm11 256x248x256 GEMM took 86x native, 256^3 7x.)
bool WorkPaysForLutPass(double work, int64_t luts, int mbits) {
  return 4.0 * work >= static_cast<double>(luts) * static_cast<double>(int64_t{1} << (2 * mbits));
}

// LutIs with the rows split over the threads (a mismatch usually shows in
// row 0, checked first), for LutFamilyBy.
template <int kFamily>
bool LutIsParallel(const uint32_t* lut, int m, const ParallelFor& parallel_for) {
  const uint32_t n = 1u << m;
  if (!LutIs<kFamily>(lut, m, 0, 1)) return false;
  const uint32_t rows_per = std::max(1u, n / 8);
  std::atomic<bool> ok{true};
  parallel_for((n - 1 + rows_per - 1) / rows_per, [&](int64_t t) {
    const uint32_t r0 = 1 + static_cast<uint32_t>(t) * rows_per;
    if (ok.load(std::memory_order_relaxed) && !LutIs<kFamily>(lut, m, r0, r0 + rows_per))
      ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// WidenedBy with the rows split over the threads.
bool WidenedByParallel(const uint32_t* lut, int m, int s, const ParallelFor& parallel_for) {
  const uint32_t n = 1u << m, low = (1u << s) - 1u;
  // Row 0 first (a LUT that is not widened differs there, mostly).
  if (WidenedRowDiff(lut, m, 0, low) != 0) return false;
  const uint32_t rows_per = std::max(1u, n / 16);
  std::atomic<bool> ok{true};
  parallel_for((n + rows_per - 1) / rows_per, [&](int64_t t) {
    const uint32_t u0 = static_cast<uint32_t>(t) * rows_per, u1 = std::min(n, u0 + rows_per);
    for (uint32_t u = u0; u < u1 && ok.load(std::memory_order_relaxed); ++u)
      if (WidenedRowDiff(lut, m, u, low) != 0) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// The narrowing facts (lut_family.h) of a kernel-format width-m LUT that is
// no family's at width m: for the smallest s whose widening it is and whose
// width m - s LUT is a family's, that family | s << kLutFactsNarrowingShift;
// else 0. (mbm10 widened to 11 is MBM's at width 10; MBM ignores each
// index's lowest bit, so it is also widened from width 9, where it is no
// family's.)
int32_t NarrowFamily(const uint32_t* lut, int m, const ParallelFor& parallel_for) {
  std::vector<uint32_t> narrow;
  for (int s = 1; m - s >= kMinMantissaBits && WidenedByParallel(lut, m, s, parallel_for); ++s) {
    const int w = m - s;
    narrow.resize(size_t{1} << (2 * w));
    NarrowLut(lut, m, s, narrow.data());
    const int family = LutFamilyOf(narrow.data(), w);
    if (family != kFamilyNone) return family | (s << kLutFactsNarrowingShift);
  }
  return 0;
}

// Each design's family and width from its facts word (lut_family.h: the
// family, at width M - s for a narrowing s; none where that width is below
// the family's). Widths only when some design is narrowed. Returns false
// when no design has a family.
bool FamiliesFromFacts(const std::vector<int32_t>& facts, int mbits, std::vector<int>* families,
                       std::vector<int>* widths) {
  families->assign(facts.size(), kFamilyNone);
  std::vector<int> width(facts.size(), mbits);
  bool any = false, narrowed = false;
  for (size_t d = 0; d < facts.size(); ++d) {
    const int w = mbits - ((facts[d] >> kLutFactsNarrowingShift) & kLutFactsNarrowingMask);
    int f = facts[d] & kLutFactsFamilyMask;
    if (w < kMinMantissaBits || (f == kFamilyMbm && w < kMbmMinBits)) f = kFamilyNone;
    (*families)[d] = f;
    width[d] = f == kFamilyNone ? mbits : w;
    any = any || f != kFamilyNone;
    narrowed = narrowed || width[d] != mbits;
  }
  if (narrowed) *widths = std::move(width);
  return any;
}

// Closed-form LUT families (lut_family.h) for the gather path, per design
// (a stack may mix families). Env knob APPROX_JAX_CPU_FORMULA: 0 = never,
// 2 = whenever a LUT matches (tests), otherwise (default) when the gather
// path is likely and the work pays for the entry-by-entry check
// (WorkPaysForLutPass). Returns false when no design has one.
bool DesignFamilies(const GemmProblem& p, const ParallelFor& parallel_for,
                    std::vector<int>* families, std::vector<int>* widths) {
  widths->clear();
  const int mode = EnvMode("APPROX_JAX_CPU_FORMULA");
  if (mode == 0) return false;
  // The closed form is used on the gather path, or instead of the tiles when
  // every design is a cheap family and the rows are few (cpu_gemm_simd.h).
  const bool gathers =
      gemm_internal::PrefersGathers(p.m, p.mbits) || p.m < gemm_internal::CheapFamilyRows(p.mbits);
  const int64_t luts = DistinctLuts(p);
  // (MBM's closed form holds from kMbmMinBits on; a hint below is not used.)
  if (p.family_hint >= 0 && luts == 1 && (p.family_hint != kFamilyMbm || p.mbits >= kMbmMinBits)) {
    // The caller checked the LUT (GemmProblem::family_hint): no entry-by-entry
    // pass, so the closed form pays whatever the work.
    if (p.family_hint == kFamilyNone || (mode != 2 && !gathers)) return false;
    families->assign(static_cast<size_t>(p.designs), p.family_hint);
    return true;
  }
  // Per design a facts word (lut_family.h): the step's LUT facts, or the
  // kernel's own check below.
  std::vector<int32_t> facts(static_cast<size_t>(p.designs), 0);
  if (p.family_hint < 0 && AllLutFactsKnown(p)) {
    // Checked once for the whole step (GemmProblem::lut_facts): as a hint,
    // the closed form pays whatever the work.
    if (mode != 2 && !gathers) return false;
    for (int64_t d = 0; d < p.designs; ++d) facts[static_cast<size_t>(d)] = LutFactsAt(p, d);
    return FamiliesFromFacts(facts, p.mbits, families, widths);
  }
  const double work = ProductCount(p);
  if (mode != 2 && (!gathers || !WorkPaysForLutPass(work, luts, p.mbits))) {
    return false;
  }
  for (int64_t d = 0; d < luts; ++d) {
    // Measured (2 cores, ms, gathers vs MBM's four-operation closed form):
    // 25x50176x32 M = 7 3.0 vs 2.5, M = 8 7.5 vs 2.4; 16x1024x1024 M = 7
    // 1.17 vs 0.99; 1024^3 M = 11 ~1400 vs 42.
    const uint32_t* lut = p.lut + d * p.lut_design_stride;
    int32_t word = LutFamilyBy(p.mbits, [&](auto family) {
      return LutIsParallel<decltype(family)::value>(lut, p.mbits, parallel_for);
    });
    if (word == kFamilyNone && p.mbits >= 8) {
      // A built-in that a stack widened (mbm8 in a stack of 9): its closed
      // form at its own width, as the LUT facts give it from M = 10 on
      // (ffi.LUT_FACTS_MIN_BITS); below M = 8 the effective widths narrow
      // it. A family's narrow entries are exactly in kernel format, so a
      // match needs no format check first.
      word = NarrowFamily(lut, p.mbits, parallel_for);
    }
    if (luts == 1) {
      facts.assign(static_cast<size_t>(p.designs), word);
    } else {
      facts[static_cast<size_t>(d)] = word;
    }
  }
  return FamiliesFromFacts(facts, p.mbits, families, widths);
}

// 16-bit copies of the LUTs that the gather kernel reads (KSplit::lut16).
// Above M = 8 the 32-bit LUT outgrows the L2 cache (4 MiB at M = 10, 16 MiB
// at M = 11) and every gather lane misses; the copy halves that. A
// kernel-format entry (c << 23) | (r << (23 - M)) is (entry >> (23 - M)) <<
// (23 - M) when its bits below r are clear and it is below 2^24 (checked:
// otherwise that design keeps its 32-bit LUT), and that fits 16 bits for
// M <= 11: the same entries, the same bits. Measured (one core, random
// 16-lane lookups, G lookups/s, 32 vs 16 bits): M = 9 3.6 vs 4.2, M = 10 0.79
// vs 2.2, M = 11 0.37 vs 0.59. Env knob APPROX_JAX_CPU_LUT16: 0 = never,
// 2 = whenever the gathers run at M >= 8 (tests), otherwise (default) also
// only when the work pays for the copy (WorkPaysForLutPass).
struct CompactLuts {
  std::vector<std::vector<uint16_t>> storage;
  std::vector<const uint16_t*> per_design;
};

// Kept per calling thread between calls, like the transposed operands: an
// M = 11 copy is 8 MiB, and a fresh one per call page-faults every time.
CompactLuts& ThreadCompactLuts() {
  static thread_local CompactLuts store;
  return store;
}

bool MakeCompactLuts(const GemmProblem& p, const int* families, const ParallelFor& parallel_for,
                     CompactLuts* out) {
  const int mode = EnvMode("APPROX_JAX_CPU_LUT16");
  if (mode == 0 || p.mbits < 8 || p.mbits > 11 || p.k == 0) return false;
  const int64_t luts = DistinctLuts(p);
  const int64_t entries = int64_t{1} << (2 * p.mbits);
  const double work = ProductCount(p);
  // (A copy writes as well as reads: 16x the check's bound.)
  if (mode != 2 && !WorkPaysForLutPass(work / 16.0, luts, p.mbits)) return false;
  const int sh = 23 - p.mbits;
  const uint32_t low_mask = (1u << sh) - 1u;
  if (static_cast<int64_t>(out->storage.size()) < luts)
    out->storage.resize(static_cast<size_t>(luts));
  std::vector<const uint16_t*> compact(static_cast<size_t>(luts), nullptr);
  bool any = false;
  for (int64_t d = 0; d < luts; ++d) {
    // A design computed in closed form never gathers.
    if (families != nullptr && families[d] != kFamilyNone) continue;
    const uint32_t* src = p.lut + d * p.lut_design_stride;
    std::vector<uint16_t>& dst = out->storage[static_cast<size_t>(d)];
    try {
      dst.resize(static_cast<size_t>(entries) + 1);  // + 1: the last lane's 4-byte read
    } catch (const std::bad_alloc&) {
      continue;  // this design keeps its 32-bit LUT
    }
    constexpr int64_t kBlock = int64_t{1} << 16;
    std::atomic<bool> ok{true};
    parallel_for((entries + kBlock - 1) / kBlock, [&](int64_t t) {
      const int64_t e0 = t * kBlock, e1 = std::min(entries, e0 + kBlock);
      uint32_t bad = 0;
      for (int64_t e = e0; e < e1; ++e) {
        const uint32_t v = src[e];
        bad |= (v & low_mask) | (v >> 24);
        dst[static_cast<size_t>(e)] = static_cast<uint16_t>(v >> sh);
      }
      if (bad != 0) ok.store(false, std::memory_order_relaxed);
    });
    dst[static_cast<size_t>(entries)] = 0;
    if (!ok.load()) continue;
    compact[static_cast<size_t>(d)] = dst.data();
    any = true;
  }
  if (!any) return false;
  out->per_design.resize(static_cast<size_t>(p.designs));
  for (int64_t d = 0; d < p.designs; ++d)
    out->per_design[static_cast<size_t>(d)] = compact[static_cast<size_t>(luts == 1 ? 0 : d)];
  return true;
}

// dst[c * rows + r] = src[r * ld + c] for r < rows, c < cols. 16 x 16 blocks
// go through a small buffer so that both the reads and the writes are runs of
// 16 floats (one cache line): element-wise strided writes collide in the same
// cache sets when rows is a power of two (measured 3x slower at 1024^2).
// Row strips are spread over the threads.
// (Also used for LUTs: elements are only copied, so any 32-bit type's bits
// are kept.)
template <typename T>
void Transpose(const T* src, int64_t rows, int64_t cols, int64_t ld, T* dst,
               const ParallelFor& parallel_for) {
  constexpr int64_t kBlock = 16;
  const int64_t strips = (rows + kBlock - 1) / kBlock;
  const int64_t per_task =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols * kBlock, 1));
  parallel_for((strips + per_task - 1) / per_task, [&](int64_t t) {
    T tile[kBlock][kBlock];
    for (int64_t strip = t * per_task; strip < std::min(strips, (t + 1) * per_task); ++strip) {
      const int64_t r0 = strip * kBlock, r1 = std::min(rows, r0 + kBlock);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t c1 = std::min(cols, c0 + kBlock);
        if (r1 - r0 == kBlock && c1 - c0 == kBlock) {
          for (int64_t r = 0; r < kBlock; ++r)
            for (int64_t c = 0; c < kBlock; ++c) tile[c][r] = src[(r0 + r) * ld + c0 + c];
          for (int64_t c = 0; c < kBlock; ++c)
            for (int64_t r = 0; r < kBlock; ++r) dst[(c0 + c) * rows + r0 + r] = tile[c][r];
        } else {
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t c = c0; c < c1; ++c) dst[c * rows + r] = src[r * ld + c];
        }
      }
    }
  });
}

// A buffer of at least `count` elements kept per thread between calls (the
// transposed operands of a layer's GEMM are the same size every step: no
// page faults or zero-filling per call).
template <typename T>
T* ReusedBuffer(std::vector<T>& store, int64_t count) {
  if (static_cast<int64_t>(store.size()) < count) store.resize(static_cast<size_t>(count));
  return store.data();
}

// The transposed formulation: out^T = b^T (x) a^T under the transposed LUT
// lut^T[(v << M) | u] = lut[(u << M) | v]. ApproxMulBits is symmetric in its
// operands apart from the LUT index (the special cases and the sign, exponent
// and canonical NaN are), so every product has the same bits; each output
// element is still summed over k ascending, with the same split-K chunks
// (split_k.h looks at m * n only): bit-identical results.
//
// It pays when the tile path's expansion dominates: 2^M' tile entries (M' =
// the effective width) are built per b element and amortised over the m
// rows, so few rows and many columns are the bad case and the transposed
// problem the good one, once the saving beats the cost of transposing b.
// Measured (2 cores, random LUT, ms, direct vs transposed incl. the
// transposes): 64x1568x1024 M=7 16.7 vs 6.6, M=6 7.1 vs 5.5, M=5 4.2 vs 4.1;
// 16x1024x1024 M=6 3.5 vs 2.4. Not used where the direct problem runs
// gathers (few rows: about even with transposed tiles), nor where the closed
// form of a cheap family runs (its speed does not depend on the rows), nor
// for M >= 8 (no tiles).
//
// The transposed copies (distinct a and b blocks, out^T) are kept per thread
// between calls (a layer's GEMM has the same shapes every step), so they are
// capped: larger problems run directly.
constexpr double kTransposedBytesMax = double{32 << 20};
// Streaming gathers gain 3-5x from the transposed problem (M = 11, 12544x800x32,
// a LeNet-5 conv: 403-426 ms direct, 82-118 ms transposed before the
// transposes), so they take it for larger problems too, in storage freed
// after the call.
constexpr double kTransposedStreamBytesMax = double{256 << 20};

// How many distinct [rows, cols] blocks an operand with these strides has
// over the design x batch grid (a zero stride shares one block).
int64_t DistinctBlocks(const GemmProblem& p, int64_t design_stride, int64_t batch_stride) {
  return (design_stride != 0 ? p.designs : 1) * (batch_stride != 0 ? p.batch : 1);
}

// Bytes of the transposed copies GemmTransposed makes of p (the distinct a and
// b blocks, and out^T).
double TransposedCopyBytes(const GemmProblem& p) {
  return 4.0 *
         (static_cast<double>(DistinctBlocks(p, p.a_design_stride, p.a_batch_stride)) * p.m * p.k +
          static_cast<double>(DistinctBlocks(p, p.b_design_stride, p.b_batch_stride)) * p.k * p.n +
          static_cast<double>(p.designs * p.batch) * p.m * p.n);
}

// The LUT-row streaming mode of a call, in KSplit::stream_mode's terms
// (0 never, 1 automatic, 2 always): the harness override g_force_stream
// (0 none, 1 never, 2 always), else APPROX_JAX_CPU_STREAM.
int StreamMode() {
  if (gemm_internal::g_force_stream == 1) return 0;
  if (gemm_internal::g_force_stream == 2) return 2;
  return EnvMode("APPROX_JAX_CPU_STREAM");
}

// How GemmTransposed reads b^T (0 a transposed copy, 1 automatic, 2 in
// place): the harness override g_force_plain_t (0 none, 1 copy, 2 in place),
// else APPROX_JAX_CPU_PLAIN_T.
int PlainTransposeMode() {
  if (gemm_internal::g_force_plain_t == 1) return 0;
  if (gemm_internal::g_force_plain_t == 2) return 2;
  return EnvMode("APPROX_JAX_CPU_PLAIN_T");
}

// Whether the bfloat16 tiles are built by byte lookups (KSplit::byte_tiles;
// the ISA unit also needs AVX-512 VBMI): not with APPROX_JAX_CPU_VBMI=0 or
// the harness's g_force_permute_tiles.
bool ByteTiles() {
  if (gemm_internal::g_force_permute_tiles != 0) return false;
  return EnvMode("APPROX_JAX_CPU_VBMI") != 0;
}

// Whether the streamed gathers read four rows' LUT entries per 64-bit lane
// (KSplit::quad_gathers): not with APPROX_JAX_CPU_QUAD=0 or the harness's
// g_force_row_gathers.
bool QuadGathers() {
  if (gemm_internal::g_force_row_gathers != 0) return false;
  return EnvMode("APPROX_JAX_CPU_QUAD") != 0;
}

// Whether the AVX2 bfloat16 tiles are built from pair tables
// (KSplit::pair_tiles): not with APPROX_JAX_CPU_PAIR_TILES=0 or the
// harness's g_force_gather_tiles.
bool PairTiles() {
  if (gemm_internal::g_force_gather_tiles != 0) return false;
  return EnvMode("APPROX_JAX_CPU_PAIR_TILES") != 0;
}

// Whether M <= 3 runs the AVX2 permute tiles (KSplit::perm_tiles): opt in,
// with APPROX_JAX_CPU_PERM_TILES=1 or the harness's g_force_perm_tiles.
bool PermTiles() {
  if (gemm_internal::g_force_perm_tiles != 0) return true;
  const char* e = std::getenv("APPROX_JAX_CPU_PERM_TILES");
  return e != nullptr && std::atoi(e) == 1;
}

// Whether the tile path may use bfloat16 tiles (KSplit::bf16_tiles): not
// with APPROX_JAX_CPU_BF16_TILES=0 or the harness's g_force_f32_tiles.
bool Bf16Tiles() {
  if (gemm_internal::g_force_f32_tiles != 0) return false;
  return EnvMode("APPROX_JAX_CPU_BF16_TILES") != 0;
}

// The gathers from a LUT beyond L2 (M >= g_stream_min_bits, a design with no
// closed form) stream each (row, k) pair's LUT row across the columns of a
// task (cpu_gemm_simd_impl.h, Plan::stream), so they want many columns: with
// few columns and many rows, the transposed problem streams each (k, column)
// pair's row of lut^T across the rows instead (an implicit patch matrix is
// gathered transposed). It pays from about 4 products per LUT entry
// transposed (a gather from L3 costs several times a streamed one). Measured
// (2 cores, random LUT, ms): M = 11 8192x576x64 direct 262-293 vs
// 64x576x8192 85-93 before the transposes; M = 10 78-143 vs 58-67.
// (Automatic streaming only: forced streaming runs the direct problem.)
bool PrefersTransposedStream(const GemmProblem& p, const int* families, const int* eff_bits,
                             int stream_mode) {
  if (stream_mode != 1) return false;
  // (From M = 8 where the four-row gathers will stream: StreamsLutRows. The
  // work bound below is also the one that pays for their 16-bit LUT copy.)
  const int min_bits = gemm_internal::StreamMinBits(ChosenIsa() >= 3 && QuadGathers());
  if (p.mbits < min_bits || p.k == 0 || p.n > 2 * 64 || p.m < 8 * p.n) return false;
  bool gathers = false;
  for (int64_t d = 0; d < p.designs; ++d)
    gathers = gathers || ((families == nullptr || families[d] == kFamilyNone) &&
                          (eff_bits == nullptr || eff_bits[d] >= min_bits));
  const int64_t luts = DistinctLuts(p);
  if (!gathers || ProductCount(p) < 4.0 * luts * static_cast<double>(int64_t{1} << (2 * p.mbits)))
    return false;
  return TransposedCopyBytes(p) <= kTransposedStreamBytesMax;
}

// A matrix-vector product (one or two columns, many rows): the tile and
// gather paths fill one or two of a vector's lanes, while its transposed
// problem has one or two rows, which the direct kernel runs with the
// matrix's rows in the lanes, reading the matrix in place
// (GemmProblem::b_plain_ld). For 6 <= M <= 8: below, the tiles are cheap
// (mbm3 ran 1.3-1.5x slower this way); above, the LUT (transposed per call)
// is 1-16 MB. Zen 4, in one process, 9 rounds, ms, before vs after: mbm7
// 1024x1024x1 1.24 vs 0.90, 4096x1024x1 5.3 vs 4.6, 64x6000x1 1.04 vs 0.51;
// random8 1024x1024x1 5.9 vs 1.6, 4096x1024x1 22.8 vs 4.6.
// APPROX_JAX_CPU_MATVEC=0 turns it off.
bool PrefersTransposedDirect(const GemmProblem& p) {
  if (gemm_internal::g_force_strategy != 0 || p.implicit_a != nullptr || p.b_plain_ld != 0)
    return false;
  if (p.n > gemm_internal::kDirectMaxRows || p.m <= 8 * gemm_internal::kDirectMaxRows || p.k == 0 ||
      p.mbits < 6 || p.mbits > 8)
    return false;
  return EnvMode("APPROX_JAX_CPU_MATVEC") != 0;
}

bool PrefersTransposed(const GemmProblem& p, int eff_bits, bool cheap_closed_form) {
  if (p.mbits > 7 || eff_bits < 6 || cheap_closed_form || p.k == 0) return false;
  if (gemm_internal::PrefersGathers(p.m, p.mbits)) return false;
  if (p.m >= (int64_t{2} << eff_bits) || p.n < 4 * p.m) return false;
  return TransposedCopyBytes(p) <= kTransposedBytesMax;
}

std::string GemmDirect(const GemmProblem& p, const ParallelFor& parallel_for, bool may_transpose);

// dst[c * rows + r] = a[r, c] for the implicit patch matrix a (rows x cols,
// implicit_a.h) of input x: strips of 16 rows gathered, then written out
// column by column (runs of 16 floats).
void TransposedImplicitA(const ImplicitA& g, const float* x, int64_t rows, int64_t cols, float* dst,
                         const ParallelFor& parallel_for) {
  constexpr int64_t kRows = 16;
  parallel_for((rows + kRows - 1) / kRows, [&](int64_t t) {
    static thread_local std::vector<float> strip;
    const int64_t i0 = t * kRows, n = std::min(kRows, rows - i0);
    strip.resize(static_cast<size_t>(kRows * cols));
    GatherImplicitA(g, x, i0, static_cast<int>(n), 0, static_cast<int>(cols), strip.data(), cols);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < n; ++r)
        dst[c * rows + i0 + r] = strip[static_cast<size_t>(r * cols + c)];
  });
}

// Runs p as its transposed problem (see PrefersTransposed): transposes the
// distinct a and b blocks (zero strides stay shared) and the LUTs, computes
// out^T, and transposes it into p.out.
std::string GemmTransposed(const GemmProblem& p, const ParallelFor& parallel_for, bool a_in_place) {
  const int64_t m = p.m, n = p.n, k = p.k;
  const int64_t nad = DistinctBlocks(p, p.a_design_stride, 0);
  const int64_t nab = DistinctBlocks(p, 0, p.a_batch_stride);
  const int64_t nbd = DistinctBlocks(p, p.b_design_stride, 0);
  const int64_t nbb = DistinctBlocks(p, 0, p.b_batch_stride);
  const int64_t nl = DistinctLuts(p);
  const int64_t entries = int64_t{1} << (2 * p.mbits);
  static thread_local std::vector<float> at_store, bt_store, ot_store;
  static thread_local std::vector<uint32_t> lt_store;
  // Large LUTs (M >= 8: 256 KiB to 16 MiB each), and operands beyond
  // kTransposedBytesMax (a streaming problem's, PrefersTransposedStream), are
  // transposed into storage freed after the call rather than kept per thread.
  std::vector<uint32_t> lt_local;
  std::vector<float> at_local, bt_local, ot_local;
  // A b beyond L2, b^T being the transposed problem's a, is read in place
  // (ImplicitA::plain_ld): its strips are copied as they are packed, which
  // saves writing a copy and reading it back (a 768x3072 b took 2.5-3.4 ms
  // to transpose on one core). Zen 4, mbm7, in one process, copy vs in
  // place, ms: 32x768x3072 5.4 vs 4.2, 64x1568x1024 5.8 vs 4.7, 100x512x2048
  // 7.8 vs 6.7, 64x1024x512 1.75 vs 1.59; with b within L2, 64x784x300 0.80
  // vs 0.81-0.85, 64x512x512 0.78 vs 0.81. An implicit patch matrix a is
  // gathered transposed as before.
  // (a_in_place: a matrix-vector product, PrefersTransposedDirect, whose
  // b^T is the direct kernel's one or two rows, copied.)
  const int plain_mode = a_in_place ? 0 : PlainTransposeMode();
  const bool b_in_place =
      plain_mode == 2 ||
      (plain_mode == 1 &&
       4.0 * static_cast<double>(n) * k > static_cast<double>(gemm_internal::L2CacheBytes()));
  const int64_t a_floats = a_in_place ? 0 : nad * nab * k * m;
  const int64_t b_floats = b_in_place ? 0 : nbd * nbb * n * k;
  const int64_t o_floats = p.designs * p.batch * n * m;
  const bool keep = TransposedCopyBytes(p) <= kTransposedBytesMax;
  float* at = ReusedBuffer(keep ? at_store : at_local, a_floats);
  float* bt = ReusedBuffer(keep ? bt_store : bt_local, b_floats);
  uint32_t* lt = ReusedBuffer(p.mbits >= 8 ? lt_local : lt_store, nl * entries);
  float* ot = ReusedBuffer(keep ? ot_store : ot_local, o_floats);
  for (int64_t d = 0; d < nad && !a_in_place; ++d)
    for (int64_t b = 0; b < nab; ++b) {
      const float* a = p.a + d * p.a_design_stride + b * p.a_batch_stride;
      float* dst = at + (d * nab + b) * k * m;
      if (p.implicit_a != nullptr)
        TransposedImplicitA(*p.implicit_a, a, m, k, dst, parallel_for);
      else
        Transpose(a, m, k, k, dst, parallel_for);
    }
  for (int64_t d = 0; d < nbd && !b_in_place; ++d)
    for (int64_t b = 0; b < nbb; ++b)
      Transpose(p.b + d * p.b_design_stride + b * p.b_batch_stride, k, n, n,
                bt + (d * nbb + b) * n * k, parallel_for);
  const int64_t usize = int64_t{1} << p.mbits;
  for (int64_t d = 0; d < nl; ++d)
    Transpose(p.lut + d * p.lut_design_stride, usize, usize, usize, lt + d * entries, parallel_for);
  ImplicitA b_transposed;
  b_transposed.plain_ld = n;
  if (b_in_place) __atomic_fetch_add(&gemm_internal::g_plain_t_runs, 1, __ATOMIC_RELAXED);
  GemmProblem q = p;
  q.a = b_in_place ? p.b : bt;
  q.b = a_in_place ? p.a : at;
  q.b_plain_ld = a_in_place ? k : 0;
  q.lut = lt;
  q.out = ot;
  // (q's a is b^T, in place or the copy bt; p's implicit patch matrix, if
  // any, was gathered transposed into q's b = at.)
  q.implicit_a = b_in_place ? &b_transposed : nullptr;
  q.m = n;
  q.n = m;
  q.a_design_stride = b_in_place ? p.b_design_stride : p.b_design_stride != 0 ? nbb * n * k : 0;
  q.a_batch_stride = b_in_place ? p.b_batch_stride : p.b_batch_stride != 0 ? n * k : 0;
  q.b_design_stride = a_in_place ? p.a_design_stride : p.a_design_stride != 0 ? nab * k * m : 0;
  q.b_batch_stride = a_in_place ? p.a_batch_stride : p.a_batch_stride != 0 ? k * m : 0;
  q.lut_design_stride = p.lut_design_stride != 0 ? entries : 0;
  std::string err = GemmDirect(q, parallel_for, /*may_transpose=*/false);
  if (!err.empty()) return err;
  for (int64_t prob = 0; prob < p.designs * p.batch; ++prob)
    Transpose(ot + prob * n * m, n, m, m, p.out + prob * m * n, parallel_for);
  return {};
}

// Designs [d0, d1) of p as a problem of their own (operands, LUTs, facts
// and output offset to those designs).
GemmProblem DesignRun(const GemmProblem& p, int64_t d0, int64_t d1) {
  GemmProblem run = p;
  run.designs = d1 - d0;
  run.a = p.a + d0 * p.a_design_stride;
  run.b = p.b + d0 * p.b_design_stride;
  run.lut = p.lut + d0 * p.lut_design_stride;
  if (p.lut_facts != nullptr && p.lut_design_stride != 0) run.lut_facts = p.lut_facts + d0;
  run.out = p.out + d0 * p.batch * p.m * p.n;
  return run;
}

// Runs p as consecutive runs of designs, a run extended while
// same_run(d0, d) holds for its first design d0, each through
// run_fn(d0, DesignRun(p, d0, d1)); returns the first error.
template <class SameRun, class RunFn>
std::string ForEachDesignRun(const GemmProblem& p, SameRun same_run, RunFn run_fn) {
  for (int64_t d0 = 0; d0 < p.designs;) {
    int64_t d1 = d0 + 1;
    while (d1 < p.designs && same_run(d0, d1)) ++d1;
    std::string err = run_fn(d0, DesignRun(p, d0, d1));
    if (!err.empty()) return err;
    d0 = d1;
  }
  return {};
}

std::string GemmDirect(const GemmProblem& p, const ParallelFor& parallel_for, bool may_transpose) {
  const int64_t problems = p.designs * p.batch;
  const char* kNoScratch = "approx_jax_gemm: out of memory for CPU GEMM scratch buffers";
  if (may_transpose && PrefersTransposedDirect(p)) {
    __atomic_fetch_add(&gemm_internal::g_matvec_runs, 1, __ATOMIC_RELAXED);
    return GemmTransposed(p, parallel_for, /*a_in_place=*/true);
  }
  // The direct kernel (few rows) reads the LUT as it is: no pass over the
  // LUTs for effective widths, closed forms or 16-bit copies, no transposes.
  const bool direct = gemm_internal::PrefersDirect(p);
  EffectiveWidths ew;
  const bool narrow =
      !direct && gemm_internal::g_no_design_sharing == 0 && ComputeEffectiveWidths(p, &ew);
  const int* eff_bits = narrow ? ew.bits.data() : nullptr;
  const uint32_t* const* eff_lut = narrow ? ew.luts.data() : nullptr;
  std::vector<int> family_store, family_width_store;
  const int* families =
      !direct && DesignFamilies(p, parallel_for, &family_store, &family_width_store)
          ? family_store.data()
          : nullptr;
  const int* family_bits =
      families != nullptr && !family_width_store.empty() ? family_width_store.data() : nullptr;
  // A stack of designs of different widths (a sweep over M = 3, 5 and 7,
  // widened to 7) runs as consecutive runs of designs of one width, each at
  // that width with its LUTs narrowed to it, so that each run is planned as
  // a single call at that width is (strategy, tiles, closed form): a plan has
  // one strategy, chosen by M. A design's width: its closed-form family's
  // (family_bits; MBM's LUT narrows one bit further, but its closed form
  // holds at its own width only), else its LUT's effective width. 2 cores,
  // 25x50176x32 (a LeNet-5 conv 1 weight gradient): 8 designs of widths 7,
  // 5 and 3 took 96 ms in one call vs 36 ms as 8 single calls, the designs of
  // width 3 and 5 on the gathers chosen for width 7. The same products,
  // summed in the order the shapes fix (SplitKChunk): the same bits. (Several
  // runs only for enough work per design, as below: each run is a separate
  // pass over the threads. A run's LUTs are at its width: no recursion past it.)
  if (narrow && gemm_internal::g_force_strategy == 0) {
    auto width_of = [&](int64_t d) {
      if (families != nullptr && families[d] != kFamilyNone)
        return family_bits != nullptr ? family_bits[d] : p.mbits;
      return eff_bits[d];
    };
    // (Designs sharing one LUT have one width: they make one run.)
    int64_t nruns = 1;
    bool narrower = width_of(0) != p.mbits;
    for (int64_t d = 1; d < p.designs; ++d) {
      nruns += width_of(d) != width_of(d - 1);
      narrower = narrower || width_of(d) != p.mbits;
    }
    const double work_per_design = static_cast<double>(p.batch) * p.m * p.n * p.k;
    if (narrower && (nruns == 1 || work_per_design >= double{1 << 22})) {
      std::vector<uint32_t> run_luts;
      return ForEachDesignRun(
          p, [&](int64_t d0, int64_t d) { return width_of(d) == width_of(d0); },
          [&](int64_t d0, GemmProblem run) {
            const int width = width_of(d0);
            if (width != p.mbits) {
              // (The facts and the family hint describe the width-M LUTs: the
              // run checks its own, at most 4^7 entries a design.)
              const int64_t entries = int64_t{1} << (2 * width);
              const int64_t nluts = p.lut_design_stride == 0 ? 1 : run.designs;
              run_luts.resize(static_cast<size_t>(nluts * entries));
              for (int64_t dd = 0; dd < nluts; ++dd)
                NarrowLut(run.lut + dd * p.lut_design_stride, p.mbits, p.mbits - width,
                          run_luts.data() + dd * entries);
              run.mbits = width;
              run.lut = run_luts.data();
              run.lut_design_stride = p.lut_design_stride == 0 ? 0 : entries;
              run.lut_facts = nullptr;
              run.family_hint = -1;
            }
            return GemmDirect(run, parallel_for, may_transpose);
          });
    }
  }
  // A stack whose designs differ in whether their cheap closed form beats
  // the tiles (a Mitchell or truncate design next to an MBM or a random
  // LUT, few rows) runs as consecutive runs of like designs, so that each
  // takes its faster path (a plan has one strategy). Each design's sums are
  // computed as before: same bits. (Only for enough work per design: each
  // run is a separate pass over the threads; 8 designs at 64^3 measured
  // 1.07x the single calls split, 0.80x unsplit; at 512^3 0.88x vs 0.93x.)
  const double work_per_design = static_cast<double>(p.batch) * p.m * p.n * p.k;
  if (families != nullptr && p.mbits <= 7 && p.designs > 1 && p.lut_design_stride != 0 &&
      work_per_design >= double{1 << 22} && p.m < gemm_internal::CheapFamilyRows(p.mbits) &&
      gemm_internal::g_force_strategy == 0) {
    auto cheap_at = [&](int64_t d) { return gemm_internal::IsCheapFamily(families[d]); };
    int64_t first_change = 1;
    while (first_change < p.designs && cheap_at(first_change) == cheap_at(0)) ++first_change;
    if (first_change < p.designs)
      return ForEachDesignRun(
          p, [&](int64_t d0, int64_t d) { return cheap_at(d) == cheap_at(d0); },
          [&](int64_t, const GemmProblem& run) {
            return GemmDirect(run, parallel_for, may_transpose);
          });
  }
  const int stream_mode = StreamMode();
  if (may_transpose && !direct && gemm_internal::g_force_strategy == 0) {
    int widest = narrow ? 0 : p.mbits;
    for (int64_t d = 0; narrow && d < p.designs; ++d) widest = std::max(widest, eff_bits[d]);
    // (An implicit patch matrix is read in place, not transposed, for the
    // tiles; for streaming, where it pays 3-5x, it is gathered transposed.)
    if (p.implicit_a == nullptr &&
        PrefersTransposed(p, widest, gemm_internal::CheapClosedFormWins(p, families)))
      return GemmTransposed(p, parallel_for, /*a_in_place=*/false);
    if (PrefersTransposedStream(p, families, eff_bits, stream_mode))
      return GemmTransposed(p, parallel_for, /*a_in_place=*/false);
  }
  // (Made here, after any recursion above: the copies live in per-thread
  // storage reused by the next call.)
  CompactLuts& compact = ThreadCompactLuts();
  const uint16_t* const* lut16 = !direct && MakeCompactLuts(p, families, parallel_for, &compact)
                                     ? compact.per_design.data()
                                     : nullptr;
  // The whole problem as one part (k summed in one chunk), with the
  // per-design facts and the kernel's knobs; split-K copies it per group of
  // problems with its own k chunks.
  gemm_internal::KSplit base{std::max<int64_t>(p.k, 1),
                             1,
                             0,
                             problems,
                             nullptr,
                             eff_bits,
                             eff_lut,
                             families,
                             lut16,
                             stream_mode,
                             ByteTiles()};
  base.family_bits = family_bits;
  base.bf16_tiles = Bf16Tiles();
  base.pair_tiles = PairTiles();
  base.quad_gathers = QuadGathers();
  base.perm_tiles = PermTiles();
  base.rows_first = EnvMode("APPROX_JAX_CPU_ROWS_FIRST") != 0;
  const int64_t chunk = SplitKChunk(p);
  if (chunk >= p.k) {
    if (RunPart(p, base, parallel_for) == gemm_internal::kSimdNoMemory) return kNoScratch;
    return {};
  }
  // Split-K (cpu_gemm_split.h): chunk partials, then an ordered reduction.
  const int64_t chunks = (p.k + chunk - 1) / chunk;
  const int64_t mn = p.m * p.n;
  const int64_t group =
      std::max<int64_t>(1, std::min(problems, kSplitScratchFloats / (chunks * mn)));
  std::vector<float> part(static_cast<size_t>(group * chunks * mn));
  for (int64_t p0 = 0; p0 < problems; p0 += group) {
    const int64_t g = std::min(group, problems - p0);
    gemm_internal::KSplit ks = base;
    ks.chunk = chunk;
    ks.chunks = chunks;
    ks.prob_begin = p0;
    ks.probs = g;
    ks.part = part.data();
    if (RunPart(p, ks, parallel_for) == gemm_internal::kSimdNoMemory) return kNoScratch;
    // out = ((P_0 + P_1) + ...) + P_{S-1}, element by element.
    const int64_t total = g * mn;
    constexpr int64_t kReduceBlock = 4096;
    float* out = p.out + p0 * mn;
    const float* src = part.data();
    parallel_for((total + kReduceBlock - 1) / kReduceBlock, [&](int64_t t) {
      const int64_t e0 = t * kReduceBlock, e1 = std::min(total, e0 + kReduceBlock);
      for (int64_t e = e0; e < e1; ++e) out[e] = src[e];
      for (int64_t s = 1; s < chunks; ++s) {
        const float* ps = src + s * total;
        for (int64_t e = e0; e < e1; ++e) out[e] += ps[e];
      }
    });
  }
  return {};
}

}  // namespace

void LutFactsCpu(const uint32_t* lut, int64_t luts, int mbits, int32_t* facts,
                 const ParallelFor& parallel_for) {
  const int64_t entries = int64_t{1} << (2 * mbits);
  const uint32_t low_mask = (1u << (23 - mbits)) - 1u;
  for (int64_t d = 0; d < luts; ++d) {
    const uint32_t* l = lut + d * entries;
    const int family = LutFamilyBy(
        mbits, [&](auto f) { return LutIsParallel<decltype(f)::value>(l, mbits, parallel_for); });
    int32_t v = family;
    if (family != kFamilyNone) {
      // A family's entries are in kernel format with clear low bits.
      v |= kLutFactsKernelFormat | kLutFactsLowBitsClear;
    } else {
      constexpr int64_t kBlock = int64_t{1} << 16;
      const int64_t blocks = (entries + kBlock - 1) / kBlock;
      std::vector<uint32_t> acc(static_cast<size_t>(blocks), 0);
      parallel_for(blocks, [&](int64_t t) {
        const int64_t e0 = t * kBlock, e1 = std::min(entries, e0 + kBlock);
        uint32_t a = 0;
        for (int64_t e = e0; e < e1; ++e) a |= l[e];
        acc[static_cast<size_t>(t)] = a;
      });
      uint32_t all = 0;
      for (uint32_t a : acc) all |= a;
      if ((all >> 24) == 0) v |= kLutFactsKernelFormat;
      if ((all & low_mask) == 0) v |= kLutFactsLowBitsClear;
      if ((v & kLutFactsKernelFormat) && (v & kLutFactsLowBitsClear))
        v |= NarrowFamily(l, mbits, parallel_for);
    }
    facts[d] = v;
  }
}

std::string ApproxGemmCpu(const GemmProblem& p, const ParallelFor& parallel_for) {
  if (p.designs * p.batch * p.m == 0 || p.n == 0) return {};
  try {
    return GemmDirect(p, parallel_for, /*may_transpose=*/true);
  } catch (const std::bad_alloc&) {
    return "approx_jax_gemm: out of memory";
  }
}

}  // namespace approx_jax
