// AVX2 instantiation of the vectorised approximate GEMM
// (cpu_gemm_simd_impl.h). Every header is included before the target pragma
// so that no inline library function is compiled for AVX2 here.
#include "approx_math.h"
#include "cpu_gemm_simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")

namespace approx_jax {
namespace gemm_internal {
namespace avx2 {

constexpr int kVL = 8;
constexpr int kNV = 4;  // 32 columns per tile block
constexpr int kNB = kVL * kNV;
constexpr int kMR = 3;   // 12 accumulators
constexpr int kMRG = 2;  // gather kernel rows

using VF = __m256;
using VI = __m256i;

inline VF LoadF(const float* p) { return _mm256_loadu_ps(p); }
inline void StoreF(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline VF MulF(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF AddF(VF a, VF b) { return _mm256_add_ps(a, b); }
// The AVX2 unit runs only where the CPU also has FMA (cpu_gemm.cc BestIsa;
// every AVX2 x86 core has). Used only where the product is exact
// (cpu_gemm_simd_impl.h MicroTile), so the bits are those of mul then add.
inline VF FmaF(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF Set1F(float x) { return _mm256_set1_ps(x); }
inline VF CastF(VI x) { return _mm256_castsi256_ps(x); }
inline VI CastI(VF x) { return _mm256_castps_si256(x); }
inline VI LoadI(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void StoreI(int32_t* p, VI v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline VI Set1I(int32_t x) { return _mm256_set1_epi32(x); }
inline VI AddI(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI MulLoI(VI a, VI b) { return _mm256_mullo_epi32(a, b); }
inline VI AndI(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI OrI(VI a, VI b) { return _mm256_or_si256(a, b); }
inline VI AndNotI(VI a, VI b) { return _mm256_andnot_si256(a, b); }
inline VI XorI(VI a, VI b) { return _mm256_xor_si256(a, b); }
inline VI SrlI(VI a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
inline VI SllI(VI a, int n) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)); }
inline VI SrlvI(VI a, VI n) { return _mm256_srlv_epi32(a, n); }
inline VI CmpEqI(VI a, VI b) { return _mm256_cmpeq_epi32(a, b); }
inline VI CmpGtI(VI a, VI b) { return _mm256_cmpgt_epi32(a, b); }
// a > b (signed) ? y : x, lane by lane.
inline VI SelectGtI(VI a, VI b, VI x, VI y) {
  return _mm256_blendv_epi8(x, y, _mm256_cmpgt_epi32(a, b));
}
inline VI BlendI(VI a, VI b, VI m) { return _mm256_blendv_epi8(a, b, m); }
inline bool AllOnesI(VI v) { return _mm256_movemask_epi8(_mm256_cmpeq_epi32(v, Set1I(-1))) == -1; }
inline bool AnyI(VI v) { return !_mm256_testz_si256(v, v); }
// Fast-path acceptance of a's lanes, accumulated over a panel (see
// PackPanelIL): a lane passes if its exponent field ex (x & 0x7f800000) lies
// in [lo, hi], or ex == 0 and ok0 is all ones. (Signed compares: lo / hi are
// at most 256 << 23, which wraps to INT32_MIN and only ever means "nothing
// passes" together with hi = 0, as it should.)
using OkAcc = VI;
inline OkAcc OkInit() { return Set1I(-1); }
inline OkAcc OkUpdate(OkAcc acc, VI ex, VI lo, VI hi, VI ok0) {
  const VI z = CmpEqI(ex, Set1I(0));
  const VI out = OrI(CmpGtI(lo, ex), CmpGtI(ex, hi));
  return AndI(acc, BlendI(AndNotI(out, Set1I(-1)), ok0, z));
}
inline bool OkAll(OkAcc acc) { return AllOnesI(acc); }
inline VI LaneIota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline VI GatherI(const uint32_t* base, VI idx) {
  return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 4);
}
// 16-bit entries: each lane reads 4 bytes at base + 2 * idx (tables are
// padded by one entry) and keeps the low half.
inline VI GatherLowHalfI(const uint16_t* base, VI idx) {
  return AndI(_mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 2), Set1I(0xffff));
}

// Loads the first n (<= kVL) words of p, zeros in the other lanes.
inline VI LoadPartialI(const uint32_t* p, int n) {
  const VI mask = _mm256_cmpgt_epi32(Set1I(n), LaneIota());
  return _mm256_maskload_epi32(reinterpret_cast<const int*>(p), mask);
}

// tiles[u * ustride + kk * kNB + j] = Lf[u][ib[kk][j]] * sb[kk][j] for all u.
// n = kb * kNB floats per u.
void BuildTiles(const uint32_t* lut, int mbits, int n, const int32_t* ibv, const float* sbv,
                float* tiles, int ustride) {
  const VI one_exp = Set1I(127 << 23);
  for (int u = 0; u < (1 << mbits); ++u) {
    const uint32_t* row = lut + (static_cast<int64_t>(u) << mbits);
    float* out = tiles + static_cast<int64_t>(u) * ustride;
    if (mbits <= 3) {
      alignas(32) int32_t tab[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int q = 0; q < (1 << mbits); ++q) tab[q] = static_cast<int32_t>(row[q]);
      const VI t = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab));
      for (int x = 0; x < n; x += kVL) {
        const VI v = _mm256_permutevar8x32_epi32(t, LoadI(ibv + x));
        StoreF(out + x, MulF(CastF(AddI(v, one_exp)), LoadF(sbv + x)));
      }
    } else if (mbits >= 8) {
      alignas(32) int32_t tmp[kVL];
      for (int x = 0; x < n; x += kVL) {
        for (int l = 0; l < kVL; ++l) tmp[l] = static_cast<int32_t>(row[ibv[x + l]]);
        const VI v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
        StoreF(out + x, MulF(CastF(AddI(v, one_exp)), LoadF(sbv + x)));
      }
    } else {
      for (int x = 0; x < n; x += kVL) {
        const VI v = GatherI(row, LoadI(ibv + x));
        StoreF(out + x, MulF(CastF(AddI(v, one_exp)), LoadF(sbv + x)));
      }
    }
  }
}

// LUT rows are looked up with gathers here (AVX2 has no two-table permute):
// kIsaPermuteLookup is false, so MicroPermuteM is never chosen on this ISA.
constexpr bool kIsaPermuteLookup = false;
template <int MB>
struct LutRow {
  const uint32_t* row;
};
template <int MB>
inline LutRow<MB> LoadLutRow(const uint32_t* row) {
  return LutRow<MB>{row};
}
template <int MB>
inline VI LookupLutRow(const LutRow<MB>& r, VI ib) {
  return GatherI(r.row, ib);
}

constexpr bool kIsaBf16Tiles = true;
inline VI MinI32(VI a, VI b) { return _mm256_min_epi32(a, b); }
inline VI MaxI32(VI a, VI b) { return _mm256_max_epi32(a, b); }
inline int32_t ReduceMinI32(VI a) {
  alignas(32) int32_t t[kVL];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), a);
  int32_t m = t[0];
  for (int l = 1; l < kVL; ++l) m = t[l] < m ? t[l] : m;
  return m;
}
inline int32_t ReduceMaxI32(VI a) {
  alignas(32) int32_t t[kVL];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), a);
  int32_t m = t[0];
  for (int l = 1; l < kVL; ++l) m = t[l] > m ? t[l] : m;
  return m;
}
inline VI ShlI16(VI a) { return _mm256_slli_epi32(a, 16); }
// The bfloat16 tile layout (MicroTile<MR, true> in cpu_gemm_simd_impl.h):
// per 16 consecutive x, one vector of 8 words whose word l holds x + l in its
// low half and x + 8 + l in its high half, each the top 16 bits of its
// float32 tile value, at word offset x / 2 (ustride in words). For M <= 7
// those are the whole value (+-1.r * 2^e with r of at most 7 bits, or a
// signed zero; the plan takes only LUTs whose bits below the M mantissa bits
// are clear): exact. Half the bytes of float32 tiles to write and to read.
// Measured in one process, alternated (2 cores, AMD EPYC without AVX-512,
// 12 rounds of 3 calls, ms, float32 vs bfloat16 tiles): 1024^3 mbm3 37.1 vs
// 30.8, mbm7 58.0 vs 47.8; 8192x576x64 mbm3 12.1 vs 9.2, mbm7 14.1 vs 10.8;
// 512^3 mbm7 9.4 vs 8.1.
void BuildTilesBf16(const uint32_t* lut, int mbits, int n, const int32_t* ibv, const float* sbv,
                    int32_t* tiles, int ustride, bool /*byte_tiles: AVX-512 VBMI only*/) {
  const VI one_exp = Set1I(127 << 23);
  const VI high_half = Set1I(static_cast<int32_t>(0xffff0000u));
  auto pair = [&](VF lo, VF hi) {
    return OrI(_mm256_srli_epi32(CastI(lo), 16), AndI(CastI(hi), high_half));
  };
  for (int u = 0; u < (1 << mbits); ++u) {
    const uint32_t* row = lut + (static_cast<int64_t>(u) << mbits);
    int32_t* out = tiles + static_cast<int64_t>(u) * ustride;
    if (mbits <= 3) {
      alignas(32) int32_t tab[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int q = 0; q < (1 << mbits); ++q) tab[q] = static_cast<int32_t>(row[q]);
      const VI t = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab));
      auto value = [&](int x) {
        const VI v = _mm256_permutevar8x32_epi32(t, LoadI(ibv + x));
        return MulF(CastF(AddI(v, one_exp)), LoadF(sbv + x));
      };
      for (int x = 0; x < n; x += 2 * kVL) StoreI(out + x / 2, pair(value(x), value(x + kVL)));
    } else {
      auto value = [&](int x) {
        return MulF(CastF(AddI(GatherI(row, LoadI(ibv + x)), one_exp)), LoadF(sbv + x));
      };
      for (int x = 0; x < n; x += 2 * kVL) StoreI(out + x / 2, pair(value(x), value(x + kVL)));
    }
  }
}

// DirectProduct (cpu_gemm_simd_impl.h) with comparison results as vectors.
inline VI DirectProduct(VI lanes, VI one, VI voff, const uint32_t* table, int mbits,
                        bool* special) {
  const VI e = AndI(SrlI(lanes, 23), Set1I(0xff));
  const VI sign = AndI(XorI(lanes, one), Set1I(INT32_MIN));
  const VI index = AndI(SrlI(lanes, 23 - mbits), Set1I((1 << mbits) - 1));
  const VI entry = GatherI(table, index);
  const VI e0 = AddI(e, voff);
  // (e0 << 23) + entry modulo 2^32, as ApproxMulBits; a magnitude >= Inf's
  // bits (unsigned: compared with the sign bits flipped) becomes Inf.
  const VI mag = AddI(SllI(e0, 23), entry);
  const VI over = CmpGtI(XorI(mag, Set1I(INT32_MIN)), Set1I(0x7f7fffff ^ INT32_MIN));
  // A zero or subnormal operand, or an underflow before the carry (e0 <= 0).
  const VI zero = OrI(CmpGtI(Set1I(1), e0), CmpEqI(e, Set1I(0)));
  *special = AnyI(CmpEqI(e, Set1I(0xff)));
  return OrI(sign, AndNotI(zero, BlendI(mag, Set1I(0x7f800000), over)));
}

#include "cpu_gemm_simd_impl.h"

}  // namespace avx2

int GemmAvx2(const GemmProblem& p, const KSplit& ks, const Runner& runner) {
  return avx2::RunGemm(p, ks, runner);
}

}  // namespace gemm_internal
}  // namespace approx_jax

#pragma GCC pop_options

#else  // not x86-64 GCC/Clang

namespace approx_jax {
namespace gemm_internal {
int GemmAvx2(const GemmProblem&, const KSplit&, const Runner&) { return kSimdDeclined; }
}  // namespace gemm_internal
}  // namespace approx_jax

#endif
