/*
 * mbm(M): minimally biased multiplier (Saadat et al., "Minimally Biased
 * Multipliers for Approximate Integer and Floating-Point Multiplication",
 * IEEE TCAD 2018); SPEC section 4, ApproxTrain's MBM_M.bin.
 *
 * A Mitchell-style logarithmic multiplier with two bias-reducing tweaks:
 *   1. the least significant kept bit (weight 2^-M) of each truncated
 *      mantissa fraction is forced to 1, which centres the truncation error;
 *   2. a constant C = 2^-4 + 2^-6 is added to the mantissa sum (halved when
 *      the sum carries), unless that would overflow the mantissa.
 *
 * Functional-model contract: see truncate.c (a, b in [1, 2); return p in
 * [1, 4); the LUT builder truncates p to APPROX_MBITS mantissa bits).
 */
#ifndef APPROX_MBITS
#error "compile with -DAPPROX_MBITS=<mantissa width>"
#endif

#include <math.h>

float mbm_mul(float a, float b) {
  const double lsb = ldexp(1.0, -APPROX_MBITS); /* weight of bit 2^-M */
  const double C = 1.0 / 16.0 + 1.0 / 64.0;     /* 2^-4 + 2^-6 */
  double x = (double)a - 1.0;
  double y = (double)b - 1.0;
  /* Set bit 2^-M: x has exactly M fraction bits, so x / lsb is an integer. */
  double xs = ((long)(x / lsb) | 1L) * lsb;
  double ys = ((long)(y / lsb) | 1L) * lsb;
  double t = xs + ys; /* every step is exact in double */
  double p;
  if (t < 1.0) {
    p = 1.0 + t + C; /* may reach [2, 4): the LUT builder sees the carry */
  } else {
    double g = (t - 1.0) + C / 2.0;
    if (g >= 1.0) g = t - 1.0; /* correction would overflow: skip it */
    p = 2.0 * (1.0 + g);
  }
  return (float)p;
}
