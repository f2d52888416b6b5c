/*
 * truncate(M): exact multiplication of operands truncated to M mantissa bits,
 * with the result truncated to M mantissa bits (SPEC section 4).
 * truncate(7) is bfloat16-style multiplication (ApproxTrain's ACC_7.bin).
 *
 * Functional-model contract (SPEC section 3), shared by every model in this
 * directory and by user models loaded with approx_jax.from_c:
 *   - the function takes two mantissas a = 1 + i/2^M and b = 1 + j/2^M in
 *     [1, 2) and returns their (approximate) product p in [1, 4);
 *   - the LUT builder keeps the carry (p >= 2) and the top M bits of p's
 *     float32 mantissa field, i.e. it truncates the result itself;
 *   - the mantissa width M arrives as the macro APPROX_MBITS
 *     (approx_jax passes -DAPPROX_MBITS=M when it compiles the model).
 * Copy this file, rename the function and edit the arithmetic to model your
 * own multiplier.
 */
#ifndef APPROX_MBITS
#error "compile with -DAPPROX_MBITS=<mantissa width>"
#endif

float truncate_mul(float a, float b) {
  /* a and b have at most M <= 11 fraction bits, so the product has at most
   * 24 significant bits: exact in double, and exact again when converted to
   * float on return (no rounding can carry into the kept M bits). */
  double p = (double)a * (double)b;
  return (float)p;
}
