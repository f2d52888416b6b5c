// AVX-512 instantiation of the vectorised approximate GEMM
// (cpu_gemm_simd_impl.h). Every header is included before the target pragma
// so that no inline library function is compiled for AVX-512 here.
#include "approx_math.h"
#include "cpu_gemm_simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
// GCC 12 warns falsely about the intrinsics' internal undefined vectors.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi,bmi2,popcnt")

namespace approx_jax {
namespace gemm_internal {
namespace avx512 {

constexpr int kVL = 16;

using VF = __m512;
using VI = __m512i;

inline VF LoadF(const float* p) { return _mm512_loadu_ps(p); }
inline void StoreF(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF MulF(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF AddF(VF a, VF b) { return _mm512_add_ps(a, b); }
// a * b + c rounded once; only used where a * b is exact (see MicroTile).
inline VF FmaF(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF Set1F(float x) { return _mm512_set1_ps(x); }
inline VF CastF(VI x) { return _mm512_castsi512_ps(x); }
inline VI CastI(VF x) { return _mm512_castps_si512(x); }
inline VI LoadI(const int32_t* p) { return _mm512_loadu_si512(p); }
inline void StoreI(int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
inline VI Set1I(int32_t x) { return _mm512_set1_epi32(x); }
inline VI AddI(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI MulLoI(VI a, VI b) { return _mm512_mullo_epi32(a, b); }
inline VI AndI(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI OrI(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI AndNotI(VI a, VI b) { return _mm512_andnot_si512(a, b); }
inline VI SrlI(VI a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
inline VI SllI(VI a, int n) { return _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)); }
inline VI MinI32(VI a, VI b) { return _mm512_min_epi32(a, b); }
inline VI MaxI32(VI a, VI b) { return _mm512_max_epi32(a, b); }
// Per-lane shift by the lanes of n (one instruction, unlike SrlI's
// count-register form).
inline VI SrlvI(VI a, VI n) { return _mm512_srlv_epi32(a, n); }
// Fast-path acceptance of a's lanes, accumulated over a panel in a mask
// register (see PackPanelIL): a lane passes if its exponent field ex
// (x & 0x7f800000) lies in [lo, hi] (unsigned), or ex == 0 and ok0 is all ones.
using OkAcc = __mmask16;
inline OkAcc OkInit() { return 0xffff; }
inline OkAcc OkUpdate(OkAcc acc, VI ex, VI lo, VI hi, VI ok0) {
  const __mmask16 z = _mm512_cmpeq_epi32_mask(ex, _mm512_setzero_si512());
  const __mmask16 in = _mm512_mask_cmple_epu32_mask(_mm512_cmpge_epu32_mask(ex, lo), ex, hi);
  const __mmask16 zok = _mm512_mask_cmpeq_epi32_mask(z, ok0, Set1I(-1));
  return acc & static_cast<__mmask16>((in & ~z) | zok);
}
inline bool OkAll(OkAcc acc) { return acc == 0xffff; }
inline int32_t ReduceMinI32(VI a) { return _mm512_reduce_min_epi32(a); }
inline int32_t ReduceMaxI32(VI a) { return _mm512_reduce_max_epi32(a); }
inline VI ShlI16(VI a) { return _mm512_slli_epi32(a, 16); }
inline VI ShrI16(VI a) { return _mm512_srli_epi32(a, 16); }
inline VI CmpEqI(VI a, VI b) { return _mm512_movm_epi32(_mm512_cmpeq_epi32_mask(a, b)); }
inline VI CmpGtI(VI a, VI b) { return _mm512_movm_epi32(_mm512_cmpgt_epi32_mask(a, b)); }
// a > b (signed) ? y : x, lane by lane, without a vector mask round trip.
inline VI SelectGtI(VI a, VI b, VI x, VI y) {
  return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, b), x, y);
}
// Lanes of m that are all ones take b, else a.
inline VI BlendI(VI a, VI b, VI m) {
  return _mm512_mask_blend_epi32(_mm512_movepi32_mask(m), a, b);
}
inline bool AllOnesI(VI v) { return _mm512_cmpneq_epi32_mask(v, Set1I(-1)) == 0; }
inline VI LaneIota() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline VI GatherI(const uint32_t* base, VI idx) {
  return _mm512_i32gather_epi32(idx, static_cast<const void*>(base), 4);
}
// 16-bit entries: each lane reads 4 bytes at base + 2 * idx (tables are
// padded by one entry) and keeps the low half.
inline VI GatherLowHalfI(const uint16_t* base, VI idx) {
  return _mm512_and_si512(_mm512_i32gather_epi32(idx, static_cast<const void*>(base), 2),
                          Set1I(0xffff));
}

// Four-row LUT gathers (Plan::stream): one 64-bit gather lane reads the
// entries of four panel rows for one column. Per k, BuildQuadTable
// interleaves the four rows' 16-bit LUT rows (n = 2^M >= 32 entries each)
// into `quad`, entry v's four words in one 64-bit word at QuadPos(v) (the
// order the unpack instructions leave them in, within each 32 entries:
// 32 * (v / 32) + 8 * (w / 2) + 2 * (v % 32 / 8) + w % 2 with w = v % 8).
// Vector gathers were the streamed kernel's bottleneck on AMD Zen 5, where a
// 64-bit gather of 8 lanes costs about half a 32-bit gather of 16 and here
// brings 32 products' entries instead of 16 (kernel notes, round 21). On
// Intel Ice Lake, where the LUT rows' reads from L3 bound the kernel, the
// four-row gathers measured 1.3-2.1x faster too (round 22).
constexpr bool kIsaQuadGather = true;
inline void BuildQuadTable(const uint16_t* r0, const uint16_t* r1, const uint16_t* r2,
                           const uint16_t* r3, int n, uint64_t* quad) {
  for (int v = 0; v < n; v += 32) {
    const __m512i a0 = _mm512_loadu_si512(r0 + v), a1 = _mm512_loadu_si512(r1 + v);
    const __m512i a2 = _mm512_loadu_si512(r2 + v), a3 = _mm512_loadu_si512(r3 + v);
    const __m512i lo01 = _mm512_unpacklo_epi16(a0, a1), hi01 = _mm512_unpackhi_epi16(a0, a1);
    const __m512i lo23 = _mm512_unpacklo_epi16(a2, a3), hi23 = _mm512_unpackhi_epi16(a2, a3);
    _mm512_storeu_si512(quad + v, _mm512_unpacklo_epi32(lo01, lo23));
    _mm512_storeu_si512(quad + v + 8, _mm512_unpackhi_epi32(lo01, lo23));
    _mm512_storeu_si512(quad + v + 16, _mm512_unpacklo_epi32(hi01, hi23));
    _mm512_storeu_si512(quad + v + 24, _mm512_unpackhi_epi32(hi01, hi23));
  }
}
// QuadPos of 16 entry indices.
inline VI QuadPosI(VI v) {
  const VI hi = _mm512_and_si512(v, Set1I(~31));
  const VI w_pair = _mm512_slli_epi32(_mm512_and_si512(v, Set1I(6)), 2);
  const VI lane = _mm512_and_si512(_mm512_srli_epi32(v, 2), Set1I(6));
  const VI odd = _mm512_and_si512(v, Set1I(1));
  return _mm512_or_si512(_mm512_or_si512(hi, w_pair), _mm512_or_si512(lane, odd));
}
// c[t * ldc + j] += (Lf[u_t][ib[j]] * sb[j]) * s[t] for the four rows t and
// columns j < cols (one k): the same expression, hence the same bits, as
// MicroLookup. qpos = QuadPos(ib); lanes past cols hold index 0 and scale +0
// (DecomposeB) and are not stored.
inline void QuadStep(const uint64_t* quad, const int32_t* qpos, const float* sb, const float* s,
                     float* c, int64_t ldc, int cols, int entry_shift) {
  const VI one_exp = Set1I(127 << 23);
  const VI low = Set1I(0xffff);
  const __m128i sh = _mm_cvtsi32_si128(entry_shift);
  // Dword lane j of x01 = (row 0's word, row 1's word) of column j: words
  // 4j, 4j + 1 of the 64 gathered (the second gather's from 32 on).
  const VI four_j = _mm512_slli_epi32(LaneIota(), 2);
  const VI idx01 = _mm512_or_si512(four_j, _mm512_slli_epi32(AddI(four_j, Set1I(1)), 16));
  const VI idx23 = _mm512_add_epi16(idx01, _mm512_set1_epi16(2));
  const VF s0 = Set1F(s[0]), s1 = Set1F(s[1]), s2 = Set1F(s[2]), s3 = Set1F(s[3]);
  for (int j = 0; j < cols; j += 16) {
    const int left = cols - j;
    const __mmask16 m = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1u);
    const VI pos = _mm512_loadu_si512(qpos + j);
    const VF b = _mm512_loadu_ps(sb + j);
    const VI g0 = _mm512_i32gather_epi64(_mm512_castsi512_si256(pos), quad, 8);
    const VI g1 = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(pos, 1), quad, 8);
    const VI x01 = _mm512_permutex2var_epi16(g0, idx01, g1);
    const VI x23 = _mm512_permutex2var_epi16(g0, idx23, g1);
    const VI e[4] = {_mm512_and_si512(x01, low), _mm512_srli_epi32(x01, 16),
                     _mm512_and_si512(x23, low), _mm512_srli_epi32(x23, 16)};
    const VF st[4] = {s0, s1, s2, s3};
    for (int t = 0; t < 4; ++t) {
      float* ct = c + t * ldc + j;
      const VF lf = CastF(AddI(_mm512_sll_epi32(e[t], sh), one_exp));
      const VF acc = _mm512_maskz_loadu_ps(m, ct);
      _mm512_mask_storeu_ps(ct, m, FmaF(MulF(lf, b), st[t], acc));
    }
  }
}

// Loads the first n (<= kVL) words of p, zeros in the other lanes.
inline VI LoadPartialI(const uint32_t* p, int n) {
  return _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1u), p);
}

// One LUT row (2^MB kernel-format entries) held in registers, looked up
// 16 lanes at a time with permutes instead of a gather (gathers are
// microcoded on current x86 cores with the GDS mitigation).
constexpr bool kIsaPermuteLookup = true;
template <int MB>
struct LutRow {
  VI t[MB <= 4 ? 1 : (1 << (MB - 4))];
};

template <int MB>
inline LutRow<MB> LoadLutRow(const uint32_t* row) {
  const __mmask16 row_mask = MB >= 4 ? 0xffff : static_cast<__mmask16>((1u << (1 << MB)) - 1u);
  LutRow<MB> r;
  for (int q = 0; q < static_cast<int>(sizeof(r.t) / sizeof(r.t[0])); ++q)
    r.t[q] = _mm512_maskz_loadu_epi32(row_mask, row + 16 * q);
  return r;
}

// Entries row[ib] of the 16 lanes (0 <= ib < 2^MB).
template <int MB>
inline VI LookupLutRow(const LutRow<MB>& r, VI ib) {
  if constexpr (MB <= 4) {
    return _mm512_permutexvar_epi32(ib, r.t[0]);
  } else if constexpr (MB == 5) {
    return _mm512_permutex2var_epi32(r.t[0], ib, r.t[1]);
  } else if constexpr (MB == 6) {
    const __mmask16 m5 = _mm512_test_epi32_mask(ib, Set1I(32));
    return _mm512_mask_blend_epi32(m5, _mm512_permutex2var_epi32(r.t[0], ib, r.t[1]),
                                   _mm512_permutex2var_epi32(r.t[2], ib, r.t[3]));
  } else {
    const __mmask16 m5 = _mm512_test_epi32_mask(ib, Set1I(32));
    const __mmask16 m6 = _mm512_test_epi32_mask(ib, Set1I(64));
    const VI lo = _mm512_mask_blend_epi32(m5, _mm512_permutex2var_epi32(r.t[0], ib, r.t[1]),
                                          _mm512_permutex2var_epi32(r.t[2], ib, r.t[3]));
    const VI hi = _mm512_mask_blend_epi32(m5, _mm512_permutex2var_epi32(r.t[4], ib, r.t[5]),
                                          _mm512_permutex2var_epi32(r.t[6], ib, r.t[7]));
    return _mm512_mask_blend_epi32(m6, lo, hi);
  }
}

// tiles[u * ustride + x] = Lf[u][ibv[x]] * sbv[x] for x < n (n = kb * kNB of
// the calling width) and all u.
// The LUT row of u is held in registers and looked up with permutes.
//
// BF16 = true writes the bfloat16 tile layout instead (see MicroTile<MR, true> in
// cpu_gemm_simd_impl.h): per 32 consecutive x, one vector of 16 words whose
// word l holds x + l in its low half and x + 16 + l in its high half, each as
// the top 16 bits of its float32 value; word offsets are x / 2 (ustride is in
// words then). For M <= 7 those top 16 bits are the whole value: a tile value
// is +-1.r * 2^e with r of at most 7 bits, or a signed zero, so the low 16
// bits of its float32 are zero and the bfloat16 form is exact.
// The bfloat16 tile layout's words for 32 columns: float32 bit patterns of
// columns l (lo) and 16 + l (hi), each an exact bfloat16, packed as the low
// and high halves of word l.
inline VI Bf16Pair(VI lo, VI hi) {
  return OrI(ShrI16(lo), AndI(hi, Set1I(static_cast<int32_t>(0xffff0000u))));
}

template <int MB, bool BF16>
void BuildTilesM(const uint32_t* lut, int n, const int32_t* ibv, const float* sbv, void* tiles,
                 int ustride) {
  const VI one_exp = Set1I(127 << 23);
  for (int u = 0; u < (1 << MB); ++u) {
    const LutRow<MB> row = LoadLutRow<MB>(lut + (u << MB));
    auto value = [&](int x) {
      const VI v = LookupLutRow<MB>(row, LoadI(ibv + x));
      return MulF(CastF(AddI(v, one_exp)), LoadF(sbv + x));
    };
    if constexpr (BF16) {
      int32_t* out = static_cast<int32_t*>(tiles) + static_cast<int64_t>(u) * ustride;
      for (int x = 0; x < n; x += 2 * kVL)
        StoreI(out + x / 2, Bf16Pair(CastI(value(x)), CastI(value(x + kVL))));
    } else {
      float* out = static_cast<float*>(tiles) + static_cast<int64_t>(u) * ustride;
      for (int x = 0; x < n; x += kVL) StoreF(out + x, value(x));
    }
  }
}

// Wide LUTs (M >= 8): row u (2^M entries) stays in L1/L2 while it is read
// with scalar loads (gathers are slow on CPUs with the GDS mitigation).
__attribute__((optimize("no-tree-vectorize"))) void BuildTilesWide(const uint32_t* lut, int mbits,
                                                                   int n, const int32_t* ibv,
                                                                   const float* sbv, float* tiles,
                                                                   int ustride) {
  const VI one_exp = Set1I(127 << 23);
  alignas(64) int32_t tmp[kVL];
  for (int u = 0; u < (1 << mbits); ++u) {
    const uint32_t* row = lut + (static_cast<int64_t>(u) << mbits);
    float* out = tiles + static_cast<int64_t>(u) * ustride;
    for (int x = 0; x < n; x += kVL) {
      for (int l = 0; l < kVL; ++l) tmp[l] = static_cast<int32_t>(row[ibv[x + l]]);
      const VF lf = CastF(AddI(_mm512_load_si512(tmp), one_exp));
      StoreF(out + x, MulF(lf, LoadF(sbv + x)));
    }
  }
}

// BuildTilesM<MB, BF16> for a runtime width 1 <= mbits <= 7.
template <bool BF16>
void BuildTilesNarrow(const uint32_t* lut, int mbits, int n, const int32_t* ibv, const float* sbv,
                      void* tiles, int ustride) {
  switch (mbits) {
    case 1:
      return BuildTilesM<1, BF16>(lut, n, ibv, sbv, tiles, ustride);
    case 2:
      return BuildTilesM<2, BF16>(lut, n, ibv, sbv, tiles, ustride);
    case 3:
      return BuildTilesM<3, BF16>(lut, n, ibv, sbv, tiles, ustride);
    case 4:
      return BuildTilesM<4, BF16>(lut, n, ibv, sbv, tiles, ustride);
    case 5:
      return BuildTilesM<5, BF16>(lut, n, ibv, sbv, tiles, ustride);
    case 6:
      return BuildTilesM<6, BF16>(lut, n, ibv, sbv, tiles, ustride);
    default:
      return BuildTilesM<7, BF16>(lut, n, ibv, sbv, tiles, ustride);
  }
}

void BuildTiles(const uint32_t* lut, int mbits, int n, const int32_t* ibv, const float* sbv,
                float* tiles, int ustride) {
  if (mbits >= 8) return BuildTilesWide(lut, mbits, n, ibv, sbv, tiles, ustride);
  BuildTilesNarrow<false>(lut, mbits, n, ibv, sbv, tiles, ustride);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512vbmi,avx2,fma,bmi,bmi2,popcnt")

// BuildTilesM<MB, true>'s tiles by byte lookups (AVX-512 VBMI; 1 <= mbits <=
// 7, n a multiple of 32). For M <= 7 a bfloat16 tile value is
//   bf16(Lf[u][v] * sb) = (entry(u, v) >> 16) + (sb >> 16)
// as 16-bit integers: entry >> 16 is the byte c << 7 | r << (7 - M) (c <= 1:
// the caller's plan only takes LUTs with clear low bits and entries below
// 2^24), and sb >> 16 is b's sign << 15 | eb << 7, so the sum is sign << 15
// | (eb + c) << 7 | r bits, the product's bfloat16 bits wherever a tile is
// used (eb + c <= 254: BStats keeps eb <= 253 on the fast path). A zero or
// subnormal b (sb a signed zero) keeps sb >> 16 itself, as the float
// multiply gives. One byte permute (vpermb / vpermt2b, 2^M <= 128 table
// bytes in one or two registers) looks up 32 entries, zero-extended into the
// even bytes; one masked 16-bit add applies sb. The permute builder needs up
// to 4 permutes and 3 blends per 16 entries at M = 7 (a fifth of a 1024^3
// GEMM's time).
void BuildTilesBf16Bytes(const uint32_t* lut, int mbits, int n, const int32_t* ibv,
                         const float* sbv, int32_t* tiles, int ustride) {
  const int width = 1 << mbits;
  const int entries = width * width;
  // bytes[u * width + v] = entry(u, v) >> 16.
  alignas(64) uint8_t bytes[128 * 128];
  for (int e = 0; e < entries; e += kVL) {
    const __mmask16 live =
        entries - e >= kVL ? 0xffff : static_cast<__mmask16>((1u << (entries - e)) - 1u);
    const VI words = _mm512_srli_epi32(_mm512_maskz_loadu_epi32(live, lut + e), 16);
    _mm_mask_storeu_epi8(bytes + e, live, _mm512_cvtepi32_epi8(words));
  }
  // Per 32-column block: the byte indices (column l's index in byte 4l,
  // column 16 + l's in byte 4l + 2: the bfloat16 layout's word order), sb's
  // high halves in the same order, and which of them are nonzero.
  constexpr int kBlocks = 64;
  alignas(64) int32_t index[kBlocks * kVL];
  alignas(64) int32_t scale[kBlocks * kVL];
  __mmask32 nonzero[kBlocks];
  const VI exponent16 = _mm512_set1_epi16(0x7f80);
  const __mmask64 even_bytes = 0x5555555555555555ull;
  const int blocks = n / (2 * kVL);
  for (int b0 = 0; b0 < blocks; b0 += kBlocks) {
    const int nb = blocks - b0 < kBlocks ? blocks - b0 : kBlocks;
    for (int b = 0; b < nb; ++b) {
      const int x = (b0 + b) * 2 * kVL;
      const VI iv = OrI(LoadI(ibv + x), _mm512_slli_epi32(LoadI(ibv + x + kVL), 16));
      const VI sv = Bf16Pair(CastI(LoadF(sbv + x)), CastI(LoadF(sbv + x + kVL)));
      _mm512_store_si512(index + b * kVL, iv);
      _mm512_store_si512(scale + b * kVL, sv);
      nonzero[b] = _mm512_test_epi16_mask(sv, exponent16);
    }
    for (int u = 0; u < width; ++u) {
      const uint8_t* row = bytes + u * width;
      int32_t* out = tiles + static_cast<int64_t>(u) * ustride + b0 * kVL;
      if (mbits <= 6) {
        const __mmask64 live = width == 64 ? ~0ull : (1ull << width) - 1ull;
        const VI table = _mm512_maskz_loadu_epi8(live, row);
        for (int b = 0; b < nb; ++b) {
          const VI sv = _mm512_load_si512(scale + b * kVL);
          const VI entry =
              _mm512_maskz_permutexvar_epi8(even_bytes, _mm512_load_si512(index + b * kVL), table);
          StoreI(out + b * kVL, _mm512_mask_add_epi16(sv, nonzero[b], entry, sv));
        }
      } else {
        const VI table0 = _mm512_loadu_si512(row);
        const VI table1 = _mm512_loadu_si512(row + 64);
        for (int b = 0; b < nb; ++b) {
          const VI sv = _mm512_load_si512(scale + b * kVL);
          const VI entry = _mm512_maskz_permutex2var_epi8(
              even_bytes, table0, _mm512_load_si512(index + b * kVL), table1);
          StoreI(out + b * kVL, _mm512_mask_add_epi16(sv, nonzero[b], entry, sv));
        }
      }
    }
  }
}

#pragma GCC pop_options

// The bfloat16 tile layout (BuildTilesM<MB, true>) for 1 <= mbits <= 7; n is
// a multiple of 32 and ustride counts 32-bit words. byte_lookup: by
// BuildTilesBf16Bytes where the CPU has AVX-512 VBMI (same tiles).
constexpr bool kIsaBf16Tiles = true;
// (The permute tiles of the AVX2 unit: never chosen here.)
constexpr bool kIsaPermTiles = false;
constexpr int kPermRows = 1;           // (sizes no scratch here)
constexpr int64_t kPermTileBytes = 0;  // (unused: kIsaPermTiles is false)
inline void BuildPermTiles(const uint32_t*, int, int, const int32_t*, const float*, float*) {}
inline void TransposePermPack(int32_t*, int) {}
inline void MicroPermTile(const int32_t*, int, const float*, float*, int64_t) {}
// (The pair table of the AVX2 unit: AVX-512 looks tiles up with permutes.)
constexpr bool kIsaPairLut = false;
inline void BuildPairLut(const uint32_t*, int, int32_t*) {}
void BuildTilesBf16(const uint32_t* lut, int mbits, int n, const int32_t* ibv, const float* sbv,
                    int32_t* tiles, int ustride, bool byte_lookup, const int32_t* /*pairs*/) {
  static const bool has_vbmi = __builtin_cpu_supports("avx512vbmi");
  if (byte_lookup && has_vbmi) return BuildTilesBf16Bytes(lut, mbits, n, ibv, sbv, tiles, ustride);
  BuildTilesNarrow<true>(lut, mbits, n, ibv, sbv, tiles, ustride);
}

// DirectProduct (cpu_gemm_simd_impl.h) with comparison results in mask
// registers: an unsigned compare for the overflow, masked moves for Inf and
// the zeros.
inline VI DirectProduct(VI lanes, VI one, VI voff, const uint32_t* table, int mbits,
                        bool* special) {
  const VI e = _mm512_and_si512(_mm512_srli_epi32(lanes, 23), _mm512_set1_epi32(0xff));
  const VI index = _mm512_and_si512(_mm512_srl_epi32(lanes, _mm_cvtsi32_si128(23 - mbits)),
                                    _mm512_set1_epi32((1 << mbits) - 1));
  const VI entry = _mm512_i32gather_epi32(index, table, 4);
  const VI e0 = _mm512_add_epi32(e, voff);
  // (e0 << 23) + entry modulo 2^32, as ApproxMulBits; >= Inf's bits: Inf.
  const VI mag = _mm512_add_epi32(_mm512_slli_epi32(e0, 23), entry);
  const __mmask16 over = _mm512_cmpge_epu32_mask(mag, _mm512_set1_epi32(0x7f800000));
  // A zero or subnormal operand, or an underflow before the carry (e0 <= 0).
  const __mmask16 zero = _mm512_cmple_epi32_mask(e0, _mm512_setzero_si512()) |
                         _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
  *special = _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(0xff)) != 0;
  const VI value =
      _mm512_maskz_mov_epi32(static_cast<__mmask16>(~zero),
                             _mm512_mask_mov_epi32(mag, over, _mm512_set1_epi32(0x7f800000)));
  const VI sign = _mm512_and_si512(_mm512_xor_si512(lanes, one), _mm512_set1_epi32(INT32_MIN));
  return _mm512_or_si512(sign, value);
}

// The kernels, instantiated for three column-block widths. Narrow outputs
// (every LeNet conv has 32 channels, its last dense layer 10) would leave half
// or more of a 64-column block as zero padding: wasted micro-kernel FMAs and
// tile builds. The width only changes blocking, never the summation order
// (each output element is still summed over k ascending from +0, split-K by
// split_k.h), so all three give the same bits.
namespace w64 {
constexpr int kNV = 4;  // 64 columns per tile block
constexpr int kNB = kVL * kNV;
constexpr int kMR = 6;               // 24 accumulators
constexpr int kTilePanelRows = kMR;  // rows per tile panel (TilePanel)
constexpr int kMRG = 4;              // gather kernel rows
#include "cpu_gemm_simd_impl.h"
}  // namespace w64

namespace w32 {
constexpr int kNV = 2;  // 32 columns per tile block (17 <= n <= 32)
constexpr int kNB = kVL * kNV;
constexpr int kMR = 8;               // 16 accumulators (8 = the rows of one pack record)
constexpr int kTilePanelRows = kMR;  // rows per tile panel (TilePanel)
constexpr int kMRG = 8;
#include "cpu_gemm_simd_impl.h"
}  // namespace w32

namespace w16 {
constexpr int kNV = 1;  // 16 columns per tile block (n <= 16)
constexpr int kNB = kVL * kNV;
constexpr int kMR = 8;               // 8 accumulators
constexpr int kTilePanelRows = kMR;  // rows per tile panel (TilePanel)
constexpr int kMRG = 8;
#include "cpu_gemm_simd_impl.h"
}  // namespace w16

}  // namespace avx512

int GemmAvx512(const GemmProblem& p, const KSplit& ks, const Runner& runner) {
  int width = p.n <= 16 ? 16 : (p.n <= 32 ? 32 : 64);
  if (g_force_width == 16 || g_force_width == 32 || g_force_width == 64) width = g_force_width;
  if (width == 16) return avx512::w16::RunGemm(p, ks, runner);
  if (width == 32) return avx512::w32::RunGemm(p, ks, runner);
  return avx512::w64::RunGemm(p, ks, runner);
}

}  // namespace gemm_internal
}  // namespace approx_jax

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // not x86-64 GCC/Clang

namespace approx_jax {
namespace gemm_internal {
int GemmAvx512(const GemmProblem&, const KSplit&, const Runner&) { return kSimdDeclined; }
}  // namespace gemm_internal
}  // namespace approx_jax

#endif
