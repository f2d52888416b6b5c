// Built-in multiplier families whose LUT entries have a closed form (SPEC
// section 4), for kernels that compute an entry instead of loading it (the
// CPU gather and closed-form kernels; the CUDA LUT kernel when its LUT would
// be read from global memory, M >= 8).
//
// A kernel may use the closed form only after LutFamilyOf has checked,
// entry by entry, that the LUT it was given equals it: results then stay
// those of the LUT by construction (the user's LUT is the ground truth, the
// formula a faster way to read it).
//
// Entries are in kernel format, (c << 23) | (r << (23 - M)), with
// ia, ib < 2^M the truncated mantissa indices of operands a and b:
// * Mitchell: t = x + y; the product mantissa is t (c = 0) or 2t (c = 1):
//   entry = (ia + ib) << (23 - M) in both cases.
// * truncate: P = (2^M + ia)(2^M + ib) exactly; c = P >= 2^(2M+1);
//   r = (P >> (M + c)) - 2^M.
// * MBM (M >= 7, where the correction C = 2^-4 + 2^-6 and C/2 are whole
//   multiples of 2^-M): T = (ia | 1) + (ib | 1); if T < 2^M: L = T + C*2^M,
//   c = L >= 2^M, r = c ? (L + 2^M) / 2 - 2^M (truncated) : L; else
//   G = T - 2^M + C*2^(M-1), or T - 2^M when that reaches 2^M; c = 1, r = G.
#ifndef APPROX_JAX_XLA_KERNELS_LUT_FAMILY_H_
#define APPROX_JAX_XLA_KERNELS_LUT_FAMILY_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "approx_math.h"

namespace approx_jax {

enum LutFamily : int { kFamilyNone = 0, kFamilyMitchell = 1, kFamilyTruncate = 2, kFamilyMbm = 3 };

constexpr int kMbmMinBits = 7;

// (Host and device: the CUDA LUT kernel computes entries with it too.)
template <int kFamily>
APPROX_HD uint32_t FamilyEntry(int m, uint32_t ia, uint32_t ib) {
  const int sh = 23 - m;
  const uint32_t one = 1u << m;
  if (kFamily == kFamilyMitchell) return (ia + ib) << sh;
  if (kFamily == kFamilyTruncate) {
    const uint32_t prod = (one + ia) * (one + ib);
    return prod >= (1u << (2 * m + 1)) ? (prod >> (m + 1)) << sh : ((prod >> m) << sh) - (1u << 23);
  }
  // MBM
  const uint32_t cu = (1u << (m - 4)) + (1u << (m - 6));
  const uint32_t t = (ia | 1u) + (ib | 1u);
  if (t < one) {
    const uint32_t low = t + cu;
    return low < one ? low << sh : ((low + one) >> 1) << sh;
  }
  uint32_t g = t - one + (cu >> 1);
  if (g >= one) g = t - one;
  return (1u << 23) | (g << sh);
}

// Whether every row of the width-m `lut` equals the family's closed form.
// Called per GEMM on every design's LUT (4^M entries: 16 MiB at M = 11), so
// it runs at memory speed: Mitchell's and MBM's entries depend only on a sum
// of the two indices, so each row is a slice of one short table (a memcmp);
// truncate's row is a product progression in ib, split where the carry sets,
// in a loop the compiler vectorises. (Entry-by-entry FamilyEntry calls took
// 4 ms at M = 11, a quarter of a 8192x576x64 closed-form GEMM.)
// Rows [row_begin, row_end) only, when given (the caller may split the rows
// over threads).
template <int kFamily>
inline bool LutIs(const uint32_t* lut, int m, uint32_t row_begin = 0, uint32_t row_end = 1u << 11) {
  if (m < 1 || m > 11) return false;
  const uint32_t n = 1u << m;
  if (row_end > n) row_end = n;
  const int sh = 23 - m;
  const size_t row_bytes = sizeof(uint32_t) << m;
  if constexpr (kFamily == kFamilyMitchell || kFamily == kFamilyMbm) {
    // Mitchell: row ia is by_sum[ia + ib] (= (ia + ib) << sh). MBM's entry is
    // a function of t = (ia|1) + (ib|1) = ((ia & ~1) + ib) | 1) + 1, so row ia
    // is by_sum[(ia & ~1) + ib] with by_sum[x] = the entry of t = (x|1) + 1,
    // i.e. FamilyEntry(m, 0, x) (defined for any x < 2^(m+1): only t matters).
    uint32_t by_sum[2 << 11];  // 2^(m+1) entries, m <= 11 (LutFamilyOf)
    for (uint32_t x = 0; x < 2 * n; ++x)
      by_sum[x] = kFamily == kFamilyMitchell ? x << sh : FamilyEntry<kFamilyMbm>(m, 0, x);
    for (uint32_t ia = row_begin; ia < row_end; ++ia) {
      const uint32_t start = kFamily == kFamilyMitchell ? ia : ia & ~1u;
      if (std::memcmp(lut + (static_cast<uint64_t>(ia) << m), by_sum + start, row_bytes))
        return false;
    }
    return true;
  } else {
    // truncate: prod = (2^m + ia)(2^m + ib); the carry c = prod >= 2^(2m+1)
    // sets from ib = first_carry on.
    for (uint32_t ia = row_begin; ia < row_end; ++ia) {
      const uint32_t* row = lut + (static_cast<uint64_t>(ia) << m);
      const uint32_t fa = n + ia;
      const uint32_t limit = 1u << (2 * m + 1);
      uint32_t first_carry = (limit + fa - 1) / fa;  // smallest 2^m + ib with prod >= limit
      first_carry = first_carry < n ? 0 : (first_carry - n < n ? first_carry - n : n);
      uint32_t diff = 0, prod = fa * n;
      for (uint32_t ib = 0; ib < first_carry; ++ib, prod += fa)
        diff |= row[ib] ^ (((prod >> m) << sh) - (1u << 23));
      for (uint32_t ib = first_carry; ib < n; ++ib, prod += fa)
        diff |= row[ib] ^ ((prod >> (m + 1)) << sh);
      if (diff != 0) return false;
    }
    return true;
  }
}

// The family whose closed form equals the width-m kernel-format LUT at every
// entry, or kFamilyNone, as `is(std::integral_constant<int, F>{})` answers
// for family F (LutIs, or a caller's threaded version of it). MBM is only
// tried from m = 7 on (below, its correction is not a whole multiple of 2^-m
// and the closed form differs).
template <class IsFamily>
inline int LutFamilyBy(int m, IsFamily is) {
  if (m < 1 || m > 11) return kFamilyNone;
  if (is(std::integral_constant<int, kFamilyMitchell>{})) return kFamilyMitchell;
  if (is(std::integral_constant<int, kFamilyTruncate>{})) return kFamilyTruncate;
  if (m >= kMbmMinBits && is(std::integral_constant<int, kFamilyMbm>{})) return kFamilyMbm;
  return kFamilyNone;
}

inline int LutFamilyOf(const uint32_t* lut, int m) {
  return LutFamilyBy(m, [&](auto family) { return LutIs<decltype(family)::value>(lut, m); });
}

// What a GEMM may trust about one kernel-format LUT without reading it (the
// `lut_facts` operand of the CPU GEMM and conv targets, one int32 per LUT,
// made by the `approx_jax_lut_facts` target): kLutFactsUnknown, or the
// LutFamily in the low two bits plus the two flags below. A traced LUT (a
// vmapped design stack, a multiplier passed to a jitted step) gets its facts
// once per step and every GEMM of the step reads them, instead of each GEMM
// checking 4^M entries per design (16 MiB at M = 11).
constexpr int32_t kLutFactsUnknown = -1;
constexpr int32_t kLutFactsFamilyMask = 3;
// Every entry is below 2^24 (c <= 1: kernel format).
constexpr int32_t kLutFactsKernelFormat = 1 << 2;
// Every entry's bits below the M mantissa bits are zero.
constexpr int32_t kLutFactsLowBitsClear = 1 << 3;
// Bits 4-7: s > 0 when the family holds at width M - s only: the LUT is a
// narrower one widened (its entry depends on the top M - s bits of each
// index alone, WidenedBy) and that narrower LUT is the family's. (A stack
// pads its designs to the widest one's M: mbm10 in a stack of M = 11.)
constexpr int kLutFactsNarrowingShift = 4;
constexpr int32_t kLutFactsNarrowingMask = 15;

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_LUT_FAMILY_H_
