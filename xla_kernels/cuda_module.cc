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
#include "ffi_problems.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace py = pybind11;

namespace approx_jax {
namespace {

// a: f32[Ga, Ba, M, K], b: f32[Gb, Bb, K, N], lut: u32[Gl, 4^mbits]
// out: f32[D, B, M, N] with each G in {1, D} and each B in {1, B}.
// The plan's scratch (PlanApproxGemm: split-K partial sums, the per-design
// LUT family flags) lives in XLA scratch memory, released by the allocator
// when the handler returns (stream-ordered for XLA).
// family and lut_facts: the CPU kernel's LUT hints (cpu_gemm.h
// GemmProblem::family_hint and lut_facts), bound because the op sends them to
// every platform; the CUDA GEMM checks its LUTs on the device itself
// (cuda_gemm_internal.h), so they are not used here.
ffi::Error GemmImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer a,
                    ffi::AnyBuffer b, ffi::AnyBuffer lut, ffi::AnyBuffer lut_facts,
                    ffi::Result<ffi::AnyBuffer> out, int32_t mbits, int32_t family) {
  (void)family;
  CudaGemmProblem p;
  if (auto err = MakeGemmProblem(a, b, lut, *out, mbits, &p); !err.success()) return err;
  if (auto err = CheckLutFactsShape("approx_jax_gemm: ", lut_facts, lut); !err.success())
    return err;
  CudaGemmPlan plan;
  std::string err = PlanApproxGemm(p, &plan);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, err);
  float* partials = nullptr;
  if (plan.scratch_bytes > 0) {
    std::optional<void*> mem = scratch.Allocate(plan.scratch_bytes, 16);
    if (!mem.has_value() || *mem == nullptr) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted, "approx_jax_gemm: could not allocate " +
                                                                std::to_string(plan.scratch_bytes) +
                                                                " bytes of GEMM scratch");
    }
    partials = static_cast<float*>(*mem);
  }
  err = LaunchApproxGemm(p, plan, partials, stream);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, err);
  return ffi::Error::Success();
}

// lut: u32[G, 4^mbits] -> out: s32[G]. The `approx_jax_lut_facts` target on
// the GPU: every entry "unknown" (-1), since the CUDA GEMM does not read the
// facts; bound so that the op lowers the same on every platform.
ffi::Error LutFactsImpl(cudaStream_t stream, ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out,
                        int32_t mbits) {
  if (auto err = CheckLutFactsCall(lut, mbits, *out); !err.success()) return err;
  // 0xff bytes: int32 -1 (kLutFactsUnknown) in every entry.
  cudaError_t status = cudaMemsetAsync(out->untyped_data(), 0xff, out->size_bytes(), stream);
  if (status != cudaSuccess) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("approx_jax_lut_facts: ") + cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

// a: f32[Ga, n], b: f32[Gb, n], lut: u32[Gl, 4^mbits] -> out: f32[D, n].
ffi::Error MultiplyImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer lut,
                        ffi::Result<ffi::AnyBuffer> out, int32_t mbits) {
  CudaMultiplyProblem p;
  if (auto err = MakeMultiplyProblem(a, b, lut, *out, mbits, &p); !err.success()) return err;
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
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits")
                                  .Attr<int32_t>("family"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxLutFactsCuda, LutFactsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
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
    d["approx_jax_multiply"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxMultiplyCuda));
    d["approx_jax_lut_facts"] =
        py::capsule(reinterpret_cast<void*>(approx_jax::ApproxLutFactsCuda));
    return d;
  });
}
