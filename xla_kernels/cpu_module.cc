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
ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                    ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out,
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
  GemmProblem p;
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
                        ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out,
                        int32_t mbits) {
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
  const int64_t designs = od[0], n = od[1];
  int64_t sa = 0, sb = 0, sl = 0;
  if (!BroadcastStride(ad[0], designs, n, &sa) || !BroadcastStride(bd[0], designs, n, &sb) ||
      !BroadcastStride(lut.dimensions()[0], designs, lut_size, &sl)) {
    return ffi::Error::InvalidArgument("approx_jax_multiply: bad design axes");
  }
  const float* pa = a.typed_data<float>();
  const float* pb = b.typed_data<float>();
  const uint32_t* pl = lut.typed_data<uint32_t>();
  float* po = out->typed_data<float>();
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks_per_design = (n + kChunk - 1) / kChunk;
  MakeParallelFor(&pool)(designs * chunks_per_design, [&](int64_t task) {
    const int64_t d = task / chunks_per_design;
    const int64_t begin = (task % chunks_per_design) * kChunk;
    const int64_t end = std::min(n, begin + kChunk);
    const float* da = pa + d * sa;
    const float* db = pb + d * sb;
    const uint32_t* dl = pl + d * sl;
    float* dout = po + d * n;
    for (int64_t i = begin; i < end; ++i) dout[i] = ApproxMul(da[i], db[i], dl, mbits);
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
    d["approx_jax_multiply"] =
        py::capsule(reinterpret_cast<void*>(approx_jax::ApproxMultiply));
    return d;
  });
}
