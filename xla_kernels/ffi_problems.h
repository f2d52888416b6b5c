// Operand checks and problem descriptions shared by the CPU and CUDA FFI
// handlers, so both backends accept exactly the same calls and report the
// same errors (same target contract: docs/DESIGN.md).
#ifndef APPROX_JAX_XLA_KERNELS_FFI_PROBLEMS_H_
#define APPROX_JAX_XLA_KERNELS_FFI_PROBLEMS_H_

#include <cstdint>
#include <string>

#include "approx_math.h"
#include "xla/ffi/api/ffi.h"

namespace approx_jax {

namespace ffi = xla::ffi;

inline ffi::Error CheckLut(const ffi::AnyBuffer& lut, int32_t mbits, int64_t* lut_size) {
  if (mbits < kMinMantissaBits || mbits > kMaxMantissaBits) {
    return ffi::Error::InvalidArgument("mbits must be in [1, 11], got " + std::to_string(mbits));
  }
  if (lut.element_type() != ffi::DataType::U32) {
    return ffi::Error::InvalidArgument("LUT operand must be uint32 (kernel format)");
  }
  auto dims = lut.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("LUT operand must be rank 2");
  *lut_size = dims[1];
  if (*lut_size != (int64_t{1} << (2 * mbits))) {
    return ffi::Error::InvalidArgument("LUT has " + std::to_string(*lut_size) +
                                       " entries, expected 4^mbits");
  }
  return ffi::Error::Success();
}

// The `lut_facts` operand of the GEMM and conv targets: s32[Gl], one entry
// per LUT (its values are checked by the CPU handlers, which read them).
inline ffi::Error CheckLutFactsShape(const std::string& target, const ffi::AnyBuffer& facts,
                                     const ffi::AnyBuffer& lut) {
  auto fd = facts.dimensions();
  if (facts.element_type() != ffi::DataType::S32 || fd.size() != 1 ||
      lut.dimensions().size() != 2 || fd[0] != lut.dimensions()[0]) {
    return ffi::Error::InvalidArgument(target + "lut_facts must be int32 [Gl], one per LUT");
  }
  return ffi::Error::Success();
}

// The `approx_jax_lut_facts` target's operands: lut u32[G, 4^mbits] -> out
// s32[G].
inline ffi::Error CheckLutFactsCall(const ffi::AnyBuffer& lut, int32_t mbits,
                                    const ffi::AnyBuffer& out) {
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  auto od = out.dimensions();
  if (out.element_type() != ffi::DataType::S32 || od.size() != 1 || od[0] != lut.dimensions()[0]) {
    return ffi::Error::InvalidArgument("approx_jax_lut_facts: out must be int32 [G], one per LUT");
  }
  return ffi::Error::Success();
}

// Broadcast stride of an axis of size `size` that must be 1 or `full`.
inline bool BroadcastStride(int64_t size, int64_t full, int64_t stride, int64_t* out) {
  if (size == full) {
    *out = (full == 1) ? 0 : stride;
    return true;
  }
  if (size == 1) {
    *out = 0;
    return true;
  }
  return false;
}

inline bool AllF32(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const ffi::AnyBuffer& out) {
  return a.element_type() == ffi::DataType::F32 && b.element_type() == ffi::DataType::F32 &&
         out.element_type() == ffi::DataType::F32;
}

// Fills a GEMM problem (GemmProblem or CudaGemmProblem: same field names) from
// a: f32[Ga, Ba, M, K], b: f32[Gb, Bb, K, N], lut: u32[Gl, 4^mbits],
// out: f32[D, B, M, N], each G in {1, D} and each B in {1, B}.
template <typename Problem>
ffi::Error MakeGemmProblem(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b,
                           const ffi::AnyBuffer& lut, ffi::AnyBuffer& out, int32_t mbits,
                           Problem* p) {
  if (!AllF32(a, b, out)) {
    return ffi::Error::InvalidArgument("approx_jax_gemm supports float32 operands only");
  }
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  auto ad = a.dimensions(), bd = b.dimensions(), od = out.dimensions();
  if (ad.size() != 4 || bd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("approx_jax_gemm expects rank-4 operands");
  }
  p->designs = od[0];
  p->batch = od[1];
  p->m = od[2];
  p->n = od[3];
  p->k = ad[3];
  p->mbits = mbits;
  if (ad[2] != p->m || bd[2] != p->k || bd[3] != p->n) {
    return ffi::Error::InvalidArgument("approx_jax_gemm: inconsistent M/K/N");
  }
  const int64_t a_mat = p->m * p->k, b_mat = p->k * p->n;
  const bool ok = BroadcastStride(ad[0], p->designs, ad[1] * a_mat, &p->a_design_stride) &&
                  BroadcastStride(ad[1], p->batch, a_mat, &p->a_batch_stride) &&
                  BroadcastStride(bd[0], p->designs, bd[1] * b_mat, &p->b_design_stride) &&
                  BroadcastStride(bd[1], p->batch, b_mat, &p->b_batch_stride) &&
                  BroadcastStride(lut.dimensions()[0], p->designs, lut_size, &p->lut_design_stride);
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "approx_jax_gemm: design/batch axes must be 1 or match the output");
  }
  p->a = a.typed_data<float>();
  p->b = b.typed_data<float>();
  p->lut = lut.typed_data<uint32_t>();
  p->out = out.typed_data<float>();
  return ffi::Error::Success();
}

// out[d, i] = P(a[d * a_design_stride + i], b[d * b_design_stride + i]) under
// lut + d * lut_design_stride.
struct MultiplyProblem {
  const float* a = nullptr;
  const float* b = nullptr;
  const uint32_t* lut = nullptr;
  float* out = nullptr;
  int64_t designs = 1, n = 0;
  int64_t a_design_stride = 0, b_design_stride = 0, lut_design_stride = 0;
  int mbits = 7;
};

// Fills a multiply problem (MultiplyProblem or CudaMultiplyProblem) from
// a: f32[Ga, n], b: f32[Gb, n], lut: u32[Gl, 4^mbits], out: f32[D, n].
template <typename Problem>
ffi::Error MakeMultiplyProblem(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b,
                               const ffi::AnyBuffer& lut, ffi::AnyBuffer& out, int32_t mbits,
                               Problem* p) {
  if (!AllF32(a, b, out)) {
    return ffi::Error::InvalidArgument("approx_jax_multiply supports float32 operands only");
  }
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  auto ad = a.dimensions(), bd = b.dimensions(), od = out.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || od.size() != 2 || ad[1] != od[1] || bd[1] != od[1]) {
    return ffi::Error::InvalidArgument("approx_jax_multiply: bad operand shapes");
  }
  p->designs = od[0];
  p->n = od[1];
  p->mbits = mbits;
  if (!BroadcastStride(ad[0], p->designs, p->n, &p->a_design_stride) ||
      !BroadcastStride(bd[0], p->designs, p->n, &p->b_design_stride) ||
      !BroadcastStride(lut.dimensions()[0], p->designs, lut_size, &p->lut_design_stride)) {
    return ffi::Error::InvalidArgument("approx_jax_multiply: bad design axes");
  }
  p->a = a.typed_data<float>();
  p->b = b.typed_data<float>();
  p->lut = lut.typed_data<uint32_t>();
  p->out = out.typed_data<float>();
  return ffi::Error::Success();
}

}  // namespace approx_jax

#endif  // APPROX_JAX_XLA_KERNELS_FFI_PROBLEMS_H_
