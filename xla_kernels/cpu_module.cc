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
#include <vector>

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

// The patch-matrix geometry of a convolution input with spatial extents
// `spatial` (nd of them) and `channels` channels (implicit_a.h), with its
// per-tap offsets stored in `tap_offset`. Returns an error message, or "".
std::string ConvGeometry(const int64_t* spatial, int64_t channels, int64_t samples,
                         ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> dilation, bool transposed, ImplicitA* g,
                         std::vector<int64_t>* tap_offset) {
  const int nd = static_cast<int>(window.size());
  if (nd < 1 || nd > kMaxConvDims || strides.size() != window.size() ||
      dilation.size() != window.size()) {
    return "window, strides and dilation need 1 to 3 entries each";
  }
  g->nd = nd;
  g->channels = channels;
  g->samples = samples;
  g->transposed = transposed;
  int64_t in_size = 1;
  int64_t win[kMaxConvDims] = {1, 1, 1}, dil[kMaxConvDims] = {1, 1, 1};
  for (int d = 0; d < nd; ++d) {
    const int slot = kMaxConvDims - nd + d;  // spatial dims fill the trailing slots
    if (window[d] < 1 || strides[d] < 1 || dilation[d] < 1) return "bad window geometry";
    g->in[slot] = spatial[d];
    g->stride[slot] = strides[d];
    win[slot] = window[d];
    dil[slot] = dilation[d];
    const int64_t span = (window[d] - 1) * dilation[d] + 1;
    if (g->in[slot] < span) return "window larger than the padded input";
    g->out[slot] = (g->in[slot] - span) / strides[d] + 1;
    in_size *= g->in[slot];
  }
  g->pixels = g->out[0] * g->out[1] * g->out[2];
  g->image = in_size * channels;
  tap_offset->clear();
  for (int64_t t0 = 0; t0 < win[0]; ++t0)
    for (int64_t t1 = 0; t1 < win[1]; ++t1)
      for (int64_t t2 = 0; t2 < win[2]; ++t2)
        tap_offset->push_back(((t0 * dil[0] * g->in[1] + t1 * dil[1]) * g->in[2] + t2 * dil[2]) *
                              (transposed ? 1 : channels));
  g->tap_offset = tap_offset->data();
  return {};
}

// Runs p (whose a is implicit) on the pool; zero K gives zeros.
ffi::Error RunConvGemm(ffi::ThreadPool& pool, GemmProblem& p) {
  const int64_t out_size = p.designs * p.batch * p.m * p.n;
  if (out_size == 0) return ffi::Error::Success();
  if (p.k == 0) {
    std::fill(p.out, p.out + out_size, 0.0f);
    return ffi::Error::Success();
  }
  std::string err = ApproxGemmCpu(p, MakeParallelFor(&pool));
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, err);
  return ffi::Error::Success();
}

// Convolution forward as a GEMM on the implicit patch matrix (implicit_a.h):
// x: f32[Gx, G, N, S_0 .. S_{nd-1}, C] (padded, lhs-dilated, channels last),
// w: f32[Gw, G, K, O] with K = prod(window) * C (rows in tap-major, channel-
// minor order), lut: u32[Gl, 4^mbits] -> out: f32[D, G, N, P, O], P the
// product of the output extents; the G groups are the GEMM's batch axis.
// CPU only: elsewhere approx_jax builds the patch matrix and calls the GEMM.
ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer lut,
                    ffi::Result<ffi::AnyBuffer> out, int32_t mbits, ffi::Span<const int64_t> window,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation) {
  auto bad = [](const std::string& what) {
    return ffi::Error::InvalidArgument("approx_jax_conv: " + what);
  };
  if (!AllF32(x, w, *out)) return bad("float32 operands only");
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  const int nd = static_cast<int>(window.size());
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (nd < 1 || static_cast<int>(xd.size()) != 4 + nd || wd.size() != 4 || od.size() != 5) {
    return bad("x must have rank 4 + len(window), w rank 4, out rank 5");
  }
  ImplicitA g;
  std::vector<int64_t> tap_offset;
  const std::string geo = ConvGeometry(&xd[3], xd[3 + nd], xd[2], window, strides, dilation,
                                       /*transposed=*/false, &g, &tap_offset);
  if (!geo.empty()) return bad(geo);
  GemmProblem p;
  p.designs = od[0];
  p.batch = od[1];
  p.m = xd[2] * g.pixels;
  p.k = static_cast<int64_t>(tap_offset.size()) * g.channels;
  p.n = od[4];
  p.mbits = mbits;
  if (od[2] != xd[2] || od[3] != g.pixels || wd[1] != p.batch || wd[2] != p.k || wd[3] != p.n ||
      xd[1] != p.batch) {
    return bad("inconsistent shapes (groups, samples, output pixels, K or O)");
  }
  const int64_t x_block = xd[2] * g.image, w_mat = p.k * p.n;
  if (!BroadcastStride(xd[0], p.designs, p.batch * x_block, &p.a_design_stride) ||
      !BroadcastStride(wd[0], p.designs, p.batch * w_mat, &p.b_design_stride) ||
      !BroadcastStride(lut.dimensions()[0], p.designs, lut_size, &p.lut_design_stride)) {
    return bad("design axes must be 1 or match the output");
  }
  p.a_batch_stride = p.batch == 1 ? 0 : x_block;
  p.b_batch_stride = p.batch == 1 ? 0 : w_mat;
  p.a = x.typed_data<float>();
  p.b = w.typed_data<float>();
  p.lut = lut.typed_data<uint32_t>();
  p.out = out->typed_data<float>();
  p.implicit_a = &g;
  return RunConvGemm(pool, p);
}

// A convolution's kernel gradient as a GEMM on the implicit transposed patch
// matrix (patches^T, implicit_a.h): x: f32[Gx, G, C, N, S_0 .. S_{nd-1}]
// (padded, lhs-dilated, channels first), dy: f32[Gd, G, N, P, O], lut ->
// out: f32[D, G, K, O] with K = prod(window) * C: sum over the N * P output
// pixels of P(patch element, dy), the gemm of patches^T with dy.
ffi::Error ConvWgradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                         ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out, int32_t mbits,
                         ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> dilation) {
  auto bad = [](const std::string& what) {
    return ffi::Error::InvalidArgument("approx_jax_conv_wgrad: " + what);
  };
  if (!AllF32(x, dy, *out)) return bad("float32 operands only");
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  const int nd = static_cast<int>(window.size());
  auto xd = x.dimensions(), dd = dy.dimensions(), od = out->dimensions();
  if (nd < 1 || static_cast<int>(xd.size()) != 4 + nd || dd.size() != 5 || od.size() != 4) {
    return bad("x must have rank 4 + len(window), dy rank 5, out rank 4");
  }
  ImplicitA g;
  std::vector<int64_t> tap_offset;
  const std::string geo = ConvGeometry(&xd[4], xd[2], xd[3], window, strides, dilation,
                                       /*transposed=*/true, &g, &tap_offset);
  if (!geo.empty()) return bad(geo);
  GemmProblem p;
  p.designs = od[0];
  p.batch = od[1];
  p.m = static_cast<int64_t>(tap_offset.size()) * g.channels;
  p.k = xd[3] * g.pixels;
  p.n = od[3];
  p.mbits = mbits;
  if (od[2] != p.m || dd[1] != p.batch || dd[2] != xd[3] || dd[3] != g.pixels || dd[4] != p.n ||
      xd[1] != p.batch) {
    return bad("inconsistent shapes (groups, samples, output pixels, K or O)");
  }
  const int64_t x_block = xd[3] * g.image, dy_mat = p.k * p.n;
  if (!BroadcastStride(xd[0], p.designs, p.batch * x_block, &p.a_design_stride) ||
      !BroadcastStride(dd[0], p.designs, p.batch * dy_mat, &p.b_design_stride) ||
      !BroadcastStride(lut.dimensions()[0], p.designs, lut_size, &p.lut_design_stride)) {
    return bad("design axes must be 1 or match the output");
  }
  p.a_batch_stride = p.batch == 1 ? 0 : x_block;
  p.b_batch_stride = p.batch == 1 ? 0 : dy_mat;
  p.a = x.typed_data<float>();
  p.b = dy.typed_data<float>();
  p.lut = lut.typed_data<uint32_t>();
  p.out = out->typed_data<float>();
  p.implicit_a = &g;
  return RunConvGemm(pool, p);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits")
                                  .Attr<ffi::Span<const int64_t>>("window")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("dilation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxConvWgrad, ConvWgradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits")
                                  .Attr<ffi::Span<const int64_t>>("window")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("dilation"));

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
    d["approx_jax_conv"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxConv));
    d["approx_jax_conv_wgrad"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxConvWgrad));
    return d;
  });
}
