// CUDA on the CPU, for checking the kernels of xla_kernels/*.cu without a GPU.
//
// Not NVIDIA's header: a stand-in that tools/cuda_emulation/rewrite_cu.py's
// output is compiled against with g++ (see run.sh). Device pointers are host
// pointers; a kernel launch runs synchronously, one block after another, and
// the threads of a block as coroutines (ucontext) on the calling thread, each
// switched out at a barrier, so __syncthreads / __syncthreads_or have their
// CUDA meaning and every run is deterministic. Float arithmetic is the host's
// IEEE float32 (compile with -ffp-contract=off, no FTZ), which is what the
// kernels' explicit __fadd_rn / __fmaf_rn / mul.rn.ftz compute on a GPU; NaN
// payloads are the one thing that differs (a GPU returns its canonical NaN).
//
// Checked like the CUDA runtime checks them, reported by cudaGetLastError:
// block size (1..1024), grid limits (x < 2^31, y and z <= 65535), dynamic
// shared memory above 48 KB without cudaFuncSetAttribute or above the
// device's opt-in limit. Checked beyond that (abort with a message): every
// thread of a block reaches the same barrier (file:line) in the same round,
// or has returned. Dynamic shared memory starts filled with 0xff bytes
// (NaN floats), so a read of a word the block never wrote shows, and each
// round between barriers runs the threads in a new random order, so a missing
// barrier shows as wrong results (not as a race detector would: only where
// the order changes a value the test compares).
#ifndef APPROX_JAX_TOOLS_CUDA_EMULATION_CUDA_RUNTIME_H_
#define APPROX_JAX_TOOLS_CUDA_EMULATION_CUDA_RUNTIME_H_

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

// ------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// (__restrict__ is a g++ keyword already.)

// ------------------------------------------------------------ vector types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// The built-in variables, set by the scheduler before each switch into a
// thread.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

// ------------------------------------------------------------ device functions
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// prmt.b32 in its default mode: byte n of the result is byte s[4n+2:4n] of
// the 8 bytes {y, x} (x in bytes 0..3); bit 3 of a selector nibble
// replicates that byte's sign bit.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t in = (uint64_t{y} << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned sel = (s >> (4 * n)) & 0xfu;
    unsigned byte = static_cast<unsigned>(in >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    r |= byte << (8 * n);
  }
  return r;
}
// Atomics: blocks run one after another and their threads between
// barriers one at a time, so a plain read-modify-write is atomic here.
inline int atomicOr(int* address, int value) {
  const int old = *address;
  *address = old | value;
  return old;
}
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace cuda_emu {

// PTX mul.rn.ftz.f32: subnormal inputs and results become signed zeros.
inline float MulRnFtz(float x, float y) {
  auto flush = [](float v) {
    const unsigned u = __float_as_uint(v);
    return ((u & 0x7f800000u) == 0) ? __uint_as_float(u & 0x80000000u) : v;
  };
  return flush(flush(x) * flush(y));
}

[[noreturn]] inline void Die(const char* what) {
  std::fprintf(stderr, "cuda_emulation: %s\n", what);
  std::abort();
}

// Device properties the launchers query (an H200 unless a test sets others).
struct Device {
  int sm_count = 132;
  int smem_optin = 232448;  // 227 KB
};
inline Device g_device;

// Function -> dynamic shared memory limit set by cudaFuncSetAttribute.
inline std::map<const void*, int> g_smem_limit;
inline int g_last_error = 0;
inline int64_t g_launches = 0;               // kernels run (for tests of the launch plan)
inline std::vector<std::string> g_launched;  // kernels' names, in launch order
inline std::vector<size_t> g_launched_smem;  // their dynamic shared memory (bytes)

// Coroutine stacks, allocated once for the largest block seen and reused by
// every launch (a fresh zeroed 64 MB per launch was most of the run time).
constexpr size_t kStackBytes = 256 * 1024;
inline std::vector<std::unique_ptr<unsigned char[]>> g_stacks;

struct BlockRun {
  std::vector<ucontext_t> ctx;
  std::vector<int> state;  // 0 running/runnable, 1 at barrier, 2 returned
  std::vector<const char*> bar_file;
  std::vector<int> bar_line, bar_kind, bar_pred;
  ucontext_t sched;
  int current = -1;
  int or_result = 0;
  std::function<void()> body;
  std::vector<unsigned char> smem;
};
inline BlockRun* g_run = nullptr;

// The order in which a round runs the threads of a block: a shuffle per
// round (fixed seed), so that code depending on the order of threads between
// two barriers (a missing barrier) gives wrong results rather than the
// answer of one lucky order. CUDA_EMULATION_SCHEDULE=forward runs them in
// thread order.
inline bool ShuffleThreads() {
  const char* s = std::getenv("CUDA_EMULATION_SCHEDULE");
  return !(s && std::strcmp(s, "forward") == 0);
}
inline std::mt19937 g_schedule_rng(7);

inline void ThreadEntry() {
  g_run->body();
  g_run->state[g_run->current] = 2;
  // uc_link returns to the scheduler.
}

// A barrier: kind 0 plain, 1 OR-reduction of pred.
inline int Barrier(const char* file, int line, int kind, int pred) {
  BlockRun& r = *g_run;
  const int t = r.current;
  if (t < 0) Die("__syncthreads outside a kernel");
  r.state[t] = 1;
  r.bar_file[t] = file;
  r.bar_line[t] = line;
  r.bar_kind[t] = kind;
  r.bar_pred[t] = pred ? 1 : 0;
  swapcontext(&r.ctx[t], &r.sched);
  return r.or_result;
}

inline unsigned char* DynamicSmem() { return g_run->smem.data(); }

inline void RunBlocks(const void* fn, const char* name, dim3 grid, dim3 block, size_t smem_bytes,
                      std::function<void()> body) {
  const int64_t nthreads = int64_t{block.x} * block.y * block.z;
  const int limit_set = g_smem_limit.count(fn) ? g_smem_limit[fn] : 48 * 1024;
  if (nthreads < 1 || nthreads > 1024 || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    g_last_error = 9;  // cudaErrorInvalidConfiguration
    return;
  }
  if (static_cast<int64_t>(smem_bytes) > limit_set ||
      static_cast<int64_t>(smem_bytes) > g_device.smem_optin) {
    g_last_error = 1;  // cudaErrorInvalidValue
    return;
  }
  ++g_launches;
  g_launched.push_back(name);
  g_launched_smem.push_back(smem_bytes);
  BlockRun r;
  r.ctx.resize(nthreads);
  while (static_cast<int64_t>(g_stacks.size()) < nthreads)
    g_stacks.emplace_back(new unsigned char[kStackBytes]);
  r.state.resize(nthreads);
  r.bar_file.resize(nthreads);
  r.bar_line.resize(nthreads);
  r.bar_kind.resize(nthreads);
  r.bar_pred.resize(nthreads);
  r.body = std::move(body);
  BlockRun* outer = g_run;
  g_run = &r;
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        r.smem.assign(smem_bytes, 0xff);
        for (int64_t t = 0; t < nthreads; ++t) {
          getcontext(&r.ctx[t]);
          r.ctx[t].uc_stack.ss_sp = g_stacks[t].get();
          r.ctx[t].uc_stack.ss_size = kStackBytes;
          r.ctx[t].uc_link = &r.sched;
          makecontext(&r.ctx[t], ThreadEntry, 0);
          r.state[t] = 0;
        }
        std::vector<int64_t> order(nthreads);
        for (int64_t t = 0; t < nthreads; ++t) order[t] = t;
        const bool shuffle = ShuffleThreads();
        for (;;) {
          if (shuffle) std::shuffle(order.begin(), order.end(), g_schedule_rng);
          for (const int64_t t : order) {
            if (r.state[t] == 2) continue;
            r.state[t] = 0;
            r.current = static_cast<int>(t);
            threadIdx = {static_cast<unsigned>(t % block.x),
                         static_cast<unsigned>((t / block.x) % block.y),
                         static_cast<unsigned>(t / (int64_t{block.x} * block.y))};
            swapcontext(&r.sched, &r.ctx[t]);
          }
          r.current = -1;
          int waiting = -1, any_or = 0;
          int64_t returned = 0;
          for (int64_t t = 0; t < nthreads; ++t) {
            if (r.state[t] == 2) {
              ++returned;
              continue;
            }
            if (waiting < 0) waiting = static_cast<int>(t);
            const int w = waiting;
            if (r.bar_line[t] != r.bar_line[w] || std::strcmp(r.bar_file[t], r.bar_file[w]) != 0 ||
                r.bar_kind[t] != r.bar_kind[w]) {
              std::fprintf(stderr,
                           "cuda_emulation: block (%u,%u,%u) threads %d and %lld wait at "
                           "different barriers (%s:%d, %s:%d)\n",
                           bx, by, bz, w, (long long)t, r.bar_file[w], r.bar_line[w], r.bar_file[t],
                           r.bar_line[t]);
              std::abort();
            }
            any_or |= r.bar_pred[t];
          }
          if (waiting < 0) break;  // every thread returned
          if (returned > 0) {
            std::fprintf(stderr,
                         "cuda_emulation: block (%u,%u,%u): %lld threads returned while "
                         "others wait at %s:%d\n",
                         bx, by, bz, (long long)returned, r.bar_file[waiting], r.bar_line[waiting]);
            std::abort();
          }
          r.or_result = any_or;
        }
      }
  g_run = outer;
}

template <class F>
inline const void* KernelKey(F* fn) {
  return reinterpret_cast<const void*>(fn);
}

}  // namespace cuda_emu

#define __syncthreads() ::cuda_emu::Barrier(__FILE__, __LINE__, 0, 0)
#define __syncthreads_or(pred) ::cuda_emu::Barrier(__FILE__, __LINE__, 1, (pred))

// ------------------------------------------------------------ runtime API
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return 101;  // cudaErrorInvalidDevice
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = cuda_emu::g_device.sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = cuda_emu::g_device.smem_optin;
      return cudaSuccess;
  }
  return 1;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return 1;
  if (value < 0 || value > cuda_emu::g_device.smem_optin) return 1;  // cudaErrorInvalidValue
  cuda_emu::g_smem_limit[cuda_emu::KernelKey(fn)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = 0;
  return e;
}
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == 0   ? "cudaSuccess"
         : e == 1 ? "cudaErrorInvalidValue"
         : e == 9 ? "cudaErrorInvalidConfiguration"
                  : "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

#endif  // APPROX_JAX_TOOLS_CUDA_EMULATION_CUDA_RUNTIME_H_
