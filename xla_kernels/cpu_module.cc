// XLA FFI handlers for the CPU backend and their pybind11 registration.
//
// One target per op; operand dtypes are checked (dispatched) inside. Shapes
// come from the buffers themselves, so a LUT or a design stack of any size
// travels as an ordinary operand and never forces a recompile.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "approx_math.h"
#include "cpu_gemm.h"
#include "ffi_problems.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace py = pybind11;

namespace approx_jax {
namespace {

// Work sharing on XLA's intra-op pool that never blocks inside a pool task:
// the calling thread and the pool tasks all pull task indices from one atomic
// counter; the caller then waits only for indices that were already claimed
// (whose tasks are running), so a pool of one thread, or tasks run inline,
// cannot deadlock.
struct SharedWork {
  std::function<void(int64_t)> fn;
  int64_t num_tasks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) {
      fn(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ParallelFor MakeParallelFor(ffi::ThreadPool* pool) {
  return [pool](int64_t num_tasks, const std::function<void(int64_t)>& fn) {
    if (num_tasks <= 0) return;
    const int64_t workers =
        pool == nullptr ? 0 : std::min<int64_t>(pool->num_threads(), num_tasks - 1);
    if (workers <= 0) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    auto work = std::make_shared<SharedWork>();
    work->fn = fn;
    work->num_tasks = num_tasks;
    for (int64_t w = 0; w < workers; ++w) {
      pool->Schedule([work] { work->Drain(); });
    }
    work->Drain();
    while (work->done.load(std::memory_order_acquire) < num_tasks) {
      std::this_thread::yield();
    }
  };
}

// a: f32[Ga, Ba, M, K], b: f32[Gb, Bb, K, N], lut: u32[Gl, 4^mbits]
// out: f32[D, B, M, N] with each G in {1, D} and each B in {1, B}.
ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer lut,
                    ffi::Result<ffi::AnyBuffer> out, int32_t mbits) {
  GemmProblem p;
  if (auto err = MakeGemmProblem(a, b, lut, *out, mbits, &p); !err.success()) return err;
  const int64_t out_size = p.designs * p.batch * p.m * p.n;
  if (p.k == 0) {
    std::fill(p.out, p.out + out_size, 0.0f);  // XLA does not zero outputs
    return ffi::Error::Success();
  }
  std::string err = ApproxGemmCpu(p, MakeParallelFor(&pool));
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, err);
  return ffi::Error::Success();
}

// a: f32[Ga, n], b: f32[Gb, n], lut: u32[Gl, 4^mbits] -> out: f32[D, n].
ffi::Error MultiplyImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                        ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out, int32_t mbits) {
  MultiplyProblem p;
  if (auto err = MakeMultiplyProblem(a, b, lut, *out, mbits, &p); !err.success()) return err;
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks_per_design = (p.n + kChunk - 1) / kChunk;
  MakeParallelFor (&pool)(p.designs* chunks_per_design, [&](int64_t task) {
    const int64_t d = task / chunks_per_design;
    const int64_t begin = (task % chunks_per_design) * kChunk;
    const int64_t end = std::min(p.n, begin + kChunk);
    const float* da = p.a + d * p.a_design_stride;
    const float* db = p.b + d * p.b_design_stride;
    const uint32_t* dl = p.lut + d * p.lut_design_stride;
    float* dout = p.out + d * p.n;
    for (int64_t i = begin; i < end; ++i) dout[i] = ApproxMul(da[i], db[i], dl, p.mbits);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxMultiply, MultiplyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits"));

}  // namespace approx_jax

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "approx_jax CPU XLA FFI handlers";
  m.def("registrations", []() {
    py::dict d;
    d["approx_jax_gemm"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxGemm));
    d["approx_jax_multiply"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxMultiply));
    return d;
  });
}
