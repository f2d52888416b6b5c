// Reference and test data of the approximate GEMM, shared by the CPU harness
// (tools/gemm_harness.cc) and the CUDA emulation harness
// (tools/cuda_emulation/emulation_harness.cc).
//
// NaiveGemm: one ApproxMul product per term, k ascending from +0, in the
// split-K chunk order of cpu_gemm_split.h / split_k.h. CheckBound: an
// independent float64 check of SPEC section 5's bound and of Inf/NaN
// positions. MakeLut / RandomValue: LUT families and operands with special
// values for the test cases.
#ifndef APPROX_JAX_TOOLS_GEMM_REFERENCE_H_
#define APPROX_JAX_TOOLS_GEMM_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "approx_math.h"
#include "cpu_gemm.h"
#include "cpu_gemm_split.h"

namespace approx_jax {
namespace gemm_reference {

// ---------------------------------------------------------------- reference
// chunk: the split-K chunk length (<= 0: SplitKChunk(p), the rule shared by
// the CPU and CUDA GEMMs; >= p.k: the plain sequential sum).
inline void NaiveGemm(const GemmProblem& p, int64_t chunk_override = 0) {
  for (int64_t d = 0; d < p.designs; ++d)
    for (int64_t bi = 0; bi < p.batch; ++bi) {
      const float* a = p.a + d * p.a_design_stride + bi * p.a_batch_stride;
      const float* b = p.b + d * p.b_design_stride + bi * p.b_batch_stride;
      const uint32_t* lut = p.lut + d * p.lut_design_stride;
      float* out = p.out + (d * p.batch + bi) * p.m * p.n;
      for (int64_t i = 0; i < p.m; ++i)
        for (int64_t j = 0; j < p.n; ++j) {
          // Split-K order: ((P_0 + P_1) + ...) + P_{S-1}, each P_s summed
          // over its chunk ascending from +0 (one chunk: the plain sum).
          const int64_t chunk =
              std::max<int64_t>(1, chunk_override > 0 ? chunk_override : SplitKChunk(p));
          float acc = 0.0f;
          for (int64_t k0 = 0; k0 < p.k; k0 += chunk) {
            float part = 0.0f;
            for (int64_t k = k0; k < std::min(p.k, k0 + chunk); ++k)
              part += ApproxMul(a[i * p.k + k], b[k * p.n + j], lut, p.mbits);
            acc = k0 == 0 ? part : acc + part;
          }
          out[i * p.n + j] = acc;
        }
    }
}

// Independent check against float64 sums of the SPEC products.
inline int64_t CheckBound(const GemmProblem& p, const float* got) {
  int64_t bad = 0;
  for (int64_t d = 0; d < p.designs; ++d)
    for (int64_t bi = 0; bi < p.batch; ++bi) {
      const float* a = p.a + d * p.a_design_stride + bi * p.a_batch_stride;
      const float* b = p.b + d * p.b_design_stride + bi * p.b_batch_stride;
      const uint32_t* lut = p.lut + d * p.lut_design_stride;
      const float* out = got + (d * p.batch + bi) * p.m * p.n;
      for (int64_t i = 0; i < p.m; ++i)
        for (int64_t j = 0; j < p.n; ++j) {
          double sum = 0, mag = 0;
          bool nan = false, pinf = false, ninf = false;
          for (int64_t k = 0; k < p.k; ++k) {
            const float pr = ApproxMul(a[i * p.k + k], b[k * p.n + j], lut, p.mbits);
            if (std::isnan(pr))
              nan = true;
            else if (std::isinf(pr))
              (pr > 0 ? pinf : ninf) = true;
            else {
              sum += pr;
              mag += std::fabs(pr);
            }
          }
          const float g = out[i * p.n + j];
          bool ok;
          if (nan || (pinf && ninf))
            ok = std::isnan(g);
          else if (mag >= 3.0e38)
            ok = true;  // partial sums may overflow: Inf or Inf-Inf
          else if (pinf)
            ok = std::isnan(g) ? false : (std::isinf(g) && g > 0);
          else if (ninf)
            ok = std::isinf(g) && g < 0;
          else if (std::isnan(g))
            ok = false;
          else if (std::isinf(g))
            ok = std::fabs(sum) > 3.0e38;  // float overflow of the sum
          else
            ok = std::fabs(g - sum) <= p.k * std::ldexp(1.0, -24) * mag + 1e-300;
          // Canonical NaN: products are 0x7fc00000; sums of them keep it, and
          // Inf - Inf gives the x86 default NaN; accept either quiet NaN.
          if (!ok) {
            if (bad < 5)
              std::printf("    bound fail d=%lld b=%lld i=%lld j=%lld got=%g ref=%g mag=%g\n",
                          (long long)d, (long long)bi, (long long)i, (long long)j, g, sum, mag);
            ++bad;
          }
        }
    }
  return bad;
}

// ---------------------------------------------------------------- data
inline std::vector<uint32_t> MakeLut(int m, int kind, std::mt19937& rng) {
  // 3: a random (or truncate) LUT of width m' < m, widened exactly to m;
  // 7: a family's (truncate, Mitchell, MBM at m' >= 7) widened the same way,
  // what multipliers.stack makes of a narrower built-in.
  if ((kind == 3 || kind == 7) && m >= 2) {
    const int mn = kind == 7 && m >= 8 && rng() % 2
                       ? 7 + static_cast<int>(rng() % static_cast<unsigned>(m - 7))
                       : 1 + static_cast<int>(rng() % static_cast<unsigned>(m - 1));
    const int sh = m - mn;
    const int narrow_kind = kind == 3 ? (rng() % 2 ? 0 : 2) : (mn >= 7 ? 5 : (rng() % 2 ? 4 : 2));
    const auto narrow = MakeLut(mn, narrow_kind, rng);
    std::vector<uint32_t> lut(size_t{1} << (2 * m));
    for (uint32_t i = 0; i < (1u << m); ++i)
      for (uint32_t j = 0; j < (1u << m); ++j)
        lut[(size_t(i) << m) | j] = narrow[(size_t(i >> sh) << mn) | (j >> sh)];
    return lut;
  }
  if (kind == 3 || kind == 7) kind = 0;
  const int n = 1 << m;
  std::vector<uint32_t> lut(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      uint32_t c, r;
      if (kind == 0) {  // random r and carry
        c = rng() & 1u;
        r = rng() & (n - 1);
      } else if (kind == 1) {  // all carries set, max mantissa (worst for overflow)
        c = 1;
        r = n - 1;
      } else if (kind == 4 || kind == 5) {  // mitchell(M) / mbm(M), SPEC section 4
        double x = double(i) / n, y = double(j) / n, p;
        if (kind == 4) {
          const double t = x + y;
          p = t < 1.0 ? 1.0 + t : 2.0 * t;
        } else {
          x += 1.0 / n * ((i & 1) ? 0 : 1);  // force the lowest kept bit to 1
          y += 1.0 / n * ((j & 1) ? 0 : 1);
          const double t = x + y, cc = 1.0 / 16 + 1.0 / 64;
          if (t < 1.0) {
            p = 1.0 + t + cc;
          } else {
            double g = (t - 1.0) + cc / 2;
            if (g >= 1.0) g = t - 1.0;
            p = 2.0 * (1.0 + g);
          }
        }
        c = p >= 2.0 ? 1 : 0;
        const double f = c ? p / 2.0 : p;
        r = static_cast<uint32_t>(std::floor((f - 1.0) * n));
      } else {  // truncate(M): (1+x)(1+y) truncated to M bits
        const double p = (1.0 + double(i) / n) * (1.0 + double(j) / n);
        c = p >= 2.0 ? 1 : 0;
        const double f = c ? p / 2.0 : p;
        r = static_cast<uint32_t>(std::floor((f - 1.0) * n));
      }
      lut[(size_t(i) << m) | j] = (c << 23) | (r << (23 - m));
    }
  return lut;
}

// special: probability of a special operand (zero/-0/subnormal/Inf/NaN/huge/tiny).
inline float RandomValue(std::mt19937& rng, double special, int exp_lo, int exp_hi) {
  std::uniform_real_distribution<double> U(0, 1);
  const uint32_t sign = (rng() & 1u) << 31;
  const uint32_t mant = rng() & kMantMask;
  if (U(rng) < special) {
    switch (rng() % 9) {
      case 0:
        return 0.0f;
      case 1:
        return -0.0f;
      case 2:
        return BitsFloat(sign | (mant | 1u));  // subnormal
      case 3:
        return BitsFloat(sign | kInfBits);
      case 4:
        return BitsFloat(0x7f800000u | (mant | 1u) | sign);  // NaN with payload
      case 5:
        return BitsFloat(sign | (static_cast<uint32_t>(250 + rng() % 5) << 23) | mant);  // huge
      case 6:
        return BitsFloat(sign | (static_cast<uint32_t>(1 + rng() % 6) << 23) | mant);  // tiny
      case 7:
        return BitsFloat(sign | (127u << 23) | mant);
      default:
        return BitsFloat(sign | (static_cast<uint32_t>(60 + rng() % 20) << 23) | mant);  // smallish
    }
  }
  const uint32_t e = static_cast<uint32_t>(exp_lo + rng() % (exp_hi - exp_lo + 1));
  return BitsFloat(sign | (e << 23) | mant);
}

struct Case {
  int64_t designs, batch, m, k, n;
  bool a_bcast_d, b_bcast_d, a_bcast_b, b_bcast_b, lut_bcast;
  int mbits;
  double special;
  int exp_lo, exp_hi;
  int lut_kind;  // MakeLut's kind (0-2: per design kind + d; 4, 5, 7: all; 6: see CaseData)
  bool widened;  // designs' LUT kinds also include kind 3 (widened narrow LUTs)
};

// The operands and LUTs of a Case, drawn from rng (a, then b, then one LUT
// per design), and the GemmProblem over them (p.out unset). An operand can
// start a_offset / b_offset floats into its buffer (unaligned); the buffers
// hold exactly what the problem reads. Not copyable: p points into it.
struct CaseData {
  std::vector<float> a_buf, b_buf;
  std::vector<uint32_t> lut;
  GemmProblem p;

  CaseData(const Case& c, std::mt19937& rng, int a_offset = 0, int b_offset = 0) {
    const int64_t ga = c.a_bcast_d ? 1 : c.designs, ba = c.a_bcast_b ? 1 : c.batch;
    const int64_t gb = c.b_bcast_d ? 1 : c.designs, bb = c.b_bcast_b ? 1 : c.batch;
    const int64_t gl = c.lut_bcast ? 1 : c.designs;
    a_buf.resize(a_offset + ga * ba * c.m * c.k);
    b_buf.resize(b_offset + gb * bb * c.k * c.n);
    for (size_t i = a_offset; i < a_buf.size(); ++i)
      a_buf[i] = RandomValue(rng, c.special, c.exp_lo, c.exp_hi);
    for (size_t i = b_offset; i < b_buf.size(); ++i)
      b_buf[i] = RandomValue(rng, c.special, c.exp_lo, c.exp_hi);
    for (int64_t d = 0; d < gl; ++d) {
      // Kind 6: design 0 MBM (a closed form), the others random.
      const int kind = c.lut_kind == 6   ? (d == 0 ? 5 : 0)
                       : c.lut_kind >= 4 ? c.lut_kind
                                         : (c.lut_kind + d) % (c.widened ? 4 : 3);
      const auto l = MakeLut(c.mbits, static_cast<int>(kind), rng);
      lut.insert(lut.end(), l.begin(), l.end());
    }
    p.a = a_buf.data() + a_offset;
    p.b = b_buf.data() + b_offset;
    p.lut = lut.data();
    p.designs = c.designs;
    p.batch = c.batch;
    p.m = c.m;
    p.k = c.k;
    p.n = c.n;
    p.a_batch_stride = c.a_bcast_b ? 0 : c.m * c.k;
    p.a_design_stride = c.a_bcast_d ? 0 : ba * c.m * c.k;
    p.b_batch_stride = c.b_bcast_b ? 0 : c.k * c.n;
    p.b_design_stride = c.b_bcast_d ? 0 : bb * c.k * c.n;
    p.lut_design_stride = c.lut_bcast ? 0 : (int64_t{1} << (2 * c.mbits));
    p.mbits = c.mbits;
  }
  CaseData(const CaseData&) = delete;
  CaseData& operator=(const CaseData&) = delete;
};

}  // namespace gemm_reference
}  // namespace approx_jax

#endif  // APPROX_JAX_TOOLS_GEMM_REFERENCE_H_
