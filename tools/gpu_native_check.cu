// Native GPU check of the CUDA GEMM/multiply launchers: the CUDA emulation
// harness's idea (tools/cuda_emulation) on real hardware, for what the
// emulation cannot see (misaligned vector accesses, races between threads and
// blocks, resource limits). Each case runs under several env-knob
// configurations on a non-default stream; results are compared bit for bit
// with tools/gemm_reference.h's NaiveGemm (NaN as NaN). Small shapes so that
// compute-sanitizer (memcheck / racecheck / synccheck / initcheck) finishes
// fast. benchmarks/gpu_check.sh runs it last, in the time left.
//
// Build (repository root, JAX FFI headers not needed):
//   nvcc -std=c++17 -O2 --fmad=false -ftz=false -arch=sm_90 -Ixla_kernels -Itools \
//     tools/gpu_native_check.cu xla_kernels/cuda_kernels.cu \
//     xla_kernels/cuda_gemm_expanded.cu -o /tmp/gnc
// Run:  /tmp/gnc            (all cases, all configs; exit 1 on a mismatch)
//       /tmp/gnc small      (a few cases: for compute-sanitizer)
//   compute-sanitizer --tool memcheck  /tmp/gnc small
//   compute-sanitizer --tool racecheck /tmp/gnc small
//   compute-sanitizer --tool synccheck /tmp/gnc small
//   GNC_NO_POISON=1 compute-sanitizer --tool initcheck /tmp/gnc small
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "approx_math.h"
#include "cuda_kernels.h"
#include "gemm_reference.h"

using namespace approx_jax;
using namespace approx_jax::gemm_reference;

namespace {

struct Config {
  const char* name;
  const char* env[8][2];
};

const Config kConfigs[] = {
    {"default", {{nullptr, nullptr}}},
    {"lut-kernel", {{"APPROX_JAX_CUDA_EXPANDED", "0"}, {nullptr, nullptr}}},
    {"lut-4kb",
     {{"APPROX_JAX_CUDA_EXPANDED", "0"}, {"APPROX_JAX_CUDA_LUT_SMEM_KB", "4"}, {nullptr, nullptr}}},
    {"lut-global",
     {{"APPROX_JAX_CUDA_EXPANDED", "0"}, {"APPROX_JAX_CUDA_LUT_SMEM_KB", "0"}, {nullptr, nullptr}}},
    {"lut-global-noformula",
     {{"APPROX_JAX_CUDA_EXPANDED", "0"},
      {"APPROX_JAX_CUDA_LUT_SMEM_KB", "0"},
      {"APPROX_JAX_CUDA_FORMULA", "0"},
      {nullptr, nullptr}}},
    {"split3", {{"APPROX_JAX_CUDA_SPLIT_K", "3"}, {nullptr, nullptr}}},
    {"split3-lut",
     {{"APPROX_JAX_CUDA_SPLIT_K", "3"}, {"APPROX_JAX_CUDA_EXPANDED", "0"}, {nullptr, nullptr}}},
    {"two-blocks", {{"APPROX_JAX_CUDA_EXPANDED_BLOCKS", "2"}, {nullptr, nullptr}}},
    {"no-narrow", {{"APPROX_JAX_CUDA_NARROW", "0"}, {nullptr, nullptr}}},
    {"m7-bk8", {{"APPROX_JAX_CUDA_EXPANDED_M7_BK", "8"}, {nullptr, nullptr}}},
    {"fill", {{"APPROX_JAX_CUDA_EXPANDED_FILL", "1"}, {nullptr, nullptr}}},
    {"fill-m7-bk8",
     {{"APPROX_JAX_CUDA_EXPANDED_FILL", "1"},
      {"APPROX_JAX_CUDA_EXPANDED_M7_BK", "8"},
      {nullptr, nullptr}}},
};
const char* kKnobs[] = {"APPROX_JAX_CUDA_EXPANDED",        "APPROX_JAX_CUDA_LUT_SMEM_KB",
                        "APPROX_JAX_CUDA_FORMULA",         "APPROX_JAX_CUDA_SPLIT_K",
                        "APPROX_JAX_CUDA_EXPANDED_BLOCKS", "APPROX_JAX_CUDA_NARROW",
                        "APPROX_JAX_CUDA_EXPANDED_M7_BK",  "APPROX_JAX_CUDA_EXPANDED_FILL"};

int g_fail = 0, g_runs = 0;

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

template <class T>
T* ToDevice(const T* host, size_t count, size_t offset_elems) {
  T* d = nullptr;
  CK(cudaMalloc(&d, (count + offset_elems) * sizeof(T) + 16));
  CK(cudaMemcpy(d + offset_elems, host, count * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

void RunCase(const Case& c, int misalign, std::mt19937& rng, cudaStream_t stream) {
  CaseData data(c, rng);
  GemmProblem& rp = data.p;
  const int64_t outs = c.designs * c.batch * c.m * c.n;
  std::vector<float> ref(outs);
  const int oa = misalign == 1, ob = misalign == 2, oo = misalign == 3;
  float* da = ToDevice(data.a_buf.data(), data.a_buf.size(), oa);
  float* db = ToDevice(data.b_buf.data(), data.b_buf.size(), ob);
  uint32_t* dl = ToDevice(data.lut.data(), data.lut.size(), 0);
  float* dout = nullptr;
  CK(cudaMalloc(&dout, (outs + oo) * sizeof(float) + 16));
  int64_t last_chunk = -1;
  for (const Config& cfg : kConfigs) {
    for (const char* k : kKnobs) unsetenv(k);
    for (auto& kv : cfg.env)
      if (kv[0]) setenv(kv[0], kv[1], 1);
    int64_t chunk = 0;  // reference order: the knob's or the built-in rule
    if (const char* s = std::getenv("APPROX_JAX_CUDA_SPLIT_K")) {
      const int64_t want = std::atoll(s);
      chunk = want <= 1 ? c.k : ((c.k + want - 1) / want + 7) / 8 * 8;
    }
    if (chunk != last_chunk) {  // (the reference of the previous config otherwise)
      rp.out = ref.data();
      NaiveGemm(rp, chunk);
      last_chunk = chunk;
    }
    CudaGemmProblem p;
    p.a = da + oa;
    p.b = db + ob;
    p.lut = dl;
    p.out = dout + oo;
    p.designs = c.designs;
    p.batch = c.batch;
    p.m = c.m;
    p.k = c.k;
    p.n = c.n;
    p.a_design_stride = rp.a_design_stride;
    p.a_batch_stride = rp.a_batch_stride;
    p.b_design_stride = rp.b_design_stride;
    p.b_batch_stride = rp.b_batch_stride;
    p.lut_design_stride = rp.lut_design_stride;
    p.mbits = c.mbits;
    // NaN fill of the output and the scratch (GNC_NO_POISON=1: left as
    // allocated, so that compute-sanitizer --tool initcheck sees reads of
    // memory the launchers never wrote).
    const bool poison = !std::getenv("GNC_NO_POISON");
    if (poison) CK(cudaMemsetAsync(dout, 0xff, (outs + oo) * sizeof(float), stream));
    CudaGemmPlan plan;
    std::string err = PlanApproxGemm(p, &plan);
    void* scratch = nullptr;
    if (err.empty() && plan.scratch_bytes > 0) {
      CK(cudaMalloc(&scratch, plan.scratch_bytes));
      if (poison) CK(cudaMemsetAsync(scratch, 0xff, plan.scratch_bytes, stream));
    }
    if (err.empty()) err = LaunchApproxGemm(p, plan, static_cast<float*>(scratch), stream);
    CK(cudaStreamSynchronize(stream));
    CK(cudaGetLastError());
    std::vector<float> got(outs);
    CK(cudaMemcpy(got.data(), dout + oo, outs * sizeof(float), cudaMemcpyDeviceToHost));
    if (scratch) CK(cudaFree(scratch));
    ++g_runs;
    int64_t diff = 0, first = -1;
    for (int64_t i = 0; i < outs; ++i) {
      const bool same =
          FloatBits(got[i]) == FloatBits(ref[i]) || (std::isnan(got[i]) && std::isnan(ref[i]));
      if (!same && diff++ == 0) first = i;
    }
    if (!err.empty() || diff) {
      ++g_fail;
      std::printf(
          "FAIL %s D=%lld B=%lld %lldx%lldx%lld M=%d misalign=%d splits=%lld par=%d err='%s' "
          "diffs=%lld",
          cfg.name, (long long)c.designs, (long long)c.batch, (long long)c.m, (long long)c.k,
          (long long)c.n, c.mbits, misalign, (long long)plan.splits, plan.parallel ? 1 : 0,
          err.c_str(), (long long)diff);
      if (first >= 0)
        std::printf(" first@%lld got=%08x ref=%08x", (long long)first, FloatBits(got[first]),
                    FloatBits(ref[first]));
      std::printf("\n");
    }
  }
  for (const char* k : kKnobs) unsetenv(k);
  CK(cudaFree(da));
  CK(cudaFree(db));
  CK(cudaFree(dl));
  CK(cudaFree(dout));
}

Case MakeCase(int64_t m, int64_t k, int64_t n, int mbits, int variant, int lut_kind) {
  Case c{};
  c.designs = 1;
  c.batch = 1;
  c.m = m;
  c.k = k;
  c.n = n;
  c.mbits = mbits;
  c.lut_kind = lut_kind;
  c.exp_lo = 110;
  c.exp_hi = 140;
  if (variant == 1) c.special = 0.02;
  if (variant == 2) {
    c.special = 0.002;
    c.exp_lo = 1;
    c.exp_hi = 254;
  }
  if (variant == 3) {
    c.exp_lo = 62;
    c.exp_hi = 66;
  }
  if (variant == 4) {
    c.special = 0.3;
    c.exp_lo = 60;
    c.exp_hi = 196;
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "small") == 0;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::mt19937 rng(2024);
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int dev = 0, optin = 0, sms = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  std::printf("device %d: %d SMs, %d B opt-in shared memory\n", dev, sms, optin);
  const int ms_small[] = {3, 7, 8};
  const int ms_all[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 11};
  const int64_t shapes_small[][3] = {{33, 17, 65}, {130, 37, 64}};
  const int64_t shapes_all[][3] = {{1, 1, 1},     {3, 5, 7},      {33, 17, 65},  {130, 37, 64},
                                   {70, 40, 130}, {260, 12, 9},   {300, 33, 72}, {517, 129, 257},
                                   {5, 4100, 7},  {64, 4096, 64}, {9, 5000, 66}};
  int idx = 0;
  for (int m : small ? std::vector<int>(std::begin(ms_small), std::end(ms_small))
                     : std::vector<int>(std::begin(ms_all), std::end(ms_all))) {
    const auto* shapes = small ? shapes_small : shapes_all;
    const int nshapes = small ? 2 : static_cast<int>(sizeof(shapes_all) / sizeof(shapes_all[0]));
    for (int s = 0; s < nshapes; ++s) {
      if (m >= 9 && shapes[s][1] > 1000) continue;  // keep the reference quick
      for (int v = 0; v < (small ? 2 : 5); ++v, ++idx) {
        // LUT kinds: random, truncate, Mitchell(4), MBM(5), widened narrow(3).
        const int kinds[] = {0, 2, 4, 5, 3};
        Case c = MakeCase(shapes[s][0], shapes[s][1], shapes[s][2], m, v, kinds[idx % 5]);
        if (idx % 3 == 0) {
          c.designs = 3;
          c.batch = 2;
          c.b_bcast_d = true;
          c.widened = true;
        }
        RunCase(c, idx % 4, rng, stream);
      }
    }
  }
  // Multiply: a few sizes.
  for (int m : {1, 7, 11}) {
    const int64_t designs = 3, n = 1000;
    std::vector<float> a(designs * n), b(n);
    for (auto& x : a) x = RandomValue(rng, 0.05, 1, 254);
    for (auto& x : b) x = RandomValue(rng, 0.05, 1, 254);
    std::vector<uint32_t> lut;
    for (int64_t d = 0; d < designs; ++d) {
      auto l = MakeLut(m, static_cast<int>(d % 3), rng);
      lut.insert(lut.end(), l.begin(), l.end());
    }
    float* da = ToDevice(a.data(), a.size(), 0);
    float* db = ToDevice(b.data(), b.size(), 0);
    uint32_t* dl = ToDevice(lut.data(), lut.size(), 0);
    float* dout = nullptr;
    CK(cudaMalloc(&dout, designs * n * sizeof(float)));
    CudaMultiplyProblem p;
    p.a = da;
    p.b = db;
    p.lut = dl;
    p.out = dout;
    p.designs = designs;
    p.n = n;
    p.a_design_stride = n;
    p.b_design_stride = 0;
    p.lut_design_stride = int64_t{1} << (2 * m);
    p.mbits = m;
    const std::string err = LaunchApproxMultiply(p, stream);
    CK(cudaStreamSynchronize(stream));
    std::vector<float> got(designs * n);
    CK(cudaMemcpy(got.data(), dout, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    int64_t diff = 0;
    for (int64_t d = 0; d < designs; ++d)
      for (int64_t i = 0; i < n; ++i)
        if (FloatBits(got[d * n + i]) != ApproxMulBits(FloatBits(a[d * n + i]), FloatBits(b[i]),
                                                       lut.data() + d * p.lut_design_stride, m))
          ++diff;
    ++g_runs;
    if (!err.empty() || diff) {
      ++g_fail;
      std::printf("FAIL multiply M=%d err='%s' diffs=%lld\n", m, err.c_str(), (long long)diff);
    }
    CK(cudaFree(da));
    CK(cudaFree(db));
    CK(cudaFree(dl));
    CK(cudaFree(dout));
  }
  std::printf("%d runs, %d failures\n", g_runs, g_fail);
  return g_fail ? 1 : 0;
}
