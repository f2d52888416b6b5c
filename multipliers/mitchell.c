/*
 * mitchell(M): Mitchell's logarithmic multiplier (SPEC section 4;
 * ApproxTrain's MIT_M.bin).
 *
 * With a = 1 + x and b = 1 + y, log2(a) ~= x and log2(b) ~= y, so
 * log2(a*b) ~= t = x + y and the antilogarithm is approximated linearly:
 *   p = 1 + t   if t < 1   (no carry),
 *   p = 2 * t   otherwise  (carry: 2^(1 + (t - 1)) ~= 2 * (1 + (t - 1))).
 *
 * Functional-model contract: see truncate.c (a, b in [1, 2); return p in
 * [1, 4); the LUT builder truncates p to APPROX_MBITS mantissa bits).
 */
#ifndef APPROX_MBITS
#error "compile with -DAPPROX_MBITS=<mantissa width>"
#endif

float mitchell_mul(float a, float b) {
  double x = (double)a - 1.0; /* mantissa fractions, exact */
  double y = (double)b - 1.0;
  double t = x + y; /* exact: both have at most M fraction bits */
  double p = (t < 1.0) ? 1.0 + t : 2.0 * t;
  return (float)p;
}
