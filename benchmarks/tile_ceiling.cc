// Upper bound of the CPU tile kernel (issue 5), measured: the inner loops of
// a dense GEMM and of the approximate tile kernel, alone on one core, with no
// packing, tile builds or statistics around them. Built and run by
// benchmarks/bench_tile_ceiling.py (AVX-512 machines only):
//
//   g++ -O3 -march=native -ffp-contract=off benchmarks/tile_ceiling.cc -o /tmp/tile_ceiling
//   /tmp/tile_ceiling [seconds_per_loop]
//
// Prints one line per loop: "name products_per_second". Why the tile loop is
// slower than a dense one: a dense GEMM micro-kernel loads each 16-column
// vector of B once per k and multiplies it into all 6 rows of its block; the
// tile kernel's vector for row i is the tile of a's mantissa index
// ia[i, k], so every 16 products need their own 64-byte load (float32 tiles)
// or half a load plus a conversion on the FMA ports (bfloat16 tiles, what
// cpu_gemm_simd_impl.h's MicroTile runs). Neither has a register-shared
// operand, so the loop is bound by the L1 ports or by the FMA ports' extra
// work, not by the FMAs.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int kRows = 6;     // rows of a micro-kernel block (as MicroTile<6>)
constexpr int kCols = 64;    // columns: 4 zmm vectors
constexpr int kTiles = 8;    // 2^M tiles at M = 3
constexpr int kPanels = 64;  // C blocks visited in turn (96 KB of C, as in a GEMM)

double g_seconds = 0.5;

// Runs body() (which performs `products` products) until g_seconds have
// passed, three times; returns the best rate in products per second.
template <typename F>
double Rate(double products, F body) {
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    long calls = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double s = 0;
    do {
      body();
      ++calls;
      s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (s < g_seconds);
    best = std::max(best, calls * products / s);
  }
  return best;
}

float* Floats(size_t n, float value) {
  auto* p = static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64));
  for (size_t i = 0; i < n; ++i) p[i] = value;
  return p;
}

// 24 independent FMA chains on registers: the core's FMA peak.
__attribute__((noinline)) void FmaRegisters(long iters, float* out) {
  __m512 acc[24];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(0.5f), t = _mm512_set1_ps(1.0f);
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 24
    for (int r = 0; r < 24; ++r) acc[r] = _mm512_fmadd_ps(s, t, acc[r]);
  }
  for (int r = 0; r < 24; ++r) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

// 24 FMA chains, each FMA reading its own 64-byte vector from L1.
__attribute__((noinline)) void FmaL1Operand(const float* t, long iters, float* out) {
  __m512 acc[24];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(0.5f);
  for (long i = 0; i < iters; ++i) {
    const float* p = t + (i & 63) * 16;
#pragma GCC unroll 24
    for (int r = 0; r < 24; ++r) acc[r] = _mm512_fmadd_ps(s, _mm512_load_ps(p + 16 * r), acc[r]);
  }
  for (int r = 0; r < 24; ++r) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

// The dense GEMM micro-kernel: c[6][64] += a[6][k] * b[k][0:64].
__attribute__((noinline)) void Dense(const float* a, const float* b, int kb, float* c) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_loadu_ps(c + r * kCols + 16 * v);
  for (int k = 0; k < kb; ++k) {
    __m512 bv[4];
    for (int v = 0; v < 4; ++v) bv[v] = _mm512_load_ps(b + k * kCols + 16 * v);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m512 s = _mm512_set1_ps(a[k * kRows + r]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(s, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(c + r * kCols + 16 * v, acc[r][v]);
}

// Tile loops: c[r][0:64] += scale[r][k] * tile(ia[r][k], k)[0:64], the tile's
// record for (u, k) at byte offset off[r][k]. kFormat 0: bfloat16 records of
// 128 bytes (two words per lane: one load, a shift and a mask per 32
// products, as MicroTile<6, true>); 1: float32 records of 256 bytes (the
// FMA's memory operand); 2: mixed, 64 bytes of bfloat16 then 128 of float32.
template <int kFormat>
__attribute__((noinline)) void Tile(const int32_t* off, const float* scale, int kb,
                                    const char* tiles, float* c) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_loadu_ps(c + r * kCols + 16 * v);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int k = 0; k < kb; ++k) {
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m512 s = _mm512_set1_ps(scale[k * kRows + r]);
      const char* p = tiles + off[k * kRows + r];
      if constexpr (kFormat == 0) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          __m512i x = _mm512_load_si512(p + 64 * h);
          asm("" : "+v"(x));  // one load for both halves
          acc[r][2 * h] =
              _mm512_fmadd_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), acc[r][2 * h]);
          acc[r][2 * h + 1] =
              _mm512_fmadd_ps(s, _mm512_castsi512_ps(_mm512_and_si512(x, high)), acc[r][2 * h + 1]);
        }
      } else if constexpr (kFormat == 1) {
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v)
          acc[r][v] = _mm512_fmadd_ps(s, _mm512_load_ps(reinterpret_cast<const float*>(p) + 16 * v),
                                      acc[r][v]);
      } else {
        __m512i x = _mm512_load_si512(p);
        asm("" : "+v"(x));
        acc[r][0] = _mm512_fmadd_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(s, _mm512_castsi512_ps(_mm512_and_si512(x, high)), acc[r][1]);
        acc[r][2] =
            _mm512_fmadd_ps(s, _mm512_load_ps(reinterpret_cast<const float*>(p + 64)), acc[r][2]);
        acc[r][3] =
            _mm512_fmadd_ps(s, _mm512_load_ps(reinterpret_cast<const float*>(p + 128)), acc[r][3]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(c + r * kCols + 16 * v, acc[r][v]);
}

template <int kFormat>
double TileRate(int kb) {
  constexpr int kRecord = kFormat == 0 ? 128 : kFormat == 1 ? 256 : 192;
  auto* tiles = reinterpret_cast<char*>(Floats(size_t{kTiles} * kb * kRecord / 4, 1.0f));
  std::vector<int32_t> off(size_t{kPanels} * kb * kRows);
  std::vector<float> scale(off.size(), 0.5f);
  uint32_t state = 12345;  // xorshift: random tile per (row, k), as a's mantissas give
  for (int p = 0; p < kPanels; ++p)
    for (int k = 0; k < kb; ++k)
      for (int r = 0; r < kRows; ++r) {
        state ^= state << 13, state ^= state >> 17, state ^= state << 5;
        off[(size_t{1} * p * kb + k) * kRows + r] = ((state % kTiles) * kb + k) * kRecord;
      }
  float* c = Floats(size_t{kPanels} * kRows * kCols, 0.0f);
  const double rate = Rate(double(kPanels) * kb * kRows * kCols, [&] {
    for (int p = 0; p < kPanels; ++p)
      Tile<kFormat>(off.data() + size_t{1} * p * kb * kRows,
                    scale.data() + size_t{1} * p * kb * kRows, kb, tiles,
                    c + size_t{1} * p * kRows * kCols);
  });
  std::free(tiles);
  std::free(c);
  return rate;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) g_seconds = std::atof(argv[1]);
  if (!__builtin_cpu_supports("avx512f")) {
    std::fprintf(stderr, "tile_ceiling: needs AVX-512F\n");
    return 2;
  }
  float out[24 * 16];
  std::printf("fma_registers %.4g\n", Rate(1e6 * 24 * 16, [&] { FmaRegisters(1000000, out); }));
  float* t = Floats(64 * 16 + 24 * 16, 1.0f);
  std::printf("fma_l1_operand %.4g\n", Rate(1e6 * 24 * 16, [&] { FmaL1Operand(t, 1000000, out); }));
  {
    const int kb = 256;
    float* a = Floats(size_t{kPanels} * kb * kRows, 0.5f);
    float* b = Floats(size_t{kb} * kCols, 1.0f);
    float* c = Floats(size_t{kPanels} * kRows * kCols, 0.0f);
    std::printf("dense %.4g\n", Rate(double(kPanels) * kb * kRows * kCols, [&] {
                  for (int p = 0; p < kPanels; ++p)
                    Dense(a + size_t{1} * p * kb * kRows, b, kb, c + size_t{1} * p * kRows * kCols);
                }));
  }
  std::printf("tile_bf16_kb256 %.4g\n",
              TileRate<0>(256));                          // 256 KB of tiles: L2, the shipped budget
  std::printf("tile_bf16_kb32 %.4g\n", TileRate<0>(32));  // 32 KB: L1
  std::printf("tile_f32_kb16 %.4g\n", TileRate<1>(16));   // 32 KB: L1
  std::printf("tile_f32_kb256 %.4g\n", TileRate<1>(256));  // 512 KB: L2
  std::printf("tile_mixed_kb32 %.4g\n", TileRate<2>(32));  // 48 KB
  std::printf("tile_mixed_kb256 %.4g\n", TileRate<2>(256));
  return out[0] > 1e30f;
}
