// CUDA on the CPU, for checking the kernels of xla_kernels/*.cu without a GPU.
//
// Not NVIDIA's header: a stand-in that tools/cuda_emulation/rewrite_cu.py's
// output is compiled against with g++ (see run.sh). Device pointers are host
// pointers; a kernel launch runs synchronously, one block after another, and
// the threads of a block as coroutines on the calling thread (a stack each,
// switched by a few instructions on x86-64, by ucontext elsewhere and under
// AddressSanitizer), each switched out at a barrier, so __syncthreads /
// __syncthreads_or have their CUDA meaning and every run is deterministic.
// Float arithmetic is the host's IEEE float32 (compile with
// -ffp-contract=off, no FTZ), which is what the kernels' explicit __fadd_rn /
// __fmaf_rn / mul.rn.ftz compute on a GPU; NaN payloads are the one thing
// that differs (a GPU returns its canonical NaN).
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

// Switching between a block's threads. ucontext's swapcontext saves and
// restores the signal mask, a system call each way: that was half the run
// time of the harness (perf, `smoke`). On x86-64 a switch saves the
// callee-saved registers and the SSE/x87 control words on the old stack and
// loads them from the new one, as the SysV ABI has a call preserve them.
// AddressSanitizer builds keep ucontext, whose switches it knows about.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(CUDA_EMULATION_UCONTEXT)
#define CUDA_EMULATION_FAST_SWITCH 1
// void cuda_emulation_switch(void** save_sp, void* next_sp): saves the
// caller's context on its stack, stores that stack pointer in *save_sp and
// resumes the context saved at next_sp. Weak: every translation unit that
// includes this header defines it.
// (push/popsection: the compiler does not know that top-level asm switched
// sections, and would go on emitting into .text what it meant for another.)
asm(R"(
  .pushsection .text
  .p2align 4
  .weak cuda_emulation_switch
  .type cuda_emulation_switch, @function
cuda_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulation_switch, .-cuda_emulation_switch
  .popsection
)");
extern "C" void cuda_emulation_switch(void** save_sp, void* next_sp);

// Whether CET shadow stacks are on for this process (rdsspq is a no-op that
// leaves 0 where they are not). A switch of stacks without its shadow stack
// would fault at the first return, so the fast switch refuses to run then.
inline bool ShadowStackActive() {
  uint64_t ssp = 0;
  asm volatile("rdsspq %0" : "+r"(ssp));
  return ssp != 0;
}
#endif

struct BlockRun {
#ifdef CUDA_EMULATION_FAST_SWITCH
  std::vector<void*> sp;  // each thread's saved stack pointer
  void* sched_sp = nullptr;
#else
  std::vector<ucontext_t> ctx;
  ucontext_t sched;
#endif
  std::vector<int> state;  // 0 running/runnable, 1 at barrier, 2 returned
  std::vector<const char*> bar_file;
  std::vector<int> bar_line, bar_kind, bar_pred;
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

#ifdef CUDA_EMULATION_FAST_SWITCH
// Where a thread's stack starts: reached by the `ret` of its first switch,
// never returns (a returned thread is not switched to again).
[[noreturn]] inline void ThreadEntry() {
  g_run->body();
  g_run->state[g_run->current] = 2;
  void* unused;
  cuda_emulation_switch(&unused, g_run->sched_sp);
  __builtin_unreachable();
}

// A fresh thread: a stack whose saved context resumes at ThreadEntry, as if
// called (the stack pointer 8 past a 16-byte boundary at its first
// instruction, the ABI's state after a call).
inline void StartThread(BlockRun& r, int64_t t, unsigned char* stack) {
  auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top) - 9;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  frame[0] = mxcsr | uint64_t{fpucw} << 32;             // the control words
  for (int i = 1; i <= 6; ++i) frame[i] = 0;            // r15 r14 r13 r12 rbx rbp
  frame[7] = reinterpret_cast<uint64_t>(&ThreadEntry);  // the switch's ret
  frame[8] = 0;  // ThreadEntry's own return address (it never returns)
  r.sp[t] = frame;
}
inline void SwitchToThread(BlockRun& r, int64_t t) { cuda_emulation_switch(&r.sched_sp, r.sp[t]); }
inline void SwitchToScheduler(BlockRun& r, int64_t t) {
  cuda_emulation_switch(&r.sp[t], r.sched_sp);
}
#else
inline void ThreadEntry() {
  g_run->body();
  g_run->state[g_run->current] = 2;
  // uc_link returns to the scheduler.
}

inline void StartThread(BlockRun& r, int64_t t, unsigned char* stack) {
  getcontext(&r.ctx[t]);
  r.ctx[t].uc_stack.ss_sp = stack;
  r.ctx[t].uc_stack.ss_size = kStackBytes;
  r.ctx[t].uc_link = &r.sched;
  makecontext(&r.ctx[t], ThreadEntry, 0);
}
inline void SwitchToThread(BlockRun& r, int64_t t) { swapcontext(&r.sched, &r.ctx[t]); }
inline void SwitchToScheduler(BlockRun& r, int64_t t) { swapcontext(&r.ctx[t], &r.sched); }
#endif

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
  SwitchToScheduler(r, t);
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
#ifdef CUDA_EMULATION_FAST_SWITCH
  static const bool shadow_stack = ShadowStackActive();
  if (shadow_stack) Die("CET shadow stacks are on: build with -DCUDA_EMULATION_UCONTEXT");
  r.sp.resize(nthreads);
#else
  r.ctx.resize(nthreads);
#endif
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
          StartThread(r, t, g_stacks[t].get());
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
            SwitchToThread(r, t);
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
