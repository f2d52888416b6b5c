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
constexpr int kMR = 3;  // 12 accumulators
// Rows per tile panel: one pack record's 8 rows, run as 3 + 3 + 2 by the
// 3-row kernel (TilePanel), so that the pack holds no unused rows (a 3-row
// panel left 5 of its record's 8 rows empty: 64 bytes per k per 3 rows, more
// than L2 holds for a 512-row task at kb = 64 on Zen 3).
constexpr int kTilePanelRows = 8;
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

// A LUT row of 2^mbits <= 8 entries as one vector (zeros past its end), for
// lookups by permutes.
inline VI ShortLutRow(const uint32_t* row, int mbits) {
  alignas(32) int32_t tab[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int q = 0; q < (1 << mbits); ++q) tab[q] = static_cast<int32_t>(row[q]);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tab));
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
      const VI t = ShortLutRow(row, mbits);
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

// Four-row LUT gathers need 64-bit gathers of 8 lanes and a two-table word
// permute: AVX-512 only (kIsaQuadGather is false, these are never called).
constexpr bool kIsaQuadGather = false;
inline void BuildQuadTable(const uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*, int,
                           uint64_t*) {}
inline VI QuadPosI(VI v) { return v; }
inline void QuadStep(const uint64_t*, const int32_t*, const float*, const float*, float*, int64_t,
                     int, int) {}

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
// 8 x 8 transpose of r[0..7] (row i lane j -> row j lane i).
inline void Transpose8(VF (&r)[8]) {
  const VF t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const VF t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const VF t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const VF t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const VF s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const VF s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const VF s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const VF s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
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
//
// 4 <= M <= 7 with a pair table (BuildPairLut): word q of the table's row
// for a b mantissa v holds the bfloat16 values of u = 2q (low half) and
// u = 2q + 1 (high half). For 16 consecutive x, 8 words of each element's row
// are loaded at a time and two 8 x 8 transposes give, per q, the words of
// x + l (lo) and x + 8 + l (hi) in lane l: split into the tile words of 2q
// and 2q + 1. The scale is applied as an integer add to the exponent field:
// for a normal power-of-two scale 2^(eb - 127), the product's top 16 bits
// are Lf16 + ((eb - 127) << 7), exact while eb + c <= 254 (the fast path's
// bound; tiles past it are never read); a zero scale gives its signed zero.
// The same bits as the float multiply. Loads and shuffles rather than one
// gather per q and 8 x (the previous build): Zen 3's gathers are slow. Zen 3,
// 2 threads, one process, alternated, minimum of 6-8, ms, gathers vs
// transposes: 1024^3 mbm7 62.1 vs 57.5, random M = 7 94.9 vs 82.4; 512^3
// random M = 5 7.2 vs 6.7, M = 4 6.2 vs 6.1; 8192x576x64 random M = 7 23.1
// vs 21.9 (bench_cpu_gemm_kernel.md, round 23).
void BuildTilesBf16Pairs(const int32_t* pairs, int mbits, int n, const int32_t* ibv,
                         const float* sbv, int32_t* tiles, int ustride) {
  const int half = 1 << (mbits - 1);  // >= kVL words per row (M >= 4)
  const VI high_half = Set1I(static_cast<int32_t>(0xffff0000u));
  const VI exp16 = Set1I(0x7f807f80), sign16 = Set1I(static_cast<int32_t>(0x80008000u));
  const VI bias16 = Set1I(0x3f803f80), zero = Set1I(0);
  for (int x = 0; x < n; x += 2 * kVL) {
    // The scales of x + l (low halves) and x + 8 + l (high halves): their
    // exponent add, zero mask and sign, in the tile word layout.
    const VI sbp = OrI(_mm256_srli_epi32(CastI(LoadF(sbv + x)), 16),
                       AndI(CastI(LoadF(sbv + x + kVL)), high_half));
    const VI e = AndI(sbp, exp16);
    const VI add = _mm256_sub_epi16(e, bias16);
    const VI keep = XorI(_mm256_cmpeq_epi16(e, zero), Set1I(-1));
    const VI sgn = AndI(sbp, sign16);
    const int32_t* rows[2 * kVL];
    for (int l = 0; l < 2 * kVL; ++l) rows[l] = pairs + (ibv[x + l] << (mbits - 1));
    int32_t* out = tiles + x / 2;
    for (int q0 = 0; q0 < half; q0 += kVL) {
      VF lo[kVL], hi[kVL];
      for (int l = 0; l < kVL; ++l) {
        lo[l] = CastF(LoadI(rows[l] + q0));
        hi[l] = CastF(LoadI(rows[kVL + l] + q0));
      }
      Transpose8(lo);
      Transpose8(hi);
      for (int i = 0; i < kVL; ++i) {
        const VI wl = CastI(lo[i]), wh = CastI(hi[i]);
        const VI t0 = _mm256_blend_epi16(wl, _mm256_slli_epi32(wh, 16), 0xaa);
        const VI t1 = _mm256_blend_epi16(_mm256_srli_epi32(wl, 16), wh, 0xaa);
        int32_t* out0 = out + static_cast<int64_t>(2 * (q0 + i)) * ustride;
        StoreI(out0, OrI(AndI(_mm256_add_epi16(t0, add), keep), sgn));
        StoreI(out0 + ustride, OrI(AndI(_mm256_add_epi16(t1, add), keep), sgn));
      }
    }
  }
}

void BuildTilesBf16(const uint32_t* lut, int mbits, int n, const int32_t* ibv, const float* sbv,
                    int32_t* tiles, int ustride, bool /*byte_tiles: AVX-512 VBMI only*/,
                    const int32_t* pairs) {
  if (pairs != nullptr && mbits >= 4 && mbits <= 7)
    return BuildTilesBf16Pairs(pairs, mbits, n, ibv, sbv, tiles, ustride);
  const VI one_exp = Set1I(127 << 23);
  const VI high_half = Set1I(static_cast<int32_t>(0xffff0000u));
  auto pair = [&](VF lo, VF hi) {
    return OrI(_mm256_srli_epi32(CastI(lo), 16), AndI(CastI(hi), high_half));
  };
  for (int u = 0; u < (1 << mbits); ++u) {
    const uint32_t* row = lut + (static_cast<int64_t>(u) << mbits);
    int32_t* out = tiles + static_cast<int64_t>(u) * ustride;
    if (mbits <= 3) {
      const VI t = ShortLutRow(row, mbits);
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

// The pair table of a LUT at 4 <= M <= 7 for BuildTilesBf16:
// pairs[(v << (M - 1)) + q] holds the bfloat16 bits (top 16 bits of
// Lf[u][v] = float with bits (127 << 23) + lut[(u << M) | v]) of u = 2q in its
// low half and of u = 2q + 1 in its high half. 2^(2M) * 2 bytes (32 KB at M = 7).
constexpr bool kIsaPairLut = true;
void BuildPairLut(const uint32_t* lut, int mbits, int32_t* pairs) {
  const int size = 1 << mbits, half = size >> 1;
  for (int v = 0; v < size; ++v)
    for (int q = 0; q < half; ++q) {
      const uint32_t lo = (lut[((2 * q) << mbits) | v] + (127u << 23)) >> 16;
      const uint32_t hi = (lut[((2 * q + 1) << mbits) | v] + (127u << 23)) >> 16;
      pairs[(v << (mbits - 1)) + q] = static_cast<int32_t>(lo | (hi << 16));
    }
}

// Permute tiles (M <= 3; MicroPermTile in cpu_gemm_simd_impl.h): the 2^M
// <= 8 tile values of one b element, Lf[u][ib] * sb for every u, as one
// vector, perm[(kk * kNB + j) * 8 + u]; a panel of 8 rows of a then picks
// its products with one permute per 8 products (lane r: row r's mantissa
// index), no tile load per row. (Lanes u >= 2^M hold +0 and are never
// picked.) Exact as the tiles are: the same values, the same FMAs.
constexpr bool kIsaPermTiles = true;
constexpr int kPermRows = 8;  // panel rows of MicroPermTile
// Bytes of one column block's permute tiles (kb = 128: L2-resident).
// Harness, Intel Xeon with the AVX2 unit forced, 1024^3 M = 3: 29.3-30.2 ms
// at 128 KB, 31.6-41.8 at 64 KB, 33.0-34.0 at 32 KB.
constexpr int64_t kPermTileBytes = 128 << 10;
void BuildPermTiles(const uint32_t* lut, int mbits, int n, const int32_t* ibv, const float* sbv,
                    float* perm) {
  alignas(32) float col[8][8];  // col[v][u] = Lf[u][v]
  const int size = 1 << mbits;
  for (int v = 0; v < 8; ++v)
    for (int u = 0; u < 8; ++u)
      col[v][u] = u < size && v < size ? BitsFloat(lut[(u << mbits) | v] + (127u << 23)) : 0.0f;
  for (int x = 0; x < n; ++x)
    StoreF(perm + static_cast<int64_t>(x) * 8, MulF(LoadF(col[ibv[x]]), Set1F(sbv[x])));
}

// Defined after cpu_gemm_simd_impl.h (they read its pack layout).
void TransposePermPack(int32_t* pk, int kb);
void MicroPermTile(const int32_t* pk, int kb, const float* perm, float* c, int64_t ldc);

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

// A panel's pack (PackPanelIL with unit stride: mantissa indices, scales)
// turned for MicroPermTile: per block of kVL k, the 8 x 8 blocks of indices
// and of scales transposed, so that word (kk % 8) * 8 + r holds row r's index
// at kk (scales 64 words on): one vector per k over the panel's 8 rows.
void TransposePermPack(int32_t* pk, int kb) {
  for (int kk = 0; kk < kb; kk += kVL) {
    int32_t* blk = pk + kk * kPackW;
    for (int h = 0; h < 2; ++h) {
      VF r[8];
      for (int i = 0; i < 8; ++i) r[i] = CastF(LoadI(blk + (8 * h + i) * kVL));
      Transpose8(r);
      for (int i = 0; i < 8; ++i) StoreI(blk + (8 * h + i) * kVL, CastI(r[i]));
    }
  }
}

// Permute-tile micro-kernel (M <= 3): c[r][j] += sa[r][kk] * Lf[ia[r][kk]][ib[kk][j]]
// * sb[kk][j] for the panel's 8 rows and kNB columns, 8 columns at a time:
// the accumulators hold one column each, a vector over the 8 rows (c is
// transposed in and out), and the 8 products of column j at kk are one
// permute of its perm-tile vector by the rows' mantissa indices. Each output
// is still summed over kk in order with the same exact FMAs as MicroTile.
// Stand-alone on an Intel Xeon (one core, tiles in L1, 8 columns per k):
// 17.7-24 G products/s; in GEMMs no faster than MicroTile there
// (benchmarks/bench_cpu_gemm_kernel.md, round 18), hence opt in.
void MicroPermTile(const int32_t* pk, int kb, const float* perm, float* c, int64_t ldc) {
  for (int g = 0; g < kNB; g += 8) {
    VF acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = LoadF(c + i * ldc + g);
    Transpose8(acc);
    const float* t = perm + g * 8;
    for (int kk0 = 0; kk0 < kb; kk0 += kVL) {
      const int32_t* blk = pk + kk0 * kPackW;
      const int n = kb - kk0 < kVL ? kb - kk0 : kVL;
      for (int kk = 0; kk < n; ++kk) {
        const VI u = LoadI(blk + kk * 8);
        const VF sa = CastF(LoadI(blk + 64 + kk * 8));
        const float* tk = t + static_cast<int64_t>(kk0 + kk) * kNB * 8;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j)
          acc[j] = FmaF(sa, _mm256_permutevar8x32_ps(LoadF(tk + j * 8), u), acc[j]);
      }
    }
    Transpose8(acc);
    for (int i = 0; i < 8; ++i) StoreF(c + i * ldc + g, acc[i]);
  }
}

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
