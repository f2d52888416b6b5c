// Straightforward reference-speed kernel: one SPEC product per
// multiply-accumulate, k summed in ascending order.
#include "cpu_gemm.h"

#include "approx_math.h"

namespace approx_jax {

std::string ApproxGemmCpu(const GemmProblem& p, const ParallelFor& parallel_for) {
  const int64_t rows = p.designs * p.batch * p.m;
  if (rows == 0 || p.n == 0) return {};
  constexpr int64_t kRowsPerTask = 8;
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(tasks, [&](int64_t task) {
    const int64_t row_end = std::min(rows, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < row_end; ++row) {
      const int64_t i = row % p.m;
      const int64_t db = row / p.m;
      const int64_t bi = db % p.batch;
      const int64_t d = db / p.batch;
      const float* a_row = p.a + d * p.a_design_stride + bi * p.a_batch_stride + i * p.k;
      const float* b_mat = p.b + d * p.b_design_stride + bi * p.b_batch_stride;
      const uint32_t* lut = p.lut + d * p.lut_design_stride;
      float* out_row = p.out + row * p.n;
      for (int64_t j = 0; j < p.n; ++j) {
        float acc = 0.0f;
        for (int64_t kk = 0; kk < p.k; ++kk) {
          acc += ApproxMul(a_row[kk], b_mat[kk * p.n + j], lut, p.mbits);
        }
        out_row[j] = acc;
      }
    }
  });
  return {};
}

}  // namespace approx_jax
