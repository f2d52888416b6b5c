// Scalar math of one simulated approximate multiplication (SPEC section 2).
//
// Shared by the CPU handlers, the CUDA kernels and (through a C API test hook)
// the Python tests, so every backend computes the same bits.
#ifndef APPROX_JAX_XLA_KERNELS_APPROX_MATH_H_
#define APPROX_JAX_XLA_KERNELS_APPROX_MATH_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define APPROX_HD __host__ __device__ __forceinline__
#else
#define APPROX_HD inline
#endif

namespace approx_jax {

constexpr uint32_t kSignMask = 0x80000000u;
constexpr uint32_t kExpMask = 0x7f800000u;
constexpr uint32_t kMantMask = 0x007fffffu;
constexpr uint32_t kInfBits = 0x7f800000u;
// The one NaN every backend returns (positive quiet NaN), so results compare
// bit for bit even when an input NaN carried a payload.
constexpr uint32_t kQuietNaN = 0x7fc00000u;
constexpr int kMinMantissaBits = 1;
constexpr int kMaxMantissaBits = 11;

// Kernel LUT format (what every handler receives, uint32 per entry):
//   entry = (c << 23) | (r << (23 - M))
// so that the product's magnitude bits are simply ((ea + eb - 127) << 23) +
// entry. The Python side converts the stored format (carry in the top bit of a
// uint8/uint16 word, r in the low M bits) into this one inside jit.

APPROX_HD uint32_t FloatBits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

APPROX_HD float BitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Bits of the simulated product of float32 bit patterns `a` and `b` under the
// width-`m` kernel LUT `lut` (4^m entries). `a` indexes the high half of the
// LUT address (SPEC: operand order matters).
APPROX_HD uint32_t ApproxMulBits(uint32_t a, uint32_t b, const uint32_t* lut, int m) {
  const uint32_t s = (a ^ b) & kSignMask;
  const uint32_t ea = (a >> 23) & 0xffu;
  const uint32_t eb = (b >> 23) & 0xffu;
  const uint32_t fa = a & kMantMask;
  const uint32_t fb = b & kMantMask;
  if ((ea == 0xffu && fa != 0) || (eb == 0xffu && fb != 0)) return kQuietNaN;
  if (ea == 0xffu || eb == 0xffu) {
    // Inf times zero or a subnormal (which counts as zero) is NaN.
    return (ea == 0 || eb == 0) ? kQuietNaN : (s | kInfBits);
  }
  if (ea == 0 || eb == 0) return s;  // zero or subnormal operand
  const int e0 = static_cast<int>(ea + eb) - 127;
  // Underflow is flushed before the carry is added (ApproxTrain's simulator).
  if (e0 <= 0) return s;
  const uint32_t idx = ((fa >> (23 - m)) << m) | (fb >> (23 - m));
  // e0 <= 381, so (e0 << 23) + entry < 2^32: no wrap-around.
  const uint32_t mag = (static_cast<uint32_t>(e0) << 23) + lut[idx];
  return (mag >= kInfBits) ? (s | kInfBits) : (s | mag);
}

APPROX_HD float ApproxMul(float a, float b, const uint32_t* lut, int m) {
  return BitsFloat(ApproxMulBits(FloatBits(a), FloatBits(b), lut, m));
}

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_APPROX_MATH_H_
