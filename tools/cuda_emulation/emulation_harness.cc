// The CUDA GEMM and multiply launchers of xla_kernels/ run on the CPU under
// emulation (cuda_runtime.h of this folder), compared bit for bit with the
// reference every CPU kernel is held to (tools/gemm_reference.h: products by
// ApproxMulBits, sums k-ascending from +0 in the shared split-K order). So
// without a GPU this checks that the CUDA kernels compute the CPU kernels'
// bits: every kernel (expanded operands, LUT in shared memory with 1..32
// copies, LUT in global memory, the scalar slow path), both split-K modes and
// the forced-chunk testing knob, design/batch strides with broadcasting,
// unaligned operands, and launch configurations the CUDA runtime would
// refuse (reported through cudaGetLastError, which the launchers check).
//
// Not covered: what only hardware shows (timing, races between warps,
// memory the real allocator places differently, NaN payloads: a GPU returns
// its canonical NaN, so NaNs compare as NaNs).
//
//   tools/cuda_emulation/run.sh [quick|full|smoke|grid-limits]   (exit 1 on any mismatch)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../gemm_reference.h"
#include "approx_math.h"
#include "cuda_gemm_internal.h"
#include "cuda_kernels.h"
#include "cuda_runtime.h"

using namespace approx_jax;
using namespace approx_jax::gemm_reference;

namespace {

int g_failures = 0;
int g_runs = 0;

// One way of running a problem: environment knobs of the launchers and the
// device they see.
struct Config {
  const char* name;
  const char* expanded;  // APPROX_JAX_CUDA_EXPANDED (nullptr: unset)
  const char* lut_kb;    // APPROX_JAX_CUDA_LUT_SMEM_KB
  const char* split_k;   // APPROX_JAX_CUDA_SPLIT_K
  int sm_count, smem_optin;
  const char* formula = nullptr;  // APPROX_JAX_CUDA_FORMULA
  const char* blocks = nullptr;   // APPROX_JAX_CUDA_EXPANDED_BLOCKS
  const char* narrow = nullptr;   // APPROX_JAX_CUDA_NARROW
  const char* m7_bk = nullptr;    // APPROX_JAX_CUDA_EXPANDED_M7_BK
  const char* fill = nullptr;     // APPROX_JAX_CUDA_EXPANDED_FILL
};

constexpr int kH200Smem = 232448, kA100Smem = 166912, kSm86Smem = 101376;

const Config kConfigs[] = {
    {"h200", nullptr, nullptr, nullptr, 132, kH200Smem},
    {"a100", nullptr, nullptr, nullptr, 108, kA100Smem},
    {"sm86-smem", nullptr, nullptr, nullptr, 84, kSm86Smem},
    {"lut-kernel", "0", nullptr, nullptr, 132, kH200Smem},
    {"lut-4kb", "0", "4", nullptr, 132, kH200Smem},
    {"lut-global", "0", "0", nullptr, 132, kH200Smem},
    {"lut-global-no-formula", "0", "0", nullptr, 132, kH200Smem, "0"},
    {"fold-splitk", nullptr, nullptr, nullptr, 1, kH200Smem},
    {"forced-3-chunks", nullptr, nullptr, "3", 132, kH200Smem},
    {"forced-3-chunks-fold", "0", nullptr, "3", 1, kH200Smem},
    {"no-split", nullptr, nullptr, "1", 132, kH200Smem},
    {"two-blocks", nullptr, nullptr, nullptr, 132, kH200Smem, nullptr, "2"},
    {"no-narrow", nullptr, nullptr, nullptr, 132, kH200Smem, nullptr, nullptr, "0"},
    {"m7-bk8", nullptr, nullptr, nullptr, 132, kH200Smem, nullptr, nullptr, nullptr, "8"},
    {"m7-bk8-a100", nullptr, nullptr, nullptr, 108, kA100Smem, nullptr, nullptr, nullptr, "8"},
    {"fill", nullptr, nullptr, nullptr, 132, kH200Smem, nullptr, nullptr, nullptr, nullptr, "1"},
    {"fill-m7-bk8", nullptr, nullptr, nullptr, 132, kH200Smem, nullptr, nullptr, nullptr, "8", "1"},
    {"fill-a100-forced-chunks", nullptr, nullptr, "3", 108, kA100Smem, nullptr, nullptr, nullptr,
     nullptr, "1"},
};

int g_narrowed = 0;    // designs the expanded kernel ran with narrow planes
int g_small_tile = 0;  // expanded launches with the 128 x 64 fill tile

// The LutWidthKernel mask of one LUT, entry by entry: bit s set when some
// entry differs from the entry at both indices with their low s bits cleared.
int NotWidenedMask(const uint32_t* lut, int mbits) {
  int mask = 0;
  const uint32_t n = 1u << mbits;
  for (int s = 1; s < mbits; ++s) {
    const uint32_t low = (1u << s) - 1u;
    for (uint32_t u = 0; u < n && !(mask & (1 << s)); ++u)
      for (uint32_t v = 0; v < n; ++v)
        if (lut[(u << mbits) | v] != lut[((u & ~low) << mbits) | (v & ~low)]) {
          mask |= 1 << s;
          break;
        }
  }
  return mask;
}

void SetEnv(const char* name, const char* value) {
  if (value) {
    setenv(name, value, 1);
  } else {
    unsetenv(name);
  }
}

// The chunk length the launchers use under `cfg` (the reference's order).
int64_t ChunkFor(const Config& cfg, int64_t m, int64_t n, int64_t k) {
  if (!cfg.split_k) return SplitKChunkLength(m, n, k);
  const int64_t want = std::atoll(cfg.split_k);
  if (want <= 1) return k;
  const int64_t per = (k + want - 1) / want;
  return (per + 7) / 8 * 8;  // whole k-chunks of the CUDA kernels (8 terms)
}

std::string LaunchedSince(size_t first) {
  std::string names;
  for (size_t i = first; i < cuda_emu::g_launched.size(); ++i)
    names += (names.empty() ? "" : ", ") + cuda_emu::g_launched[i];
  return names;
}

// Whether the launched kernels are those a configuration must launch, as
// the comments of cuda_kernels.cu state the rule: the expanded-operand kernel
// for M <= 7 unless disabled or its shared memory exceeds the device's
// opt-in limit (ExpandedSmemBytes, which follows the tile knobs: the M = 7
// planes of kBK = 8 exceed an A100's); else the LUT kernel,
// with the LUT in shared memory when one copy (4^M words) fits the cap
// (128 KB by default) beside the tile area (33-41 KB: either placement is
// accepted where that decides; a LUT in global memory is checked against
// the built-in families' closed forms first, LutFamilyKernel); then the
// reduction after a parallel split-K.
// K = 0 launches nothing.
bool ExpectedKernels(const Config& cfg, const CudaGemmProblem& p, const CudaGemmPlan& plan,
                     const std::string& launched) {
  if (p.k == 0) return launched.empty();  // a memset
  const std::string reduce = plan.splits > 1 && plan.parallel ? ", SplitKReduceKernel" : "";
  const bool disabled = cfg.expanded && std::strcmp(cfg.expanded, "0") == 0;
  const bool fill_tile = cuda_gemm::ExpandedFillTile(p.mbits, p.m, p.n, p.designs * p.batch,
                                                     plan.splits, cfg.sm_count);
  if (p.mbits <= 7 && !disabled &&
      cuda_gemm::ExpandedSmemBytes(p.mbits, p.n, fill_tile) <= cfg.smem_optin) {
    // Each LUT's effective width is checked first (M >= 2), unless disabled.
    const bool narrow = p.mbits >= 2 && !(cfg.narrow && std::strcmp(cfg.narrow, "0") == 0);
    if (launched != std::string(narrow ? "LutWidthKernel, " : "") +
                        "ExpandedGemmKernel<T, kMinBlocks>" + reduce) {
      return false;
    }
    // The tile that ran: its shared memory is the planned one (the 128 x 64
    // tile where the fill rule picks it: only under its knob, never with
    // split-K chunks), and M = 7 under APPROX_JAX_CUDA_EXPANDED_M7_BK=8 holds
    // 2^7 planes of 8 k x 64 columns (128 KB) where the default holds 4 k
    // (64 KB).
    const size_t smem =
        cuda_emu::g_launched_smem[cuda_emu::g_launched_smem.size() - (reduce.empty() ? 1 : 2)];
    const bool fill = cfg.fill && std::strcmp(cfg.fill, "1") == 0;
    if (fill_tile && (!fill || plan.splits != 1)) return false;
    g_small_tile += fill_tile ? 1 : 0;
    const bool bk8 = cfg.m7_bk && std::strcmp(cfg.m7_bk, "8") == 0;
    const size_t planes_bytes = p.mbits == 7 ? (bk8 ? 128 : 64) * 1024 : 0;
    return static_cast<int64_t>(smem) == cuda_gemm::ExpandedSmemBytes(p.mbits, p.n, fill_tile) &&
           smem >= planes_bytes && (p.mbits != 7 || smem < planes_bytes + 64 * 1024);
  }
  const int64_t lut_bytes = int64_t{4} << (2 * p.mbits);
  const int64_t cap = (cfg.lut_kb ? std::atoll(cfg.lut_kb) : 128) * 1024;
  const bool may_share = lut_bytes <= cap && lut_bytes + 33792 <= cfg.smem_optin;
  const bool must_share = lut_bytes <= cap && lut_bytes + 41984 <= cfg.smem_optin;
  if (launched == "ApproxGemmKernel<true, T>" + reduce) return may_share;
  // A global LUT is first checked against the closed forms, unless disabled.
  const bool formula = !(cfg.formula && std::strcmp(cfg.formula, "0") == 0);
  const std::string check = formula ? "LutFamilyKernel, " : "";
  if (launched == check + "ApproxGemmKernel<false, T>" + reduce) return !must_share;
  return false;
}

struct Problem {
  Case c;
  int misalign;  // 0: 16-byte aligned operands; 1: a shifted; 2: b shifted; 3: out shifted
  bool all_configs = true;  // false: the default device and the LUT kernel only
};

void RunProblem(const Problem& pr, std::mt19937& rng, bool all_configs) {
  const Case& c = pr.c;
  // Operands at an offset of 0 or 1 float in buffers of exactly their size
  // (AddressSanitizer builds see any read past them).
  CaseData data(c, rng, pr.misalign == 1 ? 1 : 0, pr.misalign == 2 ? 1 : 0);
  GemmProblem& ref_p = data.p;
  const int so = pr.misalign == 3 ? 1 : 0;
  const int64_t outs = c.designs * c.batch * c.m * c.n;

  CudaGemmProblem p;
  p.a = ref_p.a;
  p.b = ref_p.b;
  p.lut = ref_p.lut;
  p.designs = c.designs;
  p.batch = c.batch;
  p.m = c.m;
  p.k = c.k;
  p.n = c.n;
  p.a_design_stride = ref_p.a_design_stride;
  p.a_batch_stride = ref_p.a_batch_stride;
  p.b_design_stride = ref_p.b_design_stride;
  p.b_batch_stride = ref_p.b_batch_stride;
  p.lut_design_stride = ref_p.lut_design_stride;
  p.mbits = c.mbits;

  int64_t last_chunk = -1;
  std::vector<float> ref(outs);
  for (const Config& cfg : kConfigs) {
    if (!all_configs && std::strcmp(cfg.name, "h200") != 0 &&
        std::strcmp(cfg.name, "lut-kernel") != 0 && std::strcmp(cfg.name, "two-blocks") != 0 &&
        std::strcmp(cfg.name, "fill") != 0) {
      continue;
    }
    SetEnv("APPROX_JAX_CUDA_EXPANDED", cfg.expanded);
    SetEnv("APPROX_JAX_CUDA_LUT_SMEM_KB", cfg.lut_kb);
    SetEnv("APPROX_JAX_CUDA_SPLIT_K", cfg.split_k);
    SetEnv("APPROX_JAX_CUDA_FORMULA", cfg.formula);
    SetEnv("APPROX_JAX_CUDA_EXPANDED_BLOCKS", cfg.blocks);
    SetEnv("APPROX_JAX_CUDA_NARROW", cfg.narrow);
    SetEnv("APPROX_JAX_CUDA_EXPANDED_M7_BK", cfg.m7_bk);
    SetEnv("APPROX_JAX_CUDA_EXPANDED_FILL", cfg.fill);
    cuda_emu::g_device.sm_count = cfg.sm_count;
    cuda_emu::g_device.smem_optin = cfg.smem_optin;
    cuda_emu::g_smem_limit.clear();
    const int64_t chunk = ChunkFor(cfg, c.m, c.n, c.k);
    if (chunk != last_chunk) {
      ref_p.out = ref.data();
      NaiveGemm(ref_p, chunk >= c.k ? c.k : chunk);
      last_chunk = chunk;
    }
    std::vector<float> obuf(outs + so, std::nanf("7"));
    p.out = obuf.data() + so;
    CudaGemmPlan plan;
    std::string err = PlanApproxGemm(p, &plan);
    std::vector<float> scratch(plan.scratch_bytes / sizeof(float), std::nanf("9"));
    const size_t launched_before = cuda_emu::g_launched.size();
    if (err.empty()) err = LaunchApproxGemm(p, plan, scratch.data(), nullptr);
    ++g_runs;
    if (err.empty()) {
      const std::string kernels = LaunchedSince(launched_before);
      if (!ExpectedKernels(cfg, p, plan, kernels)) {
        std::printf("FAIL M=%d %lldx%lldx%lld config=%s launched unexpected kernels [%s]\n",
                    c.mbits, (long long)c.m, (long long)c.k, (long long)c.n, cfg.name,
                    kernels.c_str());
        ++g_failures;
      }
      // The device's width masks against an entry-by-entry check.
      for (int64_t d = 0; plan.widths_offset >= 0 && d < c.designs; ++d) {
        const int got = reinterpret_cast<const int*>(reinterpret_cast<const char*>(scratch.data()) +
                                                     plan.widths_offset)[d];
        const int want = NotWidenedMask(p.lut + d * p.lut_design_stride, c.mbits);
        if (got != want) {
          std::printf("FAIL M=%d design %lld config=%s width mask %#x, entry by entry %#x\n",
                      c.mbits, (long long)d, cfg.name, got, want);
          ++g_failures;
        }
        if (cuda_gemm::EffectiveIndexBits(got, c.mbits) < c.mbits) ++g_narrowed;
      }
    }
    int64_t diff = 0, first = -1;
    for (int64_t i = 0; i < outs; ++i) {
      const bool same =
          FloatBits(p.out[i]) == FloatBits(ref[i]) || (std::isnan(p.out[i]) && std::isnan(ref[i]));
      if (!same && diff++ == 0) first = i;
    }
    if (!err.empty() || diff) {
      std::printf(
          "FAIL D=%lld B=%lld %lldx%lldx%lld M=%d sp=%.3f e=[%d,%d] lut=%d misalign=%d "
          "config=%s splits=%lld parallel=%d err='%s' diffs=%lld",
          (long long)c.designs, (long long)c.batch, (long long)c.m, (long long)c.k, (long long)c.n,
          c.mbits, c.special, c.exp_lo, c.exp_hi, c.lut_kind, pr.misalign, cfg.name,
          (long long)plan.splits, plan.parallel ? 1 : 0, err.c_str(), (long long)diff);
      if (first >= 0)
        std::printf(" first@%lld got=%08x ref=%08x", (long long)first, FloatBits(p.out[first]),
                    FloatBits(ref[first]));
      std::printf("\n");
      ++g_failures;
    }
  }
  SetEnv("APPROX_JAX_CUDA_EXPANDED", nullptr);
  SetEnv("APPROX_JAX_CUDA_LUT_SMEM_KB", nullptr);
  SetEnv("APPROX_JAX_CUDA_SPLIT_K", nullptr);
  SetEnv("APPROX_JAX_CUDA_FORMULA", nullptr);
  SetEnv("APPROX_JAX_CUDA_EXPANDED_BLOCKS", nullptr);
  SetEnv("APPROX_JAX_CUDA_NARROW", nullptr);
  SetEnv("APPROX_JAX_CUDA_EXPANDED_M7_BK", nullptr);
  SetEnv("APPROX_JAX_CUDA_EXPANDED_FILL", nullptr);
  cuda_emu::g_device = cuda_emu::Device();
}

void RunMultiply(int mbits, int64_t designs, int64_t n, std::mt19937& rng) {
  std::vector<float> a(designs * n), b(n);  // b broadcast over designs
  for (auto& x : a) x = RandomValue(rng, 0.05, 1, 254);
  for (auto& x : b) x = RandomValue(rng, 0.05, 1, 254);
  std::vector<uint32_t> lut;
  for (int64_t d = 0; d < designs; ++d) {
    auto l = MakeLut(mbits, static_cast<int>(d % 4), rng);
    lut.insert(lut.end(), l.begin(), l.end());
  }
  CudaMultiplyProblem p;
  std::vector<float> out(designs * n, std::nanf("7"));
  p.a = a.data();
  p.b = b.data();
  p.lut = lut.data();
  p.out = out.data();
  p.designs = designs;
  p.n = n;
  p.a_design_stride = n;
  p.b_design_stride = 0;
  p.lut_design_stride = int64_t{1} << (2 * mbits);
  p.mbits = mbits;
  const std::string err = LaunchApproxMultiply(p, nullptr);
  ++g_runs;
  int64_t diff = 0;
  for (int64_t d = 0; d < designs; ++d)
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t want = ApproxMulBits(FloatBits(a[d * n + i]), FloatBits(b[i]),
                                          lut.data() + d * p.lut_design_stride, mbits);
      if (FloatBits(out[d * n + i]) != want) ++diff;
    }
  if (!err.empty() || diff) {
    std::printf("FAIL multiply M=%d D=%lld n=%lld err='%s' diffs=%lld\n", mbits, (long long)designs,
                (long long)n, err.c_str(), (long long)diff);
    ++g_failures;
  }
}

Case MakeCase(int64_t m, int64_t k, int64_t n, int mbits, int variant) {
  Case c{};
  c.designs = 1;
  c.batch = 1;
  c.m = m;
  c.k = k;
  c.n = n;
  c.mbits = mbits;
  c.lut_kind = variant % 3;
  c.exp_lo = 110;
  c.exp_hi = 140;
  if (variant == 1) c.special = 0.02;
  if (variant == 2) {  // wide exponents: overflow/underflow inside products
    c.special = 0.002;
    c.exp_lo = 1;
    c.exp_hi = 254;
  }
  if (variant == 3) {  // subnormal partial sums: |x| ~ 2^-63, both signs
    c.exp_lo = 62;
    c.exp_hi = 66;
  }
  if (variant == 4) {  // near the fast-path exponent limits of both kernels
    c.special = 0.3;
    c.exp_lo = 60;
    c.exp_hi = 196;
  }
  return c;
}

int Test(bool full, bool smoke, bool grid_limits) {
  std::mt19937 rng(2024);
  const int all_m[] = {1, 2, 3, 4, 5, 6, 7, 8, 11};
  const int quick_m[] = {1, 3, 5, 7, 8, 11};
  // Tall (n <= 64) and wide tiles, partial tiles in every dimension, k not a
  // multiple of 4 or 8, a row count past one 256-row tile.
  const int64_t shapes[][3] = {{1, 1, 1},     {3, 5, 7},     {33, 17, 65},
                               {130, 37, 64}, {70, 40, 130}, {260, 12, 9}};
  std::vector<Problem> problems;
  int index = 0;
  for (int m : full ? std::vector<int>(std::begin(all_m), std::end(all_m))
                    : std::vector<int>(std::begin(quick_m), std::end(quick_m))) {
    for (auto& s : shapes) {
      const int variants = full ? 5 : 2;
      for (int v = 0; v < variants; ++v) {
        const int variant = full ? v : (index + v) % 5;
        problems.push_back({MakeCase(s[0], s[1], s[2], m, variant), (index + v) % 4});
      }
      ++index;
    }
    // The closed-form families (Mitchell, MBM) and a widened narrow LUT.
    Case mit = MakeCase(40, 24, 72, m, 1);
    mit.lut_kind = 4;
    problems.push_back({mit, 0});
    Case mbm = MakeCase(40, 24, 72, m, 4);
    mbm.lut_kind = 5;
    problems.push_back({mbm, 0});
  }
  // Narrow planes on the fast path (ordinary exponents): MBM, and a stack
  // whose first design is a random narrower LUT widened to M, in both tile
  // shapes (n <= 64 and n > 64).
  for (int m : full ? std::vector<int>{2, 3, 4, 5, 6, 7} : std::vector<int>{3, 5, 7}) {
    for (int64_t n : {40, 130}) {
      Case mbm = MakeCase(70, 33, n, m, 0);
      mbm.lut_kind = 5;
      problems.push_back({mbm, 0});
      Case stack = MakeCase(70, 33, n, m, n > 64 ? 1 : 0);
      stack.designs = 4;
      stack.lut_kind = 3;
      stack.widened = true;
      problems.push_back({stack, 0});
    }
  }
  // The 128 x 64 fill tile (configurations with APPROX_JAX_CUDA_EXPANDED_FILL)
  // on the fast path: 300 rows make 2 default tiles of 256 rows (or 3 of
  // 128 x 128) and 3 (6) small ones, at every width including M = 7, whose
  // small tile loads A with half of its threads.
  for (int m : full ? std::vector<int>{1, 2, 3, 4, 5, 6, 7} : std::vector<int>{3, 6, 7}) {
    problems.push_back({MakeCase(300, 33, 72, m, 0), 0});
    if (full) problems.push_back({MakeCase(300, 45, 40, m, 1), 1});
  }
  // Designs and batch with every broadcast pattern (vmap over a stack).
  for (int m : {3, 7, 11}) {
    for (int pattern = 0; pattern < (full ? 6 : 3); ++pattern) {
      Case c = MakeCase(20, 19, 70, m, pattern % 5);
      c.designs = 3;
      c.batch = 2;
      c.a_bcast_d = pattern == 1 || pattern == 4;
      c.b_bcast_d = pattern == 2 || pattern == 4;
      c.a_bcast_b = pattern == 3;
      c.b_bcast_b = pattern == 5;
      c.lut_bcast = pattern == 3;
      c.widened = true;
      problems.push_back({c, 0});
    }
  }
  // Split-K by the shared rule (K >= 4096), parallel and folded, with
  // specials in some chunks.
  for (int m : full ? std::vector<int>{3, 5, 7, 11} : std::vector<int>{7}) {
    Case c = MakeCase(5, 4100, 7, m, 1);
    problems.push_back({c, 0});
    if (full) {
      Case d = MakeCase(9, 5000, 66, m, 3);
      d.designs = 2;
      problems.push_back({d, 2});
    }
  }
  // K = 0: the launcher zeroes the output (XLA does not).
  problems.push_back({MakeCase(3, 0, 5, 7, 0), 0});
  // Forced chunks on small K (the knob's order), with designs.
  {
    Case c = MakeCase(30, 301, 20, 5, 1);
    c.designs = 2;
    problems.push_back({c, 0});
  }
  // Grids at CUDA's limit of 65535 blocks in y and z: blocks that loop over
  // several (design, batch) pairs, re-staging the LUT of each design, and
  // over several column tiles (the default device and the LUT kernel; about
  // 7 minutes: 2^18 blocks of 256 coroutines).
  if (grid_limits) {
    problems.clear();
    Case z = MakeCase(1, 3, 2, 5, 1);
    z.designs = 3;
    z.batch = 21846;  // 65538 products of one design each
    problems.push_back({z, 0, false});
    Case y = MakeCase(1, 1, 128 * int64_t{65535} + 200, 5, 0);  // 65537 column tiles
    problems.push_back({y, 0, false});
  }
  int ran = 0;
  // Set by the tests that check a broken kernel fails: its first failure is
  // the answer, the remaining problems only cost time.
  const bool stop_at_failure = std::getenv("CUDA_EMULATION_STOP_AT_FAILURE") != nullptr;
  for (size_t i = 0; i < problems.size() && !(stop_at_failure && g_failures); ++i) {
    // Every problem under the default device and the LUT kernel; all
    // configurations for every third problem (full: all of them). Smoke
    // (a quick check that a broken kernel fails): every fifth problem.
    if (smoke && i % 5 != 0) continue;
    RunProblem(problems[i], rng, problems[i].all_configs && (full || i % 3 == 0));
    ++ran;
  }
  for (int m : {1, 7, 11}) RunMultiply(m, 3, 1000, rng);
  // The narrow planes must have run (MBM and widened LUTs are among the cases).
  if (g_narrowed == 0 && !grid_limits) {
    std::printf("FAIL no design ran with narrow planes\n");
    ++g_failures;
  }
  if (g_small_tile == 0 && !grid_limits) {
    std::printf("FAIL no launch used the 128 x 64 fill tile\n");
    ++g_failures;
  }
  std::printf(
      "%d runs of %d GEMM problems and 3 multiply problems, %lld kernel launches, "
      "%d designs with narrow planes, %d fill-tile launches, %d failures\n",
      g_runs, ran, (long long)cuda_emu::g_launches, g_narrowed, g_small_tile, g_failures);
  return g_failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "quick";
  if (mode != "quick" && mode != "full" && mode != "smoke" && mode != "grid-limits") {
    std::fprintf(stderr, "usage: %s [quick|full|smoke|grid-limits]\n", argv[0]);
    return 2;
  }
  return Test(mode == "full", mode == "smoke", mode == "grid-limits");
}
