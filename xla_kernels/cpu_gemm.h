// CPU implementation of the batched approximate GEMM behind the
// `approx_jax_gemm` FFI target (independent of XLA so it can be unit-tested
// and benchmarked on its own).
#ifndef APPROX_JAX_XLA_KERNELS_CPU_GEMM_H_
#define APPROX_JAX_XLA_KERNELS_CPU_GEMM_H_

#include <cstdint>
#include <functional>
#include <string>

#include "implicit_a.h"

namespace approx_jax {

// out[d, b, i, j] = sum_k P(a[d, b, i, k], w[d, b, k, j]) with P the SPEC
// product under lut[d]. Operands broadcast over the design axis d and the
// batch axis b through zero strides. All strides are in elements; rows are
// contiguous (a: [M, K] row-major, b: [K, N] row-major, out: [M, N]).
struct GemmProblem {
  const float* a = nullptr;
  const float* b = nullptr;
  const uint32_t* lut = nullptr;  // kernel format, see approx_math.h
  float* out = nullptr;
  int64_t designs = 1, batch = 1, m = 0, k = 0, n = 0;
  int64_t a_design_stride = 0, a_batch_stride = 0;
  int64_t b_design_stride = 0, b_batch_stride = 0;
  int64_t lut_design_stride = 0;
  int mbits = 7;
  // The caller's word on the LUT (one design): a LutFamily (lut_family.h)
  // whose closed form equals it entry for entry (kFamilyNone: none does), or
  // -1 when unknown. Given, the kernel trusts it instead of checking 4^M
  // entries per call (0.4-0.9 ms at M = 11). The Python side derives it from
  // the concrete LUT at trace time (ops.closed_form_family). Every family is
  // symmetric, so it holds for the transposed LUT too.
  int family_hint = -1;
  // Optional, one int32 per distinct LUT (indexed like the LUTs: by design,
  // or entry 0 when lut_design_stride is 0): lut_family.h's LUT facts, from
  // the `approx_jax_lut_facts` target; kLutFactsUnknown entries (or null)
  // leave the checks to the kernel. They hold for the transposed LUT too.
  // Used when family_hint is -1.
  const int32_t* lut_facts = nullptr;
  // When set, a is a convolution's patch matrix read in place (implicit_a.h):
  // `a` and its design/batch strides address the padded channels-last input,
  // and a[i, k] is the patch element, never stored.
  const ImplicitA* implicit_a = nullptr;
  // When > 0, b is stored transposed: b[k, j] = b[j * b_plain_ld + k] (a
  // matrix-vector product's matrix, read in place as the right operand of
  // its transposed problem; cpu_gemm.cc). Only the direct and the scalar
  // kernels take such a problem.
  int64_t b_plain_ld = 0;
};

// Runs fn(0) ... fn(num_tasks - 1), possibly concurrently; returns when all
// have finished. Tasks must write disjoint memory.
using ParallelFor = std::function<void(int64_t num_tasks, const std::function<void(int64_t)>& fn)>;

// Returns an empty string on success, else an error message (for example when
// a scratch allocation fails). Summation order is fixed by the shapes alone,
// so results do not depend on the number of threads.
std::string ApproxGemmCpu(const GemmProblem& p, const ParallelFor& parallel_for);

// The LUT facts (lut_family.h) of `luts` width-mbits kernel-format LUTs laid
// out one after another, one int32 each into `facts`.
void LutFactsCpu(const uint32_t* lut, int64_t luts, int mbits, int32_t* facts,
                 const ParallelFor& parallel_for);

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_CPU_GEMM_H_
