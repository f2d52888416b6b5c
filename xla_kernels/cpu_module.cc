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
#include "lut_family.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define APPROX_JAX_HAS_MXCSR 1
#endif

namespace ffi = xla::ffi;
namespace py = pybind11;

namespace approx_jax {
namespace {

// XLA:CPU runs its computations with denormals flushed (MXCSR FTZ and DAZ),
// and our kernels run on its threads. SPEC section 5 sums the products in
// IEEE float32: a partial sum that cancels into the subnormal range must
// keep its value (1.5 * 2^-126 - 1.25 * 2^-126 = 2^-128, not 0), as in the
// CUDA kernels (fma.rn / add.rn without .ftz) and the float64 reference
// bound. So every thread clears FTZ/DAZ while it runs kernel work and
// restores XLA's mode afterwards. Products do not depend on the mode: SPEC
// flushes subnormal operands and underflowing products explicitly.
class IeeeSubnormals {
 public:
#ifdef APPROX_JAX_HAS_MXCSR
  IeeeSubnormals() : saved_(_mm_getcsr()) {
    constexpr unsigned kFtz = 1u << 15, kDaz = 1u << 6;
    if (saved_ & (kFtz | kDaz)) _mm_setcsr(saved_ & ~(kFtz | kDaz));
  }
  ~IeeeSubnormals() {
    if (_mm_getcsr() != saved_) _mm_setcsr(saved_);
  }

 private:
  unsigned saved_;
#else
  // Other hosts: the kernels run in the thread's mode (XLA flushes on
  // aarch64 too: FPCR.FZ; not handled, no such build is tested).
  IeeeSubnormals() {}
  ~IeeeSubnormals() {}
#endif
};

// Work sharing on XLA's intra-op pool that never blocks inside a pool task:
// the calling thread and the pool tasks all pull task indices from one atomic
// counter; the caller then waits only for indices that were already claimed
// (whose tasks are running), so a pool of one thread, or tasks run inline,
// cannot deadlock.
//
// The caller counts as one of the pool's threads: num_threads() - 1 pool
// tasks join it. (XLA's intra-op pool has a thread per core and the caller,
// XLA's executing thread, is one more: with num_threads() pool tasks a 2-core
// machine ran 3 threads, and the 4 tasks of a 1024^3 GEMM ran 3 at a time
// and then 1 alone. Measured in-process, alternated, 15 rounds of 3 calls,
// ms, before vs after: 1024^3 mbm3 44.4 vs 38.4, mbm7 67.3 vs 63.7;
// 8192x576x64 mbm7 19.3 vs 16.6, mbm3 13.7 vs 14.0.)
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
        pool == nullptr ? 0 : std::min<int64_t>(pool->num_threads() - 1, num_tasks - 1);
    if (workers <= 0) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    auto work = std::make_shared<SharedWork>();
    work->fn = fn;
    work->num_tasks = num_tasks;
    for (int64_t w = 0; w < workers; ++w) {
      pool->Schedule([work] {
        IeeeSubnormals ieee;
        work->Drain();
      });
    }
    work->Drain();
    while (work->done.load(std::memory_order_acquire) < num_tasks) {
      std::this_thread::yield();
    }
  };
}

// Runs p on the pool (the GEMM and both conv targets); zero K gives zeros.
ffi::Error RunGemm(ffi::ThreadPool& pool, GemmProblem& p) {
  const int64_t out_size = p.designs * p.batch * p.m * p.n;
  if (out_size == 0) return ffi::Error::Success();
  IeeeSubnormals ieee;  // this thread's share of the work (pool tasks set their own)
  if (p.k == 0) {
    std::fill(p.out, p.out + out_size, 0.0f);  // XLA does not zero outputs
    return ffi::Error::Success();
  }
  std::string err = ApproxGemmCpu(p, MakeParallelFor(&pool));
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kResourceExhausted, err);
  return ffi::Error::Success();
}

// The `family` attribute of the GEMM and conv targets (GemmProblem::family_hint).
ffi::Error CheckFamily(const std::string& target, int32_t family) {
  if (family < -1 || family > kFamilyMbm) {
    return ffi::Error::InvalidArgument(target + "family must be -1 (unknown) to " +
                                       std::to_string(static_cast<int>(kFamilyMbm)) + ", got " +
                                       std::to_string(family));
  }
  return ffi::Error::Success();
}

// The `lut_facts` operand of the GEMM and conv targets: s32[Gl], one entry
// per LUT (GemmProblem::lut_facts), each kLutFactsUnknown or facts.
ffi::Error CheckLutFacts(const std::string& target, const ffi::AnyBuffer& facts,
                         const ffi::AnyBuffer& lut, int32_t mbits, const int32_t** out) {
  if (auto err = CheckLutFactsShape(target, facts, lut); !err.success()) return err;
  auto fd = facts.dimensions();
  const int32_t* v = facts.typed_data<int32_t>();
  constexpr int32_t kFlags = kLutFactsKernelFormat | kLutFactsLowBitsClear;
  for (int64_t d = 0; d < fd[0]; ++d) {
    if (v[d] == kLutFactsUnknown) continue;
    // A family implies both flags (its entries are in kernel format); a
    // narrowing s needs a family, at a width of at least one bit (MBM's
    // closed form: kMbmMinBits).
    const int32_t family = v[d] & kLutFactsFamilyMask;
    const int32_t s = (v[d] >> kLutFactsNarrowingShift) & kLutFactsNarrowingMask;
    if (v[d] < 0 || (v[d] >> 8) != 0 || (family != kFamilyNone && (v[d] & kFlags) != kFlags) ||
        (s > 0 && (family == kFamilyNone || s >= mbits)) ||
        (family == kFamilyMbm && mbits - s < kMbmMinBits)) {
      return ffi::Error::InvalidArgument(target +
                                         "lut_facts entry out of range: " + std::to_string(v[d]));
    }
  }
  *out = v;
  return ffi::Error::Success();
}

// a: f32[Ga, Ba, M, K], b: f32[Gb, Bb, K, N], lut: u32[Gl, 4^mbits],
// lut_facts: s32[Gl] -> out: f32[D, B, M, N] with each G in {1, D} and each
// B in {1, B}. family: GemmProblem::family_hint (-1 = unknown).
ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer lut,
                    ffi::AnyBuffer lut_facts, ffi::Result<ffi::AnyBuffer> out, int32_t mbits,
                    int32_t family) {
  GemmProblem p;
  if (auto err = MakeGemmProblem(a, b, lut, *out, mbits, &p); !err.success()) return err;
  if (auto err = CheckFamily("approx_jax_gemm: ", family); !err.success()) return err;
  if (auto err = CheckLutFacts("approx_jax_gemm: ", lut_facts, lut, mbits, &p.lut_facts);
      !err.success())
    return err;
  p.family_hint = family;
  return RunGemm(pool, p);
}

// lut: u32[G, 4^mbits] -> out: s32[G], each LUT's facts (lut_family.h).
ffi::Error LutFactsImpl(ffi::ThreadPool pool, ffi::AnyBuffer lut, ffi::Result<ffi::AnyBuffer> out,
                        int32_t mbits) {
  if (auto err = CheckLutFactsCall(lut, mbits, *out); !err.success()) return err;
  LutFactsCpu(lut.typed_data<uint32_t>(), lut.dimensions()[0], mbits, out->typed_data<int32_t>(),
              MakeParallelFor(&pool));
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

// A convolution's GEMM on its patch matrix read in place (implicit_a.h).
// Forward (`approx_jax_conv`): x: f32[Gx, G, N, S_0 .. S_{nd-1}, C] (padded,
// lhs-dilated, channels last), b = w: f32[Gw, G, K, O] with K = prod(window)
// * C (rows tap-major, channel-minor) -> out: f32[D, G, N, P, O], P the
// product of the output extents: patches @ w.
// Kernel gradient (`approx_jax_conv_wgrad`, transposed): x: f32[Gx, G, C, N,
// S_0 .. S_{nd-1}] (channels first), b = dy: f32[Gd, G, N, P, O] -> out:
// f32[D, G, K, O]: patches^T @ dy, summed over the N * P output pixels.
// The G groups are the GEMM's batch axis. CPU only: elsewhere approx_jax
// builds the patch matrix and calls the GEMM.
ffi::Error ConvGemm(ffi::ThreadPool& pool, const ffi::AnyBuffer& x, const ffi::AnyBuffer& b,
                    const ffi::AnyBuffer& lut, const ffi::AnyBuffer& lut_facts, ffi::AnyBuffer& out,
                    int32_t mbits, int32_t family, ffi::Span<const int64_t> window,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                    bool transposed) {
  const std::string target = transposed ? "approx_jax_conv_wgrad: " : "approx_jax_conv: ";
  auto bad = [&](const std::string& what) { return ffi::Error::InvalidArgument(target + what); };
  if (!AllF32(x, b, out)) return bad("float32 operands only");
  if (auto err = CheckFamily(target, family); !err.success()) return err;
  int64_t lut_size = 0;
  if (auto err = CheckLut(lut, mbits, &lut_size); !err.success()) return err;
  const int32_t* facts = nullptr;
  if (auto err = CheckLutFacts(target, lut_facts, lut, mbits, &facts); !err.success()) return err;
  const int nd = static_cast<int>(window.size());
  auto xd = x.dimensions(), bd = b.dimensions(), od = out.dimensions();
  if (nd < 1 || static_cast<int>(xd.size()) != 4 + nd || bd.size() != (transposed ? 5u : 4u) ||
      od.size() != (transposed ? 4u : 5u)) {
    return bad(transposed ? "x must have rank 4 + len(window), dy rank 5, out rank 4"
                          : "x must have rank 4 + len(window), w rank 4, out rank 5");
  }
  const int64_t samples = transposed ? xd[3] : xd[2];
  ImplicitA g;
  std::vector<int64_t> tap_offset;
  const std::string geo =
      ConvGeometry(transposed ? &xd[4] : &xd[3], transposed ? xd[2] : xd[3 + nd], samples, window,
                   strides, dilation, transposed, &g, &tap_offset);
  if (!geo.empty()) return bad(geo);
  const int64_t patch_cols = static_cast<int64_t>(tap_offset.size()) * g.channels;
  const int64_t patch_rows = samples * g.pixels;
  GemmProblem p;
  p.designs = od[0];
  p.batch = od[1];
  p.m = transposed ? patch_cols : patch_rows;
  p.k = transposed ? patch_rows : patch_cols;
  p.n = od[od.size() - 1];
  p.mbits = mbits;
  p.family_hint = family;
  p.lut_facts = facts;
  const bool shapes_ok =
      xd[1] == p.batch && bd[1] == p.batch &&
      (transposed ? od[2] == p.m && bd[2] == samples && bd[3] == g.pixels && bd[4] == p.n
                  : od[2] == samples && od[3] == g.pixels && bd[2] == p.k && bd[3] == p.n);
  if (!shapes_ok) return bad("inconsistent shapes (groups, samples, output pixels, K or O)");
  const int64_t x_block = samples * g.image, b_mat = p.k * p.n;
  if (!BroadcastStride(xd[0], p.designs, p.batch * x_block, &p.a_design_stride) ||
      !BroadcastStride(bd[0], p.designs, p.batch * b_mat, &p.b_design_stride) ||
      !BroadcastStride(lut.dimensions()[0], p.designs, lut_size, &p.lut_design_stride)) {
    return bad("design axes must be 1 or match the output");
  }
  p.a_batch_stride = p.batch == 1 ? 0 : x_block;
  p.b_batch_stride = p.batch == 1 ? 0 : b_mat;
  p.a = x.typed_data<float>();
  p.b = b.typed_data<float>();
  p.lut = lut.typed_data<uint32_t>();
  p.out = out.typed_data<float>();
  p.implicit_a = &g;
  return RunGemm(pool, p);
}

ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer lut,
                    ffi::AnyBuffer lut_facts, ffi::Result<ffi::AnyBuffer> out, int32_t mbits,
                    int32_t family, ffi::Span<const int64_t> window,
                    ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation) {
  return ConvGemm(pool, x, w, lut, lut_facts, *out, mbits, family, window, strides, dilation,
                  false);
}

ffi::Error ConvWgradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                         ffi::AnyBuffer lut, ffi::AnyBuffer lut_facts,
                         ffi::Result<ffi::AnyBuffer> out, int32_t mbits, int32_t family,
                         ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> dilation) {
  return ConvGemm(pool, x, dy, lut, lut_facts, *out, mbits, family, window, strides, dilation,
                  true);
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
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("mbits")
                                  .Attr<int32_t>("family"));

namespace {
// The binding of both conv targets: (x, b, lut, lut_facts) -> out, mbits,
// the LUT's family (as the GEMM's) and the window geometry.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int32_t>("mbits")
      .Attr<int32_t>("family")
      .Attr<ffi::Span<const int64_t>>("window")
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("dilation");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxConv, ConvImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxConvWgrad, ConvWgradImpl, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxLutFacts, LutFactsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
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
    d["approx_jax_conv"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxConv));
    d["approx_jax_conv_wgrad"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxConvWgrad));
    d["approx_jax_lut_facts"] = py::capsule(reinterpret_cast<void*>(approx_jax::ApproxLutFacts));
    return d;
  });
}
