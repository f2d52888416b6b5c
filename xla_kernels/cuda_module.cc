// XLA FFI handlers for the CUDA backend and their pybind11 registration.
//
// Same target names, operand shapes, broadcast rules, attribute and error
// checks as the CPU handlers (cpu_module.cc); the work is done by the kernels
// in cuda_kernels.cu on the stream XLA hands us. Importing this module makes
// no CUDA call (cudart is linked statically), so it imports on machines
// without a GPU.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "approx_math.h"
#include "cuda_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace py = pybind11;

namespace approx_jax {
namespace {

ffi::Error CheckLut(const ffi::AnyBuffer& lut, int32_t mbits, int64_t* lut_size) {
  if (mbits < kMinMantissaBits || mbits > kMaxMantissaBits) {
    return ffi::Error::InvalidArgument("mbits must be in [1, 11], got " +
                                       std::to_string(mbits));
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

// Broadcast stride of an axis of size `size` that must be 1 or `full`.
bool BroadcastStride(int64_t size, int64_t full, int64_t stride, int64_t* out) {
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

// a: f32[Ga, Ba, M, K], b: f32[Gb, Bb, K, N], lut: u32[Gl, 4^mbits]
// out: f32[D, B, M, N] with each G in {1, D} and each B in {1, B}.
// Split-K partial sums (PlanApproxGemm) live in XLA scratch memory, released
// by the allocator when the handler returns (stream-ordered for XLA).
ffi::Error GemmImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer a,
                    ffi::AnyBuffer b, ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out,
                    int32_t mbits) {
  if (a.element_type() != ffi::DataType::F32 || b.element_type() != ffi::DataType::F32 ||
      out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("approx_jax_gemm supports float32 operands only");
  }
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (ad.size() != 4 || bd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument("approx_jax_gemm expects rank-4 operands");
  }
  CudaGemmProblem p;
  p.designs = od[0];
  p.batch = od[1];
  p.m = od[2];
  p.n = od[3];
  p.k = ad[3];
  p.mbits = mbits;
  if (ad[2] != p.m || bd[2] != p.k || bd[3] != p.n) {
    return ffi::Error::InvalidArgument("approx_jax_gemm: inconsistent M/K/N");
  }
  const int64_t a_mat = p.m * p.k, b_mat = p.k * p.n;
  bool ok = BroadcastStride(ad[0], p.designs, ad[1] * a_mat, &p.a_design_stride) &&
            BroadcastStride(ad[1], p.batch, a_mat, &p.a_batch_stride) &&
            BroadcastStride(bd[0], p.designs, bd[1] * b_mat, &p.b_design_stride) &&
            BroadcastStride(bd[1], p.batch, b_mat, &p.b_batch_stride) &&
            BroadcastStride(lut.dimensions()[0], p.designs, lut_size, &p.lut_design_stride);
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "approx_jax_gemm: design/batch axes must be 1 or match the output");
  }
  p.a = a.typed_data<float>();
  p.b = b.typed_data<float>();
  p.lut = lut.typed_data<uint32_t>();
  p.out = out->typed_data<float>();
  CudaGemmPlan plan;
  std::string err = PlanApproxGemm(p, &plan);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, err);
  float* partials = nullptr;
  if (plan.scratch_bytes > 0) {
    std::optional<void*> mem = scratch.Allocate(plan.scratch_bytes, 16);
    if (!mem.has_value() || *mem == nullptr) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "approx_jax_gemm: could not allocate " +
                            std::to_string(plan.scratch_bytes) + " bytes of split-K scratch");
    }
    partials = static_cast<float*>(*mem);
  }
  err = LaunchApproxGemm(p, plan, partials, stream);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, err);
  return ffi::Error::Success();
}

// a: f32[Ga, n], b: f32[Gb, n], lut: u32[Gl, 4^mbits] -> out: f32[D, n].
ffi::Error MultiplyImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b,
                        ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out, int32_t mbits) {
  if (a.element_type() != ffi::DataType::F32 || b.element_type() != ffi::DataType::F32 ||
      out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("approx_jax_multiply supports float32 operands only");
  }
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || od.size() != 2 || ad[1] != od[1] ||
      bd[1] != od[1]) {
    return ffi::Error::InvalidArgument("approx_jax_multiply: bad operand shapes");
  }
  CudaMultiplyProblem p;
  p.designs = od[0];
  p.n = od[1];
  p.mbits = mbits;
  if (!BroadcastStride(ad[0], p.designs, p.n, &p.a_design_stride) ||
      !BroadcastStride(bd[0], p.designs, p.n, &p.b_design_stride) ||
      !BroadcastStride(lut.dimensions()[0], p.designs, lut_size, &p.lut_design_stride)) {
    return ffi::Error::InvalidArgument("approx_jax_multiply: bad design axes");
  }
  p.a = a.typed_data<float>();
  p.b = b.typed_data<float>();
  p.lut = lut.typed_data<uint32_t>();
  p.out = out->typed_data<float>();
  std::string err = LaunchApproxMultiply(p, stream);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxGemmCuda, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxMultiplyCuda, MultiplyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits"));

}  // namespace approx_jax

PYBIND11_MODULE(_cuda_kernels, m) {
  m.doc() = "approx_jax CUDA XLA FFI handlers";
  m.def("registrations", []() {
    py::dict d;
    d["approx_jax_gemm"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxGemmCuda));
    d["approx_jax_multiply"] =
        py::capsule(reinterpret_cast<void*>(approx_jax::ApproxMultiplyCuda));
    return d;
  });
}
