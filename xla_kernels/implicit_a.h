// The patch matrix of a convolution read in place ("implicit GEMM"): the `a`
// operand of GemmProblem when GemmProblem::implicit_a is set.
//
// A convolution's im2col matrix has a row per output pixel (n, o_0, o_1, o_2)
// and a column per (tap, channel) k = ((t_0 * W_1 + t_1) * W_2 + t_2) * C + c:
//   a[row, k] = x[n, o_0 * s_0 + t_0 * d_0, o_1 * s_1 + t_1 * d_1,
//                 o_2 * s_2 + t_2 * d_2, c]
// with x the (already padded and lhs-dilated) channels-last input. Building it
// costs prod(window) times the input in memory traffic (for LeNet-5's second
// conv, 40 MB per batch of 64 and a third of the forward time); the kernels
// instead copy the few rows x k-block strips they pack (GatherPatchRows) from
// x, which stays in cache. The values, and therefore the products and sums,
// are the same as with the materialised matrix.
#ifndef APPROX_JAX_XLA_KERNELS_IMPLICIT_A_H_
#define APPROX_JAX_XLA_KERNELS_IMPLICIT_A_H_

#include <cstdint>

namespace approx_jax {

constexpr int kMaxConvDims = 3;

//
// `transposed`: the patch matrix transposed, a^T[k, row] (the kernel
// gradient's left operand, patches^T: a row per (tap, channel), a column per
// output pixel), read from a channels-first input x[c, n, h_0, h_1, h_2].

// Geometry of one implicit patch matrix. The nd spatial dimensions take the
// trailing slots of the 3 (a 2-D conv uses slots 1 and 2); unused slots have
// extent, window, stride and dilation 1. `tap_offset` (prod(window) entries, owned by the
// caller) holds each tap's offset in floats: ((t_0 d_0 S_1 + t_1 d_1) S_2 +
// t_2 d_2) * C channels last, without the factor C when transposed.
struct ImplicitA {
  int nd = 0;
  int64_t in[kMaxConvDims] = {1, 1, 1};   // input extents (padded)
  int64_t out[kMaxConvDims] = {1, 1, 1};  // output extents
  int64_t stride[kMaxConvDims] = {1, 1, 1};
  int64_t channels = 1;  // C: channels per group
  int64_t pixels = 1;    // prod(out): output pixels per sample
  int64_t image = 1;     // prod(in) * C: floats per sample (channels last)
  const int64_t* tap_offset = nullptr;
  bool transposed = false;
  int64_t samples = 1;  // N (transposed: a channel's plane holds N * prod(in) floats)
  // Not a patch matrix: when > 0, a plain matrix read transposed, a[i, kk] =
  // x[kk * plain_ld + i] (the transposed problem's a is the original b,
  // cpu_gemm.cc GemmTransposed, read in place instead of copied).
  int64_t plain_ld = 0;
};

// Offset in floats of row i's first element (tap 0, channel 0) in x.
inline int64_t PatchRowBase(const ImplicitA& g, int64_t i) {
  const int64_t n = i / g.pixels;
  int64_t q = i - n * g.pixels;
  const int64_t o2 = q % g.out[2];
  q /= g.out[2];
  const int64_t o1 = q % g.out[1];
  const int64_t o0 = q / g.out[1];
  return n * g.image +
         ((o0 * g.stride[0] * g.in[1] + o1 * g.stride[1]) * g.in[2] + o2 * g.stride[2]) *
             g.channels;
}

// Copies a run: d[e] = s[e * stride] for e < len. The kernels pass a vector
// version (which may write past d + len: they give the strip the room).
struct ScalarRunCopy {
  void operator()(float* d, const float* s, int64_t len, int64_t stride) const {
    for (int64_t e = 0; e < len; ++e) d[e] = s[e * stride];
  }
};

// dst[r * ld + kk] = a[i0 + r, k0 + kk] for r < rows, kk < kb: per row, runs
// of consecutive channels of one tap, each a contiguous copy from x.
// (always_inline: the kernels' vector `copy` must inline into their ISA.)
template <class Copy = ScalarRunCopy>
__attribute__((always_inline)) inline void GatherPatchRows(const ImplicitA& g, const float* x,
                                                           int64_t i0, int rows, int64_t k0, int kb,
                                                           float* dst, int64_t ld,
                                                           const Copy& copy = Copy()) {
  const int64_t c_len = g.channels;
  for (int r = 0; r < rows; ++r) {
    const float* row = x + PatchRowBase(g, i0 + r);
    float* d = dst + r * ld;
    int64_t tap = k0 / c_len, c = k0 - tap * c_len;
    for (int64_t kk = 0; kk < kb;) {
      const int64_t len = c_len - c < kb - kk ? c_len - c : kb - kk;
      copy(d + kk, row + g.tap_offset[tap] + c, len, 1);
      kk += len;
      ++tap;
      c = 0;
    }
  }
}

// Transposed: dst[r * ld + kk] = patches^T[i0 + r, k0 + kk], row (tap,
// channel) = i0 + r, column = output pixel k0 + kk; per row, runs along the
// last spatial dimension (contiguous for stride 1).
template <class Copy = ScalarRunCopy>
__attribute__((always_inline)) inline void GatherPatchRowsT(const ImplicitA& g, const float* x,
                                                            int64_t i0, int rows, int64_t k0,
                                                            int kb, float* dst, int64_t ld,
                                                            const Copy& copy = Copy()) {
  const int64_t in_size = g.in[0] * g.in[1] * g.in[2];
  const int64_t plane = g.samples * in_size;
  const int64_t s2 = g.stride[2];
  // The first pixel's coordinates.
  const int64_t n0 = k0 / g.pixels;
  int64_t q0 = k0 - n0 * g.pixels;
  const int64_t p2 = q0 % g.out[2];
  q0 /= g.out[2];
  const int64_t p1 = q0 % g.out[1], p0 = q0 / g.out[1];
  for (int r = 0; r < rows; ++r) {
    const int64_t row = i0 + r;
    const int64_t tap = row / g.channels, c = row - tap * g.channels;
    const float* base = x + c * plane + g.tap_offset[tap];
    float* d = dst + r * ld;
    int64_t n = n0, o0 = p0, o1 = p1, o2 = p2;
    for (int64_t kk = 0; kk < kb;) {
      const int64_t len = g.out[2] - o2 < kb - kk ? g.out[2] - o2 : kb - kk;
      const float* src =
          base + n * in_size + (o0 * g.stride[0] * g.in[1] + o1 * g.stride[1]) * g.in[2] + o2 * s2;
      copy(d + kk, src, len, s2);
      kk += len;
      o2 = 0;
      if (++o1 == g.out[1]) {
        o1 = 0;
        if (++o0 == g.out[0]) {
          o0 = 0;
          ++n;
        }
      }
    }
  }
}

// Plain (plain_ld > 0): dst[r * ld + kk] = x[(k0 + kk) * plain_ld + i0 + r],
// a rows-wide run of each of the kb rows of x.
__attribute__((always_inline)) inline void GatherPlainRowsT(const ImplicitA& g, const float* x,
                                                            int64_t i0, int rows, int64_t k0,
                                                            int kb, float* dst, int64_t ld) {
  for (int kk = 0; kk < kb; ++kk) {
    const float* src = x + (k0 + kk) * g.plain_ld + i0;
    for (int r = 0; r < rows; ++r) dst[r * ld + kk] = src[r];
  }
}

// The rows x k-block strip of any form.
template <class Copy = ScalarRunCopy>
__attribute__((always_inline)) inline void GatherImplicitA(const ImplicitA& g, const float* x,
                                                           int64_t i0, int rows, int64_t k0, int kb,
                                                           float* dst, int64_t ld,
                                                           const Copy& copy = Copy()) {
  if (g.plain_ld > 0)
    GatherPlainRowsT(g, x, i0, rows, k0, kb, dst, ld);
  else if (g.transposed)
    GatherPatchRowsT(g, x, i0, rows, k0, kb, dst, ld, copy);
  else
    GatherPatchRows(g, x, i0, rows, k0, kb, dst, ld, copy);
}

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_IMPLICIT_A_H_
