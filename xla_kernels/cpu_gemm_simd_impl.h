// Vectorised approximate GEMM, shared by the AVX-512 and AVX2 translation
// units. Included (once per ISA) after the including file has defined, inside
// namespace approx_jax::gemm_internal::APPROX_GEMM_ISA_NS:
//   kVL (lanes), kNB = kVL * kNV (columns per block), kMR/kNV (tile micro-kernel rows/vectors),
//   kMRG (gather micro-kernel rows), types VF/VI and the primitives used below, plus
//   BuildTiles(lut, mbits, count, ...) (count = kb * kNB tile floats per u)
//   and GatherI(...).
//
// Exactness argument (see benchmarks/bench_cpu_gemm_kernel.md):
// every operand is split into a power-of-two scale s = +-2^(e-127) (or a
// signed zero for zero/subnormal operands) and a mantissa index. With
// Lf[u][v] = float with bits (127 << 23) + lut[(u << M) | v] (= 1.r * 2^c),
// Bu[k][j] = Lf[u][ib[k][j]] * sb[k][j] and product = sa[i][k] * Bu[k][j].
// Both multiplications are by powers of two, hence exact, as long as every
// result is a normal float; then the product's bits are exactly
// sign | ((ea + eb - 127 + c) << 23) | (r << (23-M)), i.e. ApproxMulBits.
// A zero scale gives a signed zero with the XOR sign, as SPEC wants. The fast
// paths are only used for (panel, k-block) pairs where, for every k, all
// nonzero exponents satisfy 1 <= ea + eb - 127 <= 253, eb <= 253, and no
// operand is Inf/NaN; everything else runs the scalar ApproxMulBits loop.
// Each output element is summed sequentially over k in ascending order,
// starting from +0, exactly as the naive kernel does: results are bit-identical
// to it, whatever the path, blocking or thread count.

namespace {

inline int64_t MinI(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t MaxI(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t RoundUp(int64_t a, int64_t b) { return CeilDiv(a, b) * b; }

// An exponent e as a float32 exponent field (e << 23; 256 << 23 wraps to
// INT32_MIN, read as unsigned 0x80000000 above every field).
inline int32_t ExponentField(int64_t e) {
  return static_cast<int32_t>(static_cast<uint32_t>(e) << 23);
}

// Per-k acceptance ranges of a's exponent given the b values of a column range,
// as exponent fields (ExponentField), compared with a & 0x7f800000 in place:
// normal a is fast-path safe iff lo <= ExponentField(ea) <= hi; ok0: all-ones
// if a zero/subnormal a is (no Inf/NaN/huge b at this k).
void BStats(const float* b, int64_t ldb, int64_t k0, int kb, int64_t c0, int64_t c1, int32_t* lo,
            int32_t* hi, int32_t* ok0) {
  const VI vff = Set1I(0xff);
  const VI vzero = Set1I(0);
  const VI v255 = Set1I(255);
  for (int kk = 0; kk < kb; ++kk) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(b + (k0 + kk) * ldb);
    // Zeros (e == 0) must not narrow the range: they count as 255 for the
    // minimum (and as 0, their own value, for the maximum).
    VI vmn = v255, vmx = vzero;
    int64_t j = c0;
    for (; j + kVL <= c1; j += kVL) {
      const VI e = AndI(SrlI(LoadI(reinterpret_cast<const int32_t*>(row + j)), 23), vff);
      vmn = MinI32(vmn, BlendI(e, v255, CmpEqI(e, vzero)));
      vmx = MaxI32(vmx, e);
    }
    int32_t mn = ReduceMinI32(vmn), mx = ReduceMaxI32(vmx);
    for (; j < c1; ++j) {
      const int32_t e = static_cast<int32_t>((row[j] >> 23) & 0xffu);
      const int32_t emn = e == 0 ? 255 : e;
      mn = emn < mn ? emn : mn;
      mx = e > mx ? e : mx;
    }
    if (mx >= 254) {  // Inf/NaN or a huge b: no fast path at this k at all
      lo[kk] = ExponentField(256);
      hi[kk] = ExponentField(0);
      ok0[kk] = 0;
    } else {
      lo[kk] = ExponentField(MaxI(1, 128 - mn));
      hi[kk] = ExponentField(MinI(254, 380 - mx));
      ok0[kk] = -1;
    }
  }
  // Padding up to a whole vector: accept anything (the pads are never read).
  for (int kk = kb; kk < RoundUp(kb, kVL); ++kk) {
    lo[kk] = ExponentField(0);
    hi[kk] = ExponentField(255);
    ok0[kk] = -1;
  }
}

// Panel pack, in blocks of kVL consecutive k: block kk / kVL holds kPackW
// rows of kVL int32 words each: the tile/LUT offsets of panel rows 0..7 in
// rows 0..7, the bits of their float scales in rows 8..15 (panel rows >= the
// panel's row count hold 0 / +0.0f; the lanes past kb of the last block are
// never read). One pointer at PackAt(pk, kk) reaches row r's offset at
// q[r * kVL] and its scale at q[(8 + r) * kVL]: constant displacements, so the
// micro-kernels walk the pack with one register, and PackPanelIL stores each
// row's vector of kVL values as it is (an interleaved per-k record needed a
// 16x16 transpose per block: 6-11% of a GEMM with 64 columns).
constexpr int kPackW = 16;
// int32 words of one panel's pack for k blocks of up to kb_max.
inline int64_t PanelPackWords(int kb_max) { return RoundUp(kb_max, kVL) * kPackW; }
inline const int32_t* PackAt(const int32_t* pk, int kk) {
  return pk + (kk / kVL) * (kPackW * kVL) + kk % kVL;
}

inline int Log2Floor(int x) {
  int l = 0;
  while ((2 << l) <= x) ++l;
  return l;
}

// PackPanel straight into the blocked layout (kPackW words per kk):
// offsets u * ustride + kk * kkmul and scales of `rows` (<= 8) rows of
// a[:, k0:k0+kb]. Returns whether every element is fast-path safe.
//
// Per element this is a handful of single-instruction vector operations (it
// is still a sixth of the time of a GEMM with 64 columns): ustride is a power of
// two (kb and kNB are), so u * ustride is a shift of the mantissa bits; the
// scale is x & 0xff800000 for every x (a zero or subnormal x has a zero
// exponent field, so that is its signed zero); the range check compares the
// exponent field in place against BStats' bounds.
//
// `ahead` (ahead_rows rows; null when 0) is a later panel's a, whose strip
// a[:, k0:k0+kb] is prefetched one 64-byte line (16 floats) per row as the
// loop passes it: the strip of a long row is a pattern the hardware
// prefetchers do not follow, and spreading the prefetches over the loop keeps
// the line fill buffers from filling up (a burst of them per panel stalled
// the pack: 7% of 8192x576x64).
bool PackPanelIL(const float* a, int64_t lda, int rows, int kb, int mbits, int ustride, int kkmul,
                 const int32_t* lo, const int32_t* hi, const int32_t* ok0, int32_t* pk,
                 const float* ahead, int ahead_rows) {
  const int mshift = 23 - mbits;
  const int lg = Log2Floor(ustride);
  // offset = ((x >> mshift) & umask) << lg = (x >> (mshift - lg)) & (umask << lg).
  // Every stride used is a power of two with lg <= mshift (tiles: kb * kNB
  // (/ 2) <= 2^14 at M <= 7; gathers: 2^M at M <= 11); anything else would
  // take the exact scalar path rather than a slower pack.
  if (ustride != (1 << lg) || lg > mshift) return false;
  const VI vomask = Set1I(static_cast<int32_t>(((1u << mbits) - 1u) << lg));
  const VI vshift = Set1I(mshift - lg);
  const VI vexp = Set1I(0x7f800000);
  const VI vsignexp = Set1I(static_cast<int32_t>(0xff800000u));
  const VI vzero = Set1I(0);
  OkAcc ok = OkInit();
  VI vkk = MulLoI(LaneIota(), Set1I(kkmul));
  const VI vstep = Set1I(kVL * kkmul);
  for (int kk = 0; kk < kb; kk += kVL) {
    const int n = static_cast<int>(MinI(kVL, kb - kk));
    // Lanes kk >= kb load zeros (and the padded lo/hi/ok0 accept them).
    const VI vlo = LoadI(lo + kk), vhi = LoadI(hi + kk), vok0 = LoadI(ok0 + kk);
    VI o[8], s[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      if (r >= rows) {
        o[r] = vzero;
        s[r] = vzero;
        continue;
      }
      const uint32_t* arow = reinterpret_cast<const uint32_t*>(a + r * lda + kk);
      if (r < ahead_rows && kk % 16 == 0) __builtin_prefetch(ahead + r * lda + kk);
      const VI x = n == kVL ? LoadI(reinterpret_cast<const int32_t*>(arow)) : LoadPartialI(arow, n);
      o[r] = AddI(AndI(SrlvI(x, vshift), vomask), vkk);
      s[r] = AndI(x, vsignexp);
      ok = OkUpdate(ok, AndI(x, vexp), vlo, vhi, vok0);
    }
    int32_t* blk = pk + kk * kPackW;  // kk is a multiple of kVL
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      StoreI(blk + r * kVL, o[r]);
      StoreI(blk + (8 + r) * kVL, s[r]);
    }
    vkk = AddI(vkk, vstep);
  }
  return OkAll(ok);
}

// The acceptance test of PackPanelIL alone (no pack written): used when a
// panel packed once for a shared a meets another design's b.
bool PanelOk(const float* a, int64_t lda, int rows, int kb, const int32_t* lo, const int32_t* hi,
             const int32_t* ok0) {
  const VI vexp = Set1I(0x7f800000);
  OkAcc ok = OkInit();
  for (int kk = 0; kk < kb; kk += kVL) {
    const int n = static_cast<int>(MinI(kVL, kb - kk));
    const VI vlo = LoadI(lo + kk), vhi = LoadI(hi + kk), vok0 = LoadI(ok0 + kk);
    for (int r = 0; r < rows; ++r) {
      const uint32_t* arow = reinterpret_cast<const uint32_t*>(a + r * lda + kk);
      const VI x = n == kVL ? LoadI(reinterpret_cast<const int32_t*>(arow)) : LoadPartialI(arow, n);
      ok = OkUpdate(ok, AndI(x, vexp), vlo, vhi, vok0);
    }
  }
  return OkAll(ok);
}

// Decomposes b[k0:k0+kb, j0:j0+cols] into mantissa indices and signed
// power-of-two scales, padded with zeros to kNB columns.
void DecomposeB(const float* b, int64_t ldb, int64_t k0, int kb, int64_t j0, int cols, int mbits,
                int32_t* ibv, float* sbv) {
  const VI vumask = Set1I(static_cast<int32_t>((1u << mbits) - 1u));
  const VI vsignexp = Set1I(static_cast<int32_t>(0xff800000u));
  for (int kk = 0; kk < kb; ++kk) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(b + (k0 + kk) * ldb + j0);
    int32_t* ib = ibv + kk * kNB;
    float* sb = sbv + kk * kNB;
    for (int j = 0; j < kNB; j += kVL) {
      const int n = static_cast<int>(MinI(kVL, MaxI(0, cols - j)));
      // Lanes j >= cols load +0: index 0, scale +0.
      const VI x =
          n == kVL ? LoadI(reinterpret_cast<const int32_t*>(row + j)) : LoadPartialI(row + j, n);
      StoreI(ib + j, AndI(SrlI(x, 23 - mbits), vumask));
      // A zero or subnormal x has a zero exponent field: this is its signed zero.
      StoreF(sb + j, CastF(AndI(x, vsignexp)));
    }
  }
}

// Exact scalar path for one panel x column block x k block (a and b point at
// its first k), continuing the sequential sums held in c.
void ExactBlock(const float* a, int64_t lda, const float* b, int64_t ldb, int rows, int cols,
                int kb, const uint32_t* lut, int mbits, float* c, int64_t ldc) {
  for (int i = 0; i < rows; ++i) {
    const uint32_t* arow = reinterpret_cast<const uint32_t*>(a + i * lda);
    for (int j = 0; j < cols; ++j) {
      const uint32_t* bcol = reinterpret_cast<const uint32_t*>(b + j);
      float acc = c[i * ldc + j];
      for (int kk = 0; kk < kb; ++kk) {
        acc += BitsFloat(ApproxMulBits(arow[kk], bcol[kk * ldb], lut, mbits));
      }
      c[i * ldc + j] = acc;
    }
  }
}

// The MR x kNB accumulator block of a micro-kernel, from / to c.
template <int MR>
__attribute__((always_inline)) inline void LoadAcc(VF (&acc)[MR][kNV], const float* c,
                                                   int64_t ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < kNV; ++v) acc[r][v] = LoadF(c + r * ldc + v * kVL);
}

template <int MR>
__attribute__((always_inline)) inline void StoreAcc(VF (&acc)[MR][kNV], float* c, int64_t ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < kNV; ++v) StoreF(c + r * ldc + v * kVL, acc[r][v]);
}

// Tile micro-kernel: c[r][0:kNB] += sum_kk scale[r][kk] * tiles[off[r][kk] + 0:kNB].
//
// FMA is exact here: the fast path is only used where every product
// scale * tile value is an exactly representable normal float32 (the scale is
// +-2^e and the tile value 1.r * 2^(c + eb - 127) with r of M <= 11 bits, and
// the exponent of the product, ea + eb - 127 + c, was proven to lie in
// [1, 254]; a zero scale gives an exact signed zero). fma(s, t, acc) rounds
// s * t + acc once; since s * t is exact that equals round(acc + s * t), i.e.
// exactly what a separate multiply (exact, no rounding) then add computes.
// (The sign of an exact zero sum is the same as well: s * t == -0 and
// acc == -0 gives -0 both ways.) Never use FMA where a product may be inexact.
//
// BF16 = true reads bfloat16 tiles (kBf16Tiles, M <= 7; layout in the ISA's
// BuildTilesM<MB, true> / BuildTilesBf16): one kVL-word vector holds 2 kVL
// columns, columns 2 kVL h + l in the low halves and 2 kVL h + kVL + l in the
// high halves. Shifting a
// word left by 16 / masking its low half gives the float32 tile values
// exactly (they are exact bfloat16 values), so the FMAs, and the sums, are
// the same as with float32 tiles; the tiles take half the cache and the
// loads half the bandwidth.
constexpr bool kBf16Tiles = kIsaBf16Tiles && kNV % 2 == 0;

template <int MR, bool BF16>
inline void MicroTile(const int32_t* pk, int kb, const void* tiles, float* c, int64_t ldc) {
  VF acc[MR][kNV];
  const VI high_half = Set1I(static_cast<int32_t>(0xffff0000u));
  LoadAcc<MR>(acc, c, ldc);
  // Block by block of the pack, so that its pointer just steps a word.
  for (int kk0 = 0; kk0 < kb; kk0 += kVL) {
    const int32_t* q = pk + kk0 * kPackW;
    const int32_t* const q_end = q + MinI(kVL, kb - kk0);
    for (; q < q_end; ++q) {
      const float* qs = reinterpret_cast<const float*>(q + 8 * kVL);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const VF s = Set1F(qs[r * kVL]);
        const uint32_t off = static_cast<uint32_t>(q[r * kVL]);
        if constexpr (BF16) {
          const int32_t* bp = static_cast<const int32_t*>(tiles) + off;
#pragma GCC unroll 16
          for (int h = 0; h < kNV / 2; ++h) {
            VI x = LoadI(bp + h * kVL);
            // One load for both halves (GCC would otherwise fold the load into
            // both the shift and the mask: twice the loads).
            asm("" : "+v"(x));
            acc[r][2 * h] = FmaF(s, CastF(ShlI16(x)), acc[r][2 * h]);
            acc[r][2 * h + 1] = FmaF(s, CastF(AndI(x, high_half)), acc[r][2 * h + 1]);
          }
        } else {
          const float* bp = static_cast<const float*>(tiles) + off;
#pragma GCC unroll 16
          for (int v = 0; v < kNV; ++v) acc[r][v] = FmaF(s, LoadF(bp + v * kVL), acc[r][v]);
        }
      }
    }
  }
  StoreAcc<MR>(acc, c, ldc);
}

// A tile panel of kTilePanelRows rows (the ISA's choice: one pack record of
// 8 rows where the kernel's accumulators hold fewer), kMR rows at a time; the
// rows from `rows` on are skipped (a partial panel runs in zero-padded
// scratch, whose extra rows are never written back). Each output's sum is the
// same MicroTile loop as with kMR-row panels: the same bits.
template <bool BF16>
inline void TilePanel(const int32_t* pk, int kb, const void* tiles, float* c, int64_t ldc,
                      int rows) {
  constexpr int kRest = kTilePanelRows % kMR;
  int r = 0;
  for (; r + kMR <= kTilePanelRows && r < rows; r += kMR)
    MicroTile<kMR, BF16>(pk + r * kVL, kb, tiles, c + r * ldc, ldc);
  if constexpr (kRest > 0) {
    if (r < rows) MicroTile<kRest, BF16>(pk + r * kVL, kb, tiles, c + r * ldc, ldc);
  }
}

// LUT-lookup micro-kernel: c[r][j] += (Lf[ia][ib[j]] * sb[j]) * sa[r] per
// product, the entry looked up by `Row`, which is made once per (row, k)
// from the LUT row of a's mantissa (gather packs hold ia << M):
// - GatherRow: one gather per column vector;
// - LutRow<MB> (kIsaPermuteLookup, M <= 6): the row is loaded into registers
//   and looked up with permutes for all kNV vectors (LookupLutRow). Measured
//   (2 cores, ms, gathers vs permutes; MBM-like LUT of effective width 6):
//   25x50176x32 6.1 vs 5.4, 16x1024x1024 2.07 vs 1.22, 27x25088x64 5.3 vs 3.1.
//   At M = 7 (eight row registers, seven permute/blend operations per
//   vector) gathers were faster: 25x50176x32 6.3 vs 9.3 ms.
// Same entries, same expression: the same bits either way.
struct GatherRow {
  const uint32_t* row;
};
inline GatherRow LoadRow(const uint32_t* row, GatherRow*) { return GatherRow{row}; }
inline VI Lookup(const GatherRow& r, VI ib) { return GatherI(r.row, ib); }
// - GatherRow16: gathers from the 16-bit copy of the LUT (KSplit::lut16,
//   entries >> (23 - M)), shifted back: the same entries from half the
//   cache footprint.
struct GatherRow16 {
  const uint16_t* row;
};
inline GatherRow16 LoadRow(const uint16_t* row, GatherRow16*) { return GatherRow16{row}; }
inline VI Lookup(const GatherRow16& r, VI ib) { return GatherLowHalfI(r.row, ib); }
template <int MB>
inline LutRow<MB> LoadRow(const uint32_t* row, LutRow<MB>*) {
  return LoadLutRow<MB>(row);
}
template <int MB>
inline VI Lookup(const LutRow<MB>& r, VI ib) {
  return LookupLutRow<MB>(r, ib);
}

template <int MR, class Row, class Entry = uint32_t>
inline void MicroLookup(const int32_t* pk, int kb, const Entry* lut, const int32_t* ibv,
                        const float* sbv, float* c, int64_t ldc, int entry_shift = 0) {
  VF acc[MR][kNV];
  const VI one_exp = Set1I(127 << 23);
  LoadAcc<MR>(acc, c, ldc);
  for (int kk = 0; kk < kb; ++kk) {
    const int32_t* q = PackAt(pk, kk);
    const float* qs = reinterpret_cast<const float*>(q + 8 * kVL);
    VI ib[kNV];
    VF sb[kNV];
#pragma GCC unroll 16
    for (int v = 0; v < kNV; ++v) {
      ib[v] = LoadI(ibv + kk * kNB + v * kVL);
      sb[v] = LoadF(sbv + kk * kNB + v * kVL);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const VF s = Set1F(qs[r * kVL]);
      const Row row = LoadRow(lut + q[r * kVL], static_cast<Row*>(nullptr));
#pragma GCC unroll 16
      for (int v = 0; v < kNV; ++v) {
        VI entry = Lookup(row, ib[v]);
        if constexpr (sizeof(Entry) == 2) entry = SllI(entry, entry_shift);
        const VF lf = CastF(AddI(entry, one_exp));
        // Exact products (the panel's acceptance): fused = multiply, then add.
        acc[r][v] = FmaF(MulF(lf, sb[v]), s, acc[r][v]);
      }
    }
  }
  StoreAcc<MR>(acc, c, ldc);
}

template <int MR>
inline void MicroPermuteM(int mbits, const int32_t* pk, int kb, const uint32_t* lut,
                          const int32_t* ibv, const float* sbv, float* c, int64_t ldc) {
  switch (mbits) {
    case 1:
      return MicroLookup<MR, LutRow<1>>(pk, kb, lut, ibv, sbv, c, ldc);
    case 2:
      return MicroLookup<MR, LutRow<2>>(pk, kb, lut, ibv, sbv, c, ldc);
    case 3:
      return MicroLookup<MR, LutRow<3>>(pk, kb, lut, ibv, sbv, c, ldc);
    case 4:
      return MicroLookup<MR, LutRow<4>>(pk, kb, lut, ibv, sbv, c, ldc);
    case 5:
      return MicroLookup<MR, LutRow<5>>(pk, kb, lut, ibv, sbv, c, ldc);
    default:
      return MicroLookup<MR, LutRow<6>>(pk, kb, lut, ibv, sbv, c, ldc);
  }
}

// Closed-form micro-kernel (lut_family.h): like MicroLookup, but the LUT
// entry of each product is computed from the two mantissa indices (the LUT
// was checked to equal the family's closed form at every entry), so no
// gather: a few integer/float vector operations per 16 (8) products.
// lf = 1.r * 2^c exactly as the gathered entry would give, so the products
// and sums are bit-identical to MicroLookup's.
//
// MBM in four operations (it took 13 as integer code): with x = (ia|1)/2^M,
// y = (ib|1)/2^M, the integer sum of the bits of 1 + x and of y << (23 - M)
// is the float F = 1 + x + y when x + y < 1, else 2(x + y) (the carry moves
// into the exponent: Mitchell's form). With C = cu/2^M and G = F + C (exact):
// x + y < 1 gives G = 1 + x + y + C < 2 + C, MBM's low branch (halved once it
// reaches 2, where it loses no bit: (ia|1) + (ib|1) and cu are even); x + y
// >= 1 gives G = 2(x + y) + C, MBM's entry below 4, and F (the uncorrected
// 2(x + y)) from 4 on. The low branch never reaches 4, so entry = G >= 4 ?
// F : G. Positive floats compare as integers.
template <int MR, int FAM>
inline void MicroFormula(const int32_t* pk, int kb, int mbits, const int32_t* ibv, const float* sbv,
                         float* c, int64_t ldc) {
  VF acc[MR][kNV];
  const int sh = 23 - mbits;
  const VI one_exp = Set1I(127 << 23);
  const VI ones = Set1I(1);
  const VI keep = Set1I(static_cast<int32_t>(0xffffffffu << sh));
  const int32_t cu = FAM == kFamilyMbm ? (1 << (mbits - 4)) + (1 << (mbits - 6)) : 0;
  const VF vc = Set1F(static_cast<float>(cu) / static_cast<float>(1 << mbits));  // exact
  const VI below_four = Set1I(0x407fffff);  // the largest float below 4
  LoadAcc<MR>(acc, c, ldc);
  for (int kk = 0; kk < kb; ++kk) {
    const int32_t* q = PackAt(pk, kk);
    const float* qs = reinterpret_cast<const float*>(q + 8 * kVL);
    VI col[kNV];
    VF sb[kNV];
#pragma GCC unroll 16
    for (int v = 0; v < kNV; ++v) {
      const VI ib = LoadI(ibv + kk * kNB + v * kVL);
      sb[v] = LoadF(sbv + kk * kNB + v * kVL);
      if (FAM == kFamilyMitchell) col[v] = SllI(ib, sh);
      if (FAM == kFamilyTruncate) col[v] = OrI(SllI(ib, sh), one_exp);  // bits of 1 + ib/2^M
      if (FAM == kFamilyMbm) col[v] = SllI(OrI(ib, ones), sh);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const VF s = Set1F(qs[r * kVL]);
      const int32_t ia = q[r * kVL] >> mbits;  // gather packs hold ia << M
      VI rowv;
      if (FAM == kFamilyMitchell) rowv = Set1I((ia << sh) + (127 << 23));
      if (FAM == kFamilyTruncate) rowv = Set1I((127 << 23) | (ia << sh));
      if (FAM == kFamilyMbm) rowv = Set1I(((ia | 1) << sh) + (127 << 23));
#pragma GCC unroll 16
      for (int v = 0; v < kNV; ++v) {
        VF lf;
        if (FAM == kFamilyMitchell) {
          lf = CastF(AddI(rowv, col[v]));
        } else if (FAM == kFamilyTruncate) {
          // (1 + ia/2^M)(1 + ib/2^M) is exact in float32 (2M + 2 <= 24 bits);
          // truncating its mantissa to M bits gives 1.r * 2^c.
          lf = CastF(AndI(CastI(MulF(CastF(rowv), CastF(col[v]))), keep));
        } else {
          const VI f = AddI(rowv, col[v]);
          const VI g = CastI(AddF(CastF(f), vc));
          lf = CastF(SelectGtI(g, below_four, g, f));
        }
        // lf * sb and its product with s are exact (the panel's acceptance),
        // so the fused multiply-add rounds exactly as the add of that product.
        acc[r][v] = FmaF(MulF(lf, sb[v]), s, acc[r][v]);
      }
    }
  }
  StoreAcc<MR>(acc, c, ldc);
}

// A run of an implicit patch matrix (implicit_a.h) copied a vector at a time;
// a contiguous run's last vector is stored whole (lanes past the run hold
// whatever follows it in x, or zeros), which the strip's next run or row, or
// its kVL floats of slack, absorbs. (Scalar copies of runs of 14-32 floats
// cost a LeNet-5 train step 6% in the kernel-gradient gather.)
struct VectorRunCopy {
  void operator()(float* d, const float* s, int64_t len, int64_t stride) const {
    if (stride != 1) {
      for (int64_t e = 0; e < len; ++e) d[e] = s[e * stride];
      return;
    }
    int64_t e = 0;
    for (; e + kVL <= len; e += kVL)
      StoreI(reinterpret_cast<int32_t*>(d + e), LoadI(reinterpret_cast<const int32_t*>(s + e)));
    if (e < len)
      StoreI(reinterpret_cast<int32_t*>(d + e),
             LoadPartialI(reinterpret_cast<const uint32_t*>(s + e), static_cast<int>(len - e)));
  }
};

// Panels ahead whose a strips are prefetched while packing.
constexpr int kPackAhead = 8;

enum Strategy { kTiles = 1, kGather = 2 };

// Column blocks a task may run per packed panel (RunTask fuse_blocks).
constexpr int64_t kFuseMaxBlocks = 8;

struct Plan {
  const GemmProblem* p;
  const KSplit* ks;
  int strategy;
  int mr;            // rows per micro-kernel panel
  int kb_max;        // k block
  bool bf16;         // bfloat16 tiles (kBf16Tiles and M <= 7)
  bool perm;         // permute tiles (kIsaPermTiles and M <= 3; mr = 8)
  int ustride;       // floats (bf16: words) between the tiles of consecutive mantissa values
  int64_t nrc, ncc;  // row / column chunks per problem
  int64_t rows_per, cols_per;
  // Design grouping: with dg > 1 a task computes its (row chunk, column chunk)
  // block for dg designs of one batch index (ks covers every problem then),
  // packing a once when it is shared by the designs (a_design_stride == 0)
  // and reading b's statistics / decomposition once when b is shared.
  int64_t dg, ngroups;
  bool share_a, share_b, share_tiles;
  // Gathers from a LUT beyond the L2 cache (StreamsLutRows): per k block,
  // each row runs every column block of the task in turn, so that the LUT
  // rows of its (row, k) pairs are fetched from memory once per task rather
  // than once per column block (RunTask).
  bool stream;
  int failed;  // set with __atomic builtins
};

// Scratch slots.
enum {
  kSlotTiles = 0,
  kSlotPack = 1,
  kSlotStats = 2,
  kSlotB = 3,
  kSlotC = 4,
  kSlotA = 5,
  kSlotPairs = 6,
  kSlotQuad = 7
};

// Designs per task whose pair tables (kIsaPairLut) a task keeps.
constexpr int64_t kMaxPairDesigns = 64;
// int32 words of one pair table (M <= 7).
constexpr int64_t kPairWords = int64_t{1} << 13;

// Whether a task of `designs` designs with `blocks` column blocks runs each
// packed panel over all of them (RunTask fuse_blocks; the plan splits such
// problems rows first): the AVX2 unit's tile path, one design, 2 to
// kFuseMaxBlocks blocks whose tiles fit L2/4.
bool FusesBlocks(const Plan& pl, int mbits, int64_t designs, int64_t blocks) {
  const int64_t block_tiles_bytes = (int64_t{4} << mbits) * pl.ustride;
  return kVL == 8 && pl.strategy == kTiles && !pl.perm && !pl.stream && designs == 1 &&
         blocks >= 2 && blocks <= kFuseMaxBlocks &&
         blocks * block_tiles_bytes <= static_cast<int64_t>(L2CacheBytes() / 4);
}

void RunTask(void* arg, int64_t task) {
  Plan& pl = *static_cast<Plan*>(arg);
  const GemmProblem& p = *pl.p;
  const KSplit& ks = *pl.ks;
  const int64_t per_unit = pl.nrc * pl.ncc;
  const int64_t units = pl.dg > 1 ? p.batch * pl.ngroups : ks.probs;
  const int64_t per_chunk = per_unit * units;
  const int64_t chunk = task / per_chunk;
  const int64_t unit = (task % per_chunk) / per_unit;
  const int64_t rc = (task % per_unit) / pl.ncc;
  const int64_t cc = task % pl.ncc;
  // The problems of this task: designs d0 .. d0 + nd - 1 at batch index bi.
  int64_t d0, bi, nd;
  if (pl.dg > 1) {
    bi = unit % p.batch;
    d0 = (unit / p.batch) * pl.dg;
    nd = MinI(pl.dg, p.designs - d0);
  } else {
    const int64_t prob = ks.prob_begin + unit;
    d0 = prob / p.batch;
    bi = prob % p.batch;
    nd = 1;
  }
  if (nd <= 0) return;
  const bool share_a = pl.share_a && nd > 1, share_b = pl.share_b && nd > 1;
  const bool share_tiles = pl.share_tiles && nd > 1;
  const int64_t kbeg = chunk * ks.chunk;
  const int64_t K = MinI(p.k, kbeg + ks.chunk), N = p.n, lda = p.k, ldb = p.n, ldc = p.n;
  const int mbits = p.mbits;
  const int64_t r0 = rc * pl.rows_per, r1 = MinI(p.m, r0 + pl.rows_per);
  const int64_t c0 = cc * pl.cols_per, c1 = MinI(N, c0 + pl.cols_per);
  if (r0 >= r1 || c0 >= c1) return;
  const int mr = pl.mr;
  const int KB = pl.kb_max;
  const int64_t kstride = RoundUp(KB, kVL);
  const int64_t npanels = CeilDiv(r1 - r0, mr);
  // Per-design width of the tile and permute paths (KSplit::eff_bits) and the
  // LUT they use; a closed-form design's is its family's width
  // (KSplit::family_bits, else M: a family LUT checked at M is never narrower).
  const bool narrow = ks.eff_bits != nullptr;
  auto bits_of = [&](int64_t dd) {
    const bool formula = ks.families != nullptr && ks.families[d0 + dd] != kFamilyNone;
    if (pl.strategy == kGather && formula)
      return ks.family_bits != nullptr ? ks.family_bits[d0 + dd] : mbits;
    return narrow ? ks.eff_bits[d0 + dd] : mbits;
  };
  // A shared a is packed once per distinct width (slot_of[width]).
  int slot_of[kMaxMantissaBits + 1];
  int64_t nwidths = 0;
  for (int w = 0; w <= kMaxMantissaBits; ++w) slot_of[w] = -1;
  for (int64_t dd = 0; dd < nd; ++dd) {
    const int w = bits_of(dd);
    if (slot_of[w] < 0) slot_of[w] = static_cast<int>(nwidths++);
  }
  // Packs of a held at once: one when a is shared (the designs run one width
  // at a time, below), else one per design.
  const int64_t npacks = share_a ? 1 : nd;
  const int64_t nstats = share_b ? 1 : nd;  // b statistics held at once
  // One column block (every output at most kNB wide, e.g. a conv's im2col
  // GEMM): each panel is packed just before its first kernel call, so its
  // pack is read back from L1 instead of being written out for the whole row
  // range first (a 4096-row range at kb = 128 is a 4 MB pack: store and
  // reload traffic that was a quarter of 8192x576x64). Same packs, same bits.
  // (Streaming packs every panel up front: its rows are read column block
  // by column block, outside run_block.)
  // A few column blocks of one design on the tile path (the AVX2 unit's
  // 32-column blocks: a 64-column conv GEMM): every block's tiles are built
  // first and each panel, packed once into L1, runs all of them, so that a
  // task packs a once for all its columns (fuse_blocks; tiles up to L2/4).
  // The plan then splits such a problem rows first (fusable). Zen 3, 2
  // threads, one process, alternated, minimum of 10, ms, one block per task
  // vs fused: 8192x576x64 mbm3 14.1 vs 10.8, random M = 3 16.1 vs 12.9;
  // 12544x800x64 random M = 3 40.4 vs 37.2; 256^3 mbm3 0.70 vs 0.62;
  // 4096x288x128 equal.
  const int64_t task_blocks = CeilDiv(c1 - c0, kNB);
  const bool fuse_blocks = FusesBlocks(pl, mbits, nd, task_blocks);
  const bool fuse_pack = !pl.stream && (c1 - c0 <= kNB || fuse_blocks);
  // ... and when no other design reads the pack later, every panel reuses one
  // pack slot, which then stays in L1.
  const bool pack_slot_reused = fuse_pack && (!share_a || nd == 1);
  const int64_t panel_words = PanelPackWords(KB);
  const int64_t pack_words = (pack_slot_reused ? 1 : npanels) * panel_words;

  const size_t tiles_bytes = pl.strategy != kTiles ? 64
                             : pl.perm ? size_t{32} * static_cast<size_t>(KB) * kNB
                                       : (size_t{4} << mbits) * static_cast<size_t>(pl.ustride);
  float* tiles = static_cast<float*>(
      ThreadScratch(kSlotTiles, tiles_bytes * static_cast<size_t>(fuse_blocks ? task_blocks : 1)));
  // The tiles of the column block at j0 (its own set with fuse_blocks).
  auto tiles_at = [&](int64_t j0) {
    return fuse_blocks ? tiles + (j0 - c0) / kNB * static_cast<int64_t>(tiles_bytes / 4) : tiles;
  };
  char* pack = static_cast<char*>(
      ThreadScratch(kSlotPack, static_cast<size_t>(npacks * pack_words * 4 + nd * npanels)));
  int32_t* stats = static_cast<int32_t*>(ThreadScratch(kSlotStats, nstats * kstride * 3 * 4));
  // b decomposed: one column block, or (stream) every column block of the task.
  const int64_t dec_blocks = pl.stream ? CeilDiv(pl.cols_per, kNB) : fuse_blocks ? task_blocks : 1;
  char* bdec = static_cast<char*>(ThreadScratch(kSlotB, dec_blocks * kstride * kNB * 8));
  const int64_t max_mr = MaxI(MaxI(kTilePanelRows, kMRG), kPermRows);
  float* ctmp = static_cast<float*>(ThreadScratch(kSlotC, (max_mr + kMRG) * kNB * 4));
  // An implicit patch matrix: the rows x k-block strip being packed, copied
  // out of the convolution's input.
  const ImplicitA* const implicit = p.implicit_a;
  float* strip = implicit != nullptr
                     ? static_cast<float*>(ThreadScratch(kSlotA, (max_mr * kstride + kVL) * 4))
                     : nullptr;
  // Four-row gathers (streaming, AVX-512): one interleaved table of 2^M
  // 64-bit words, and b's indices in its order (QuadPos) for every column
  // block of the task.
  const bool quad_wanted = kIsaQuadGather && pl.stream && ks.quad_gathers && ks.lut16 != nullptr;
  const size_t quad_words = size_t{1} << mbits;
  char* quad_scratch =
      quad_wanted
          ? static_cast<char*>(ThreadScratch(
                kSlotQuad, quad_words * 8 + static_cast<size_t>(dec_blocks * kstride * kNB * 4)))
          : nullptr;
  uint64_t* quad = reinterpret_cast<uint64_t*>(quad_scratch);
  auto qpos_of = [&](int64_t jb) {
    return reinterpret_cast<int32_t*>(quad_scratch + quad_words * 8) + jb * kstride * kNB;
  };
  if (!tiles || !pack || !stats || !bdec || !ctmp || (implicit != nullptr && !strip) ||
      (quad_wanted && !quad)) {
    __atomic_store_n(&pl.failed, 1, __ATOMIC_RELAXED);
    return;
  }
  // Pair tables (kIsaPairLut, bfloat16 tiles at 4 <= M <= 7), made for each
  // design on its first tile build in this task: 2^(2M) * 2 bytes against
  // 2^M * kb * kNB * 2 per tile build. Without scratch for them the tiles are
  // built one value at a time (same bits).
  const bool pairs_wanted =
      kIsaPairLut && pl.strategy == kTiles && pl.bf16 && ks.pair_tiles && nd <= kMaxPairDesigns;
  int32_t* pair_tabs = pairs_wanted
                           ? static_cast<int32_t*>(ThreadScratch(kSlotPairs, nd * kPairWords * 4))
                           : nullptr;
  bool pair_built[kMaxPairDesigns] = {};
  auto pairs_of = [&](int64_t dd, const uint32_t* lut_mb, int mb) -> const int32_t* {
    if (pair_tabs == nullptr || mb < 4 || mb > 7) return nullptr;
    int32_t* t = pair_tabs + dd * kPairWords;
    if (!pair_built[dd]) {
      BuildPairLut(lut_mb, mb, t);
      pair_built[dd] = true;
    }
    return t;
  };
  int32_t* pk_base = reinterpret_cast<int32_t*>(pack);
  char* panel_ok = pack + npacks * pack_words * 4;  // [nd][npanels]
  // Column block jb's decomposition (jb = 0 unless streaming).
  auto ibv_of = [&](int64_t jb) { return reinterpret_cast<int32_t*>(bdec) + jb * kstride * kNB; };
  auto sbv_of = [&](int64_t jb) {
    return reinterpret_cast<float*>(bdec + dec_blocks * kstride * kNB * 4) + jb * kstride * kNB;
  };
  int32_t* ibv = ibv_of(0);
  float* sbv = sbv_of(0);

  auto a_of = [&](int64_t dd) {
    return p.a + (d0 + dd) * p.a_design_stride + bi * p.a_batch_stride;
  };
  // a[i0 : i0 + rows, k0 : k0 + kb] of design dd: a pointer to its first
  // element and the row stride (an implicit patch matrix: the strip, gathered).
  auto a_block = [&](int64_t dd, int64_t i0, int rows, int64_t k0, int kb, int64_t* ld) {
    if (implicit == nullptr) {
      *ld = lda;
      return a_of(dd) + i0 * lda + k0;
    }
    GatherImplicitA(*implicit, a_of(dd), i0, rows, k0, kb, strip, kstride, VectorRunCopy());
    *ld = kstride;
    return static_cast<const float*>(strip);
  };
  auto b_of = [&](int64_t dd) {
    return p.b + (d0 + dd) * p.b_design_stride + bi * p.b_batch_stride;
  };
  auto c_of = [&](int64_t dd) {
    const int64_t prob = (d0 + dd) * p.batch + bi;
    // Chunk `chunk` of k (the whole of k without split-K), summed from +0.
    return ks.part == nullptr ? p.out + prob * p.m * p.n
                              : ks.part + (chunk * ks.probs + (prob - ks.prob_begin)) * p.m * p.n;
  };

  // The pack's offsets: into the tiles (u * ustride + kk * kkmul), bare
  // mantissa indices (permute tiles) or LUT rows (gathers: u << M).
  const bool tile_offsets = pl.strategy == kTiles && !pl.perm;
  const int kkmul = tile_offsets ? (pl.bf16 ? kNB / 2 : kNB) : 0;
  auto pack_stride = [&](int64_t dd) {
    return tile_offsets ? pl.ustride : (pl.perm ? 1 : 1 << bits_of(dd));
  };
  auto pack_of = [&](int64_t dd, int64_t pi) {
    return pk_base + (share_a ? 0 : dd) * pack_words + (pack_slot_reused ? 0 : pi) * panel_words;
  };
  // Packs panel pi of design dd's a (its width's pack when a is shared).
  auto pack_panel = [&](int64_t dd, int64_t k0, int kb, int64_t pi) {
    const int32_t* st = stats + (share_b ? 0 : dd) * kstride * 3;
    const int64_t i0 = r0 + pi * mr;
    const int rows = static_cast<int>(MinI(mr, r1 - i0));
    // (A gathered strip is in cache already: no prefetch.)
    const int64_t i_ahead = i0 + kPackAhead * mr;  // panel pi + kPackAhead, if any
    const int ahead_rows =
        implicit != nullptr ? 0 : static_cast<int>(MaxI(0, MinI(mr, r1 - i_ahead)));
    int64_t ld = 0;
    const float* ablk = a_block(dd, i0, rows, k0, kb, &ld);
    panel_ok[dd * npanels + pi] = PackPanelIL(
        ablk, ld, rows, kb, bits_of(dd), pack_stride(dd), kkmul, st, st + kstride, st + 2 * kstride,
        pack_of(dd, pi), ahead_rows > 0 ? a_of(dd) + i_ahead * lda + k0 : nullptr, ahead_rows);
    if (pl.perm) TransposePermPack(pack_of(dd, pi), kb);
  };
  // Acceptance of panel pi for design dd, whose a is the shared pack of design first.
  auto share_panel = [&](int64_t dd, int64_t first, int64_t k0, int kb, int64_t pi) {
    if (share_b) {
      panel_ok[dd * npanels + pi] = panel_ok[first * npanels + pi];
      return;
    }
    const int32_t* st = stats + dd * kstride * 3;
    const int64_t i0 = r0 + pi * mr;
    const int rows = static_cast<int>(MinI(mr, r1 - i0));
    int64_t ld = 0;
    const float* ablk = a_block(dd, i0, rows, k0, kb, &ld);
    panel_ok[dd * npanels + pi] = PanelOk(ablk, ld, rows, kb, st, st + kstride, st + 2 * kstride);
  };
  // Panel pi of design dd ready for its kernel: packed by the pass's first
  // design (or by every design when a is not shared), checked by the others.
  auto prepare_panel = [&](int64_t dd, int64_t first, int64_t k0, int kb, int64_t pi) {
    if (dd == first || !share_a)
      pack_panel(dd, k0, kb, pi);
    else
      share_panel(dd, first, k0, kb, pi);
  };
  // With a shared, the designs run in one pass per width (each design's sums
  // still go over k in order; designs are independent), so that only one pack
  // of a is alive: a stack of widths 7, 5, 3 sharing a 50176x25 a held three
  // 3.2 MB packs per task, and one call over 8 designs took 1.0-1.2x the time
  // of 8 single-design calls (0.7-0.8x with one width).
  for (int64_t pass = 0; pass < (share_a ? nwidths : 1); ++pass) {
    auto in_pass = [&](int64_t dd) { return !share_a || slot_of[bits_of(dd)] == pass; };
    for (int64_t k0 = kbeg; k0 < K; k0 += KB) {
      const int kb = static_cast<int>(MinI(KB, K - k0));
      // Design-independent work once per shared operand: b statistics, the a
      // pack (once per width); the acceptance of each (design, panel) pair.
      int64_t first = -1;  // the pass's first design: it packs a, the others copy
      for (int64_t dd = 0; dd < nd; ++dd) {
        if (!in_pass(dd)) continue;
        if (first < 0 || !share_b) {
          int32_t* st = stats + (share_b ? 0 : dd) * kstride * 3;
          BStats(b_of(dd), ldb, k0, kb, c0, c1, st, st + kstride, st + 2 * kstride);
        }
        if (first < 0) first = dd;
        // (With fuse_pack the kernel loop below prepares each panel.)
        if (!fuse_pack)
          for (int64_t pi = 0; pi < npanels; ++pi) prepare_panel(dd, first, k0, kb, pi);
      }
      // One panel x column block x k block of design dd: zeroed at the first k
      // block, then the exact scalar path or the strategy's micro-kernel (b
      // decomposed into ibv / sbv, tiles built for this column block).
      auto run_block = [&](int64_t dd, int64_t first, int64_t k0, int kb, int64_t pi, int64_t j0,
                           int cols, const int32_t* ibv, const float* sbv) {
        const int mb = bits_of(dd);
        const float* B = b_of(dd);
        const uint32_t* lut = p.lut + (d0 + dd) * p.lut_design_stride;
        // The LUT at width mb (the narrow one when bits_of narrowed it).
        const uint32_t* lut_mb = mb == mbits || !narrow ? lut : ks.eff_lut[d0 + dd];
        const int family = ks.families != nullptr ? ks.families[d0 + dd] : kFamilyNone;
        const int64_t i0 = r0 + pi * mr;
        const int rows = static_cast<int>(MinI(mr, r1 - i0));
        if (fuse_pack && j0 == c0) prepare_panel(dd, first, k0, kb, pi);
        float* cblk = c_of(dd) + i0 * ldc + j0;
        // Every sum starts from +0 at the first k block. Zeroing each panel
        // just before its kernel reads it, rather than the task's whole C up
        // front, keeps the block in L1 and saves a pass over C (a memset per
        // 128-byte row: 10-15% of 50176x25x32).
        if (k0 == kbeg) {
          if (cols == kNB) {
            for (int r = 0; r < rows; ++r)
              for (int v = 0; v < kNB / kVL; ++v) StoreF(cblk + r * ldc + v * kVL, Set1F(0.0f));
          } else {
            for (int r = 0; r < rows; ++r)
              for (int j = 0; j < cols; ++j) cblk[r * ldc + j] = 0.0f;
          }
        }
        if (!panel_ok[dd * npanels + pi]) {
          int64_t ld = 0;
          const float* ablk = a_block(dd, i0, rows, k0, kb, &ld);
          ExactBlock(ablk, ld, B + k0 * ldb + j0, ldb, rows, cols, kb, lut, mbits, cblk, ldc);
          return;
        }
        const bool full = rows == mr && cols == kNB;
        float* ct = cblk;
        int64_t ldt = ldc;
        if (!full) {
          ct = ctmp;
          ldt = kNB;
          for (int r = 0; r < mr; ++r)
            for (int j = 0; j < kNB; ++j)
              ctmp[r * kNB + j] = (r < rows && j < cols) ? cblk[r * ldc + j] : 0.0f;
        }
        const int32_t* pk = pack_of(dd, pi);
        if (pl.strategy == kTiles && pl.perm) {
          MicroPermTile(pk, kb, tiles, ct, ldt);
        } else if (pl.strategy == kTiles && pl.bf16) {
          TilePanel<true>(pk, kb, tiles_at(j0), ct, ldt, rows);
        } else if (pl.strategy == kTiles) {
          TilePanel<false>(pk, kb, tiles_at(j0), ct, ldt, rows);
        } else if (family == kFamilyMitchell) {
          MicroFormula<kMRG, kFamilyMitchell>(pk, kb, mb, ibv, sbv, ct, ldt);
        } else if (family == kFamilyTruncate) {
          MicroFormula<kMRG, kFamilyTruncate>(pk, kb, mb, ibv, sbv, ct, ldt);
        } else if (family == kFamilyMbm) {
          MicroFormula<kMRG, kFamilyMbm>(pk, kb, mb, ibv, sbv, ct, ldt);
        } else if (kIsaPermuteLookup && mb <= 6) {
          MicroPermuteM<kMRG>(mb, pk, kb, lut_mb, ibv, sbv, ct, ldt);
        } else if (ks.lut16 != nullptr && ks.lut16[d0 + dd] != nullptr) {
          MicroLookup<kMRG, GatherRow16>(pk, kb, ks.lut16[d0 + dd], ibv, sbv, ct, ldt, 23 - mbits);
        } else {
          MicroLookup<kMRG, GatherRow>(pk, kb, lut_mb, ibv, sbv, ct, ldt);
        }
        if (!full) {
          for (int r = 0; r < rows; ++r)
            for (int j = 0; j < cols; ++j) cblk[r * ldc + j] = ctmp[r * kNB + j];
        }
      };
      if (pl.stream) {
        // Per design: b decomposed for every column block; then each row of a
        // panel runs all of them in turn, so that the LUT rows of its kb
        // (row, k) pairs (8 rows of 4 KB at M = 11) stay in L1 across the
        // column blocks instead of being fetched again for each. (Whole
        // 4-row panels per column block kept 64 LUT rows in L2: 1024^3 at
        // M = 11 took 267-272 ms, row by row 193-229.) Panels with special
        // values, and designs that do not gather from their full-width LUT,
        // run as usual, a panel per column block.
        for (int64_t dd = 0; dd < nd; ++dd) {
          if (!in_pass(dd)) continue;
          const bool gathers = (ks.families == nullptr || ks.families[d0 + dd] == kFamilyNone) &&
                               bits_of(dd) == mbits;
          const uint16_t* lut16 = ks.lut16 != nullptr ? ks.lut16[d0 + dd] : nullptr;
          const bool quads = quad_wanted && gathers && lut16 != nullptr;
          for (int64_t j0 = c0, jb = 0; j0 < c1; j0 += kNB, ++jb) {
            DecomposeB(b_of(dd), ldb, k0, kb, j0, static_cast<int>(MinI(kNB, c1 - j0)), bits_of(dd),
                       ibv_of(jb), sbv_of(jb));
            if (quads)
              for (int64_t x = 0; x < kb * kNB; x += kVL)
                StoreI(qpos_of(jb) + x, QuadPosI(LoadI(ibv_of(jb) + x)));
          }
          const uint32_t* lut = p.lut + (d0 + dd) * p.lut_design_stride;
          float* C = c_of(dd);
          for (int64_t pi = 0; pi < npanels; ++pi) {
            if (!gathers || !panel_ok[dd * npanels + pi]) {
              for (int64_t j0 = c0, jb = 0; j0 < c1; j0 += kNB, ++jb)
                run_block(dd, first, k0, kb, pi, j0, static_cast<int>(MinI(kNB, c1 - j0)),
                          ibv_of(jb), sbv_of(jb));
              continue;
            }
            const int64_t i0 = r0 + pi * mr;
            const int rows = static_cast<int>(MinI(mr, r1 - i0));
            int r = 0;
            // Four rows at a time: per k, their LUT rows interleaved, then
            // every column of the task (each output still gets its k in
            // ascending order). The rows left over run one at a time below.
            for (; quads && r + 4 <= rows; r += 4) {
              float* c4 = C + (i0 + r) * ldc;
              if (k0 == kbeg)
                for (int t = 0; t < 4; ++t)
                  for (int64_t j = c0; j < c1; ++j) c4[t * ldc + j] = 0.0f;
              const int64_t row_lines = (int64_t{2} << mbits) / 64;
              const int64_t per_block = CeilDiv(row_lines, CeilDiv(c1 - c0, kNB));
              for (int kk = 0; kk < kb; ++kk) {
                const int32_t* q = PackAt(pack_of(dd, pi), kk) + r * kVL;
                const float* qs = reinterpret_cast<const float*>(q + 8 * kVL);
                BuildQuadTable(lut16 + q[0], lut16 + q[kVL], lut16 + q[2 * kVL], lut16 + q[3 * kVL],
                               1 << mbits, quad);
                const float s4[4] = {qs[0], qs[kVL], qs[2 * kVL], qs[3 * kVL]};
                // The next table's four LUT rows (the next k, else the next
                // four rows' first), fetched into L2 a slice per column
                // block: their loads were a quarter of the time, waiting on
                // memory, without.
                const int32_t* qn = kk + 1 < kb     ? PackAt(pack_of(dd, pi), kk + 1) + r * kVL
                                    : r + 8 <= rows ? PackAt(pack_of(dd, pi), 0) + (r + 4) * kVL
                                                    : nullptr;
                for (int64_t j0 = c0, jb = 0; j0 < c1; j0 += kNB, ++jb) {
                  QuadStep(quad, qpos_of(jb) + kk * kNB, sbv_of(jb) + kk * kNB, s4, c4 + j0, ldc,
                           static_cast<int>(MinI(kNB, c1 - j0)), 23 - mbits);
                  if (qn == nullptr) continue;
                  for (int64_t l = jb * per_block; l < MinI(row_lines, (jb + 1) * per_block); ++l)
                    for (int t = 0; t < 4; ++t)
                      __builtin_prefetch(lut16 + qn[t * kVL] + l * 32, 0, 2);
                }
              }
            }
            for (; r < rows; ++r) {
              float* crow = C + (i0 + r) * ldc;
              if (k0 == kbeg)
                for (int64_t j = c0; j < c1; ++j) crow[j] = 0.0f;
              // Row r of the panel's pack: its offset and scale words sit r
              // vectors further on.
              const int32_t* pk = pack_of(dd, pi) + r * kVL;
              for (int64_t j0 = c0, jb = 0; j0 < c1; j0 += kNB, ++jb) {
                const int cols = static_cast<int>(MinI(kNB, c1 - j0));
                float* ct = cols == kNB ? crow + j0 : ctmp;
                if (cols < kNB)
                  for (int j = 0; j < kNB; ++j) ctmp[j] = j < cols ? crow[j0 + j] : 0.0f;
                if (lut16 != nullptr)
                  MicroLookup<1, GatherRow16>(pk, kb, lut16, ibv_of(jb), sbv_of(jb), ct, kNB,
                                              23 - mbits);
                else
                  MicroLookup<1, GatherRow>(pk, kb, lut, ibv_of(jb), sbv_of(jb), ct, kNB);
                if (cols < kNB)
                  for (int j = 0; j < cols; ++j) crow[j0 + j] = ctmp[j];
              }
            }
          }
        }
        continue;
      }
      // Design dd's tiles at width mb for the decomposed block (ibv, sbv).
      auto build_tiles = [&](int64_t dd, int mb, const int32_t* dibv, const float* dsbv,
                             float* dst) {
        const uint32_t* lut = p.lut + (d0 + dd) * p.lut_design_stride;
        const uint32_t* lut_mb = mb == mbits || !narrow ? lut : ks.eff_lut[d0 + dd];
        if (pl.perm)
          BuildPermTiles(lut_mb, mb, kb * kNB, dibv, dsbv, dst);
        else if (pl.bf16)
          BuildTilesBf16(lut_mb, mb, kb * kNB, dibv, dsbv, reinterpret_cast<int32_t*>(dst),
                         pl.ustride, ks.byte_tiles, pairs_of(dd, lut_mb, mb));
        else
          BuildTiles(lut_mb, mb, kb * kNB, dibv, dsbv, dst, pl.ustride);
      };
      if (fuse_blocks) {
        // One design (nd == 1): each block's b decomposed and tiles built,
        // then per panel every block (the panel packed at the first).
        const int mb = bits_of(0);
        for (int64_t j0 = c0, jb = 0; j0 < c1; j0 += kNB, ++jb) {
          DecomposeB(b_of(0), ldb, k0, kb, j0, static_cast<int>(MinI(kNB, c1 - j0)), mb, ibv_of(jb),
                     sbv_of(jb));
          build_tiles(0, mb, ibv_of(jb), sbv_of(jb), tiles_at(j0));
        }
        for (int64_t pi = 0; pi < npanels; ++pi)
          for (int64_t j0 = c0, jb = 0; j0 < c1; j0 += kNB, ++jb)
            run_block(0, first, k0, kb, pi, j0, static_cast<int>(MinI(kNB, c1 - j0)), ibv_of(jb),
                      sbv_of(jb));
        continue;
      }
      for (int64_t j0 = c0; j0 < c1; j0 += kNB) {
        const int cols = static_cast<int>(MinI(kNB, c1 - j0));
        // Designs innermost: the shared pack / b decomposition stay in cache.
        int dec_bits = -1;
        for (int64_t dd = 0; dd < nd; ++dd) {
          if (!in_pass(dd)) continue;
          const int mb = bits_of(dd);
          if (dd == 0 || !share_b || mb != dec_bits)
            DecomposeB(b_of(dd), ldb, k0, kb, j0, cols, mb, ibv, sbv);
          if (pl.strategy == kTiles && (dd == 0 || !share_tiles || mb != dec_bits))
            build_tiles(dd, mb, ibv, sbv, tiles);
          dec_bits = mb;
          float* C = c_of(dd);
          for (int64_t pi = 0; pi < npanels; ++pi) {
            if (pi + 1 < npanels && g_no_c_prefetch == 0) {
              // The next panel's block of C, a row per ldc apart: from L3 at
              // every k block of a task whose C outgrows L2, which the
              // hardware prefetchers do not foresee. A few percent on Zen 3
              // (one process, alternated, minimum, ms, with vs without: one
              // thread 1024^3 mbm3 71.2 vs 74.6, two mbm7 90.6 vs 96.7).
              const int64_t i1 = r0 + (pi + 1) * mr;
              const int64_t rows1 = MinI(mr, r1 - i1);
              for (int64_t r = 0; r < rows1; ++r)
                for (int j = 0; j < cols; j += 16)
                  __builtin_prefetch(C + (i1 + r) * ldc + j0 + j, 1, 3);
            }
            run_block(dd, first, k0, kb, pi, j0, cols, ibv, sbv);
          }
        }
      }
    }
  }  // pass
}

// Bytes of a packs a task may hold (Plan: the row and design split).
constexpr int64_t kPackBudget = int64_t{16} << 20;

// Columns of a streaming task's chunk: b decomposed for 8 k of them (64 KB)
// and a panel's outputs (16 KB) stay in cache.
constexpr int64_t kStreamCols = 1024;

// Whether the gather path streams LUT rows (Plan::stream): some design gathers
// (no closed form) from a LUT too big for L2 next to everything else, and the
// columns span several blocks, so that a (row, k) pair's LUT row serves more
// than one. (Measured in benchmarks/bench_cpu_gemm_kernel.md, round 12.)
// With four-row gathers (kIsaQuadGather, a 16-bit LUT copy) streaming pays
// from M = 8 (kQuadStreamMinBits), where the LUT is still within L2: the
// gathers, not the memory, were the cost there (random LUT, harness, Zen 5,
// 2 threads, ms: 1024^3 M = 8 271-322 -> 103-110, M = 9 275-306 -> 113-117;
// 8192x576x64 M = 8 67-68 -> 36).
bool StreamsLutRows(const GemmProblem& p, const KSplit& ks) {
  if (p.n <= kNB) return false;
  for (int64_t d = 0; d < ks.probs; ++d) {
    const int64_t design = (ks.prob_begin + d) / p.batch;
    const bool formula = ks.families != nullptr && ks.families[design] != kFamilyNone;
    const bool quads =
        kIsaQuadGather && ks.quad_gathers && ks.lut16 != nullptr && ks.lut16[design] != nullptr;
    const int min_bits = StreamMinBits(quads);
    const bool narrow = ks.eff_bits != nullptr && ks.eff_bits[design] < min_bits;
    if (p.mbits >= min_bits && !formula && !narrow) return true;
  }
  return false;
}

// ------------------------------------------------------------ few rows
// The direct kernel (PrefersDirect, cpu_gemm_simd.h): b's columns in the
// vector lanes, each product's bits computed lane by lane as ApproxMulBits
// computes them (integer operations on the operands' bits and one LUT entry
// per product) and added to its output's running sum, k ascending from +0.
// Nothing is prepared per element of b: the tile and gather paths decompose
// b and bound its exponents once per element for all the rows of a task,
// which with one or two rows costs more than the products themselves
// (1x1024x4096 mbm7: 22% of the time in BStats alone).

struct DirectPlan {
  const GemmProblem* p;
  const KSplit* ks;
  int64_t cols_per, ncc;  // column chunks
  int failed = 0;         // a task found no scratch (set atomically)
};

// The ISA file's DirectProduct(lanes, one, voff, row, mbits, &special):
// ApproxMulBits(a, b_l, lut, M) for the lanes b_l of `lanes`, from a's bits
// `one`, voff = a's exponent - 127 (-1024 for a zero or subnormal a: every
// product is then a signed zero) and the LUT row of a's mantissa index. Wrong
// in lanes where b is Inf or NaN (exponent 255), for which it sets *special
// (the caller's scalar path).

// a's voff (DirectProduct) from its exponent field (< 255).
inline int32_t DirectOffset(uint32_t e) { return e == 0 ? -1024 : static_cast<int32_t>(e) - 127; }

struct DirectTask {
  const float* a;
  const float* b;
  const uint32_t* lut;
  float* c;  // this k chunk's sums
  int64_t k0, k1;
};

DirectTask DirectTaskOf(const GemmProblem& p, const KSplit& ks, int64_t unit, int64_t chunk) {
  const int64_t prob = ks.prob_begin + unit;
  const int64_t d = prob / p.batch, bi = prob % p.batch;
  // Chunk `chunk` of k (the whole of k without split-K), summed from +0.
  float* c = ks.part == nullptr ? p.out + prob * p.m * p.n
                                : ks.part + (chunk * ks.probs + unit) * p.m * p.n;
  return {p.a + d * p.a_design_stride + bi * p.a_batch_stride,
          p.b + d * p.b_design_stride + bi * p.b_batch_stride,
          p.lut + d * p.lut_design_stride,
          c,
          chunk * ks.chunk,
          MinI(p.k, chunk * ks.chunk + ks.chunk)};
}

// Every row of the problem, columns [c0, c1) (b's columns in the lanes), the
// sums in memory (the block stays in L1: RunDirect). False when b is stored
// transposed and there was no scratch for its buffer.
bool RunDirectBlock(const GemmProblem& p, const DirectTask& t, int64_t c0, int64_t c1) {
  const int mbits = p.mbits;
  const int64_t vec_end = c0 + (c1 - c0) / kVL * kVL;
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t j = c0; j < c1; ++j) t.c[r * p.n + j] = 0.0f;
  // b stored transposed (GemmProblem::b_plain_ld): each block of kPlainKb k
  // is first copied into rows of a per-thread buffer (c1 - c0 floats per k),
  // row k's column j at j - c0; else b's row k, column j at j.
  constexpr int64_t kPlainKb = 64;
  const int64_t ldt = p.b_plain_ld;
  const int64_t pitch = RoundUp(c1 - c0, 16) + 16;
  float* const plain_buf =
      ldt > 0 ? static_cast<float*>(ThreadScratch(kSlotB, kPlainKb * pitch * 4)) : nullptr;
  if (ldt > 0 && plain_buf == nullptr) return false;
  const int64_t boff = ldt > 0 ? c0 : 0;
  for (int64_t k = t.k0; k < t.k1; ++k) {
    if (ldt > 0 && (k - t.k0) % kPlainKb == 0) {
      // Column by column (a contiguous run of the matrix's row), into buffer
      // rows padded off multiples of 4 KB: unpadded, 1024 columns put a
      // column's 64 writes in one L1 set (4096x1024x1 took 10.5 ms, 4.0 ms
      // before this path).
      const int64_t kb = MinI(kPlainKb, t.k1 - k);
      for (int64_t j = c0; j < c1; ++j) {
        const float* src = t.b + j * ldt + k;
        for (int64_t kk = 0; kk < kb; ++kk) plain_buf[kk * pitch + (j - c0)] = src[kk];
      }
    }
    // b's row k; its column j at brow[j - boff].
    const float* brow = ldt > 0 ? plain_buf + ((k - t.k0) % kPlainKb) * pitch : t.b + k * p.n;
    for (int64_t r = 0; r < p.m; ++r) {
      const uint32_t ab = FloatBits(t.a[r * p.k + k]);
      const uint32_t ea = (ab >> 23) & 0xffu;
      float* crow = t.c + r * p.n;
      int64_t j = c0;
      if (ea != 0xffu) {  // (an Inf or NaN a: every product on the scalar path)
        const VI one = Set1I(static_cast<int32_t>(ab));
        const VI voff = Set1I(DirectOffset(ea));
        const uint32_t* row = t.lut + (int64_t{(ab & 0x7fffffu) >> (23 - mbits)} << mbits);
        // The products of a with b's columns j0 .. j0 + cols - 1 (cols <= kVL;
        // the lanes past cols are not products); lanes holding an Inf or NaN
        // b send the vector to the scalar path.
        auto products = [&](int64_t j0, int cols) {
          const float* bj = brow + (j0 - boff);
          bool special;
          const VI prod =
              DirectProduct(cols == kVL ? LoadI(reinterpret_cast<const int32_t*>(bj))
                                        : LoadPartialI(reinterpret_cast<const uint32_t*>(bj), cols),
                            one, voff, row, mbits, &special);
          if (!special) return prod;
          alignas(64) int32_t bits[kVL] = {};
          for (int l = 0; l < cols; ++l)
            bits[l] = static_cast<int32_t>(ApproxMulBits(ab, FloatBits(bj[l]), t.lut, mbits));
          return LoadI(bits);
        };
        for (; j < vec_end; j += kVL)
          StoreF(crow + j, AddF(LoadF(crow + j), CastF(products(j, kVL))));
        if (j < c1) {  // the last columns (fewer than kVL): one vector of products too
          const int rest = static_cast<int>(c1 - j);
          alignas(64) float last[kVL];
          StoreF(last, CastF(products(j, rest)));
          for (int l = 0; l < rest; ++l) crow[j + l] += last[l];
          j = c1;
        }
      }
      for (; j < c1; ++j)
        crow[j] += BitsFloat(ApproxMulBits(ab, FloatBits(brow[j - boff]), t.lut, mbits));
    }
  }
  return true;
}

void RunDirectTask(void* arg, int64_t task) {
  DirectPlan& dp = *static_cast<DirectPlan*>(arg);
  const GemmProblem& p = *dp.p;
  const int64_t cc = task % dp.ncc;
  const DirectTask t =
      DirectTaskOf(p, *dp.ks, (task / dp.ncc) % dp.ks->probs, task / dp.ncc / dp.ks->probs);
  const int64_t c0 = cc * dp.cols_per, c1 = MinI(p.n, c0 + dp.cols_per);
  if (c0 < c1 && !RunDirectBlock(p, t, c0, c1)) __atomic_store_n(&dp.failed, 1, __ATOMIC_RELAXED);
}

// Tasks: (k chunk, problem, column chunk), every row in each.
int RunDirect(const GemmProblem& p, const KSplit& ks, const Runner& runner) {
  DirectPlan dp{&p, &ks, 0, 0};
  const int64_t units = ks.chunks * ks.probs;
  const int64_t target = MaxI(2, 2 * HardwareThreads());
  // The task's output block (rows x columns) stays in L1 across k.
  const int64_t max_cols = MaxI(kVL, kDirectBlockFloats / MaxI(1, p.m) / kVL * kVL);
  const int64_t want = RoundUp(CeilDiv(p.n, MaxI(1, CeilDiv(target, units))), kVL);
  dp.cols_per = MinI(max_cols, MaxI(MinI(p.n, kDirectMinCols), want));
  dp.ncc = CeilDiv(p.n, dp.cols_per);
  runner.run(runner.ctx, units * dp.ncc, &RunDirectTask, &dp);
  return __atomic_load_n(&dp.failed, __ATOMIC_RELAXED) ? kSimdNoMemory : kSimdOk;
}

int RunGemm(const GemmProblem& p, const KSplit& ks, const Runner& runner) {
  if (p.mbits < kMinMantissaBits || p.mbits > kMaxMantissaBits) return kSimdDeclined;
  const int64_t problems = ks.probs;
  if (problems == 0 || p.m == 0 || p.n == 0) return kSimdOk;
  if (p.k == 0) {
    if (ks.part == nullptr)
      for (int64_t i = 0; i < problems * p.m * p.n; ++i)
        p.out[ks.prob_begin * p.m * p.n + i] = 0.0f;
    else
      for (int64_t i = 0; i < ks.chunks * problems * p.m * p.n; ++i) ks.part[i] = 0.0f;
    return kSimdOk;
  }
  if (PrefersDirect(p)) return RunDirect(p, ks, runner);
  // The fast paths assume kernel-format LUT entries (c <= 1): decline otherwise.
  // bfloat16 tiles also need every entry's bits below the M mantissa bits to
  // be zero (true of kernel-format LUTs, checked rather than assumed).
  bool lut_low_bits_clear = true;
  {
    const int64_t entries = int64_t{1} << (2 * p.mbits);
    const int64_t luts = p.lut_design_stride == 0 ? 1 : p.designs;
    for (int64_t d = 0; d < luts; ++d) {
      // Known for the whole step (GemmProblem::lut_facts).
      const int32_t facts = LutFactsAt(p, d);
      if (facts != kLutFactsUnknown) {
        if ((facts & kLutFactsKernelFormat) == 0) return kSimdDeclined;
        if ((facts & kLutFactsLowBitsClear) == 0) lut_low_bits_clear = false;
        continue;
      }
      // Already read entry by entry (both imply kernel format with clear low
      // bits): a closed-form family's LUT, a 16-bit copy's source. (Half a
      // millisecond per call at M = 11.)
      if ((ks.families != nullptr && ks.families[d] != kFamilyNone) ||
          (ks.lut16 != nullptr && ks.lut16[d] != nullptr))
        continue;
      const uint32_t* l = p.lut + d * p.lut_design_stride;
      uint32_t acc = 0;
      for (int64_t e = 0; e < entries; ++e) acc |= l[e];
      if (acc >> 24) return kSimdDeclined;
      if (acc & ((1u << (23 - p.mbits)) - 1u)) lut_low_bits_clear = false;
    }
  }
  Plan pl{};
  pl.p = &p;
  pl.ks = &ks;
  const int64_t usize = int64_t{1} << p.mbits;
  const size_t l2 = L2CacheBytes();
  // (The wide tile builder for M >= 8 is kept for forced testing.)
  int strategy = PrefersGathers(p.m, p.mbits) ? kGather : kTiles;
  // Every design a cheap closed-form family and few rows: the closed form
  // (on the gather path) beats the tiles.
  if (strategy == kTiles && CheapClosedFormWins(p, ks.families)) strategy = kGather;
  if (strategy == kTiles && kVL == 8 && Avx2ClosedFormsWin(p, ks.families)) strategy = kGather;
  if (g_force_strategy == 1 || g_force_strategy == 2) strategy = g_force_strategy;
  pl.strategy = strategy;
  // The widest width any design's tiles are built at (KSplit::eff_bits).
  int widest_tiles = p.mbits;
  if (ks.eff_bits != nullptr) {
    widest_tiles = 0;
    for (int64_t d = 0; d < p.designs; ++d)
      widest_tiles = widest_tiles > ks.eff_bits[d] ? widest_tiles : ks.eff_bits[d];
  }
  if (strategy == kTiles) {
    pl.mr = kTilePanelRows;
    pl.bf16 = kBf16Tiles && p.mbits <= 7 && lut_low_bits_clear && ks.bf16_tiles;
    const int64_t entry_bytes = pl.bf16 ? 2 : 4;
    // The longest power-of-two k block whose tiles fit the cap below.
    int64_t kb = 2;
    // Measured with the FMA kernel (2 MB L2): M = 7 best at L2/2 (longer k
    // blocks: fewer C reloads, longer a strips), M = 3 at L2/8..L2/4.
    const int64_t auto_budget =
        static_cast<int64_t>(p.mbits >= 6 ? l2 / 2 : (p.mbits == 5 ? l2 / 4 : l2 / 8));
    const int64_t budget = g_tile_budget > 0 ? g_tile_budget : auto_budget;
    const int64_t klen = MinI(p.k, ks.chunk);
    // AVX-512, M >= 6: the tiles actually built (2^widest_tiles per k) up to
    // 0.4 of L2: 512 KB on a 2 MB L2 (mbm7: 64 tiles, kb 64; random7: 128
    // tiles, kb 32), the best measured there (harness, random M = 7, ms,
    // 512 vs 1024 KB of tiles, two runs: 1024^3 29.5, 31.0 vs 31.9, 32.2;
    // 8192x576x64 6.9, 6.8 vs 7.2, 7.2; random M = 6 flat from L2/8 to L2/2).
    // Counting 2^M tiles against L2/2 (as AVX2 still does, and against
    // GEMM_TILE_BYTES when the harness sets it), with L2/4 for a design at
    // the full M = 7, gave the same on a 2 MB L2 but half of it on Ice
    // Lake's 1.25 MB L2. There, one thread, one process, alternated,
    // minimum of 6-8, ms, that count vs this one: mbm7 1024^3 47.3-47.8 vs
    // 44.7-45.9, 8192x576x64 14.5-14.9 vs 12.4-12.6; random7 1024^3 68.3 vs
    // 58.6, 8192x576x64 23.0 vs 15.3 (twice these tiles: slower again).
    const bool wide_avx512 = kVL == 16 && p.mbits >= 6 && g_tile_budget <= 0;
    const int64_t tile_bytes_per_k =
        (wide_avx512 ? int64_t{1} << widest_tiles : usize) * kNB * entry_bytes;
    const int64_t tile_cap = wide_avx512 ? static_cast<int64_t>(l2) * 2 / 5 : budget;
    while (kb < 256 && kb < RoundUp(klen, 16) && tile_bytes_per_k * kb * 2 <= tile_cap) kb *= 2;
    pl.kb_max = static_cast<int>(kb);
    // Unpadded stride (padding by a cache line measured 10-15% slower).
    pl.ustride = static_cast<int>(pl.bf16 ? kb * kNB / 2 : kb * kNB);
    // M <= 3: permute tiles (8 floats per b element, panels of 8 rows).
    if (kIsaPermTiles && p.mbits <= 3 && ks.perm_tiles) {
      pl.perm = true;
      pl.bf16 = false;
      pl.mr = kPermRows;
      const int64_t perm_budget = g_tile_budget > 0 ? g_tile_budget : kPermTileBytes;
      int64_t pkb = 8;
      while (pkb < 256 && pkb * 2 * kNB * 32 <= perm_budget && pkb < RoundUp(klen, 16)) pkb *= 2;
      pl.kb_max = static_cast<int>(pkb);
      pl.ustride = static_cast<int>(pkb * kNB);
    }
  } else {
    pl.mr = kMRG;
    pl.stream = ks.stream_mode == 2 || (ks.stream_mode == 1 && StreamsLutRows(p, ks));
    if (pl.stream) __atomic_fetch_add(&g_stream_plans, 1, __ATOMIC_RELAXED);
    // Streaming: a row's LUT rows for 8 k stay in L1 (32 KB at M = 11;
    // 4 to 16 k measured within noise of each other).
    // (No longer than k: the pack and b's decomposition are sized by it.)
    pl.kb_max = pl.stream ? 8 : static_cast<int>(MinI(256, RoundUp(MinI(p.k, ks.chunk), kVL)));
    pl.ustride = 1 << p.mbits;
  }
  // Task split: the summation order never depends on it (each output element
  // is always summed sequentially over k), only the speed does.
  // Designs that share a or b are grouped into one task (the shared work is
  // done once per task); the (row, column) split is then chosen as for one
  // design, and the designs are split into groups only when that leaves too
  // few tasks for the threads.
  const int64_t threads = HardwareThreads();
  pl.share_a = p.a_design_stride == 0;
  pl.share_b = p.b_design_stride == 0;
  pl.share_tiles = pl.share_b && p.lut_design_stride == 0;
  const bool group = g_no_design_sharing == 0 && p.designs > 1 && (pl.share_a || pl.share_b) &&
                     ks.prob_begin == 0 && ks.probs == p.designs * p.batch;
  const int64_t units0 = group ? p.batch : problems;
  const int64_t nbk = CeilDiv(p.n, kNB);
  const int64_t min_rows = strategy == kTiles ? MaxI(pl.mr, usize * g_min_rows_mul) : pl.mr * 4;
  int64_t ncc = 0, nrc = 0;
  // At most 64 tiles (width <= 6): rows first. Each row chunk builds its own
  // tiles, cheap at these widths, and a is packed once per column chunk, so
  // fewer column chunks pack it fewer times. Harness, 2 threads, ms, columns
  // vs rows first (three / two runs): random M = 3 1024^3 17.6-18.1 vs
  // 16.7-16.8, 512^3 2.53-2.65 vs 2.20; mbm-like M = 3 1024^3 17.1-17.6 vs
  // 15.9-16.4; random M = 5 1024^3 20.8-21.0 vs 19.1-19.4; random M = 6
  // 512^3 3.66-3.81 vs 3.32-3.58; AVX2 unit M = 3 512^3 4.0-4.2 vs 3.2-3.5.
  // At width 7 (128 tiles) rows first was slower: 1024^3 27.3-27.9 vs 28.6-28.9.
  // The AVX2 unit's tiles of width >= 4 (built from pair-table rows, at the
  // time of this measurement with gathers, slow on Zen 3) cost more: rows
  // first (every row chunk building the tiles of all its columns) only up to
  // width 3 (permute builds) there. Zen 3, 2 threads, 8-row panels, one
  // process, alternated, minimum of 6, ms, rows vs columns first: 1024^3
  // random M = 6 98.2 vs 76.4, mbm7 61.5 vs 42.6, random M = 5 74.2 vs
  // 59.2, mbm6 53.9 vs 48.1, random M = 4 64.0 vs 55.2, mbm5 48.0 vs 44.6;
  // 512^3 random M = 6 14.3 vs 11.5, mbm7 9.5 vs 8.2; at width <= 3 rows
  // first stays ahead below 1024^3 (512^3 mbm3 4.8 vs 5.4, 256^3 1.07 vs
  // 1.32) and even there (mbm3 1024^3 41.0 vs 41.9).
  const int rows_first_max_width = kVL == 8 ? 3 : 6;
  const bool rows_first =
      strategy == kTiles && widest_tiles <= rows_first_max_width && ks.rows_first;
  auto split_for = [&](int64_t target) {
    const int64_t split = CeilDiv(target, units0 * ks.chunks);
    // (Not where the columns alone give every task one column block and
    // rows first would give tasks a pack of a beyond L2/4: a one-block
    // task packs each panel just before its kernel and reads it back from
    // L1. AVX2, 32-column blocks, in one process, ms, columns vs rows first
    // for all: 8192x576x64 mbm3 9.0 vs 10.8, 6400x150x64 mbm5 2.0 vs 3.3,
    // tasks of 2048 and 1600 rows, 5.5 KB of pack per row.)
    const int64_t rows_nrc = MinI(split, MaxI(1, p.m / min_rows));
    const int64_t rows_pack = CeilDiv(p.m, rows_nrc) * (PanelPackWords(pl.kb_max) * 4 / pl.mr);
    // (Or where a task's few column blocks run per packed panel: RunTask
    // fuse_blocks, the AVX2 unit.)
    if (rows_first && (nbk > split || rows_pack <= static_cast<int64_t>(l2 / 4) ||
                       FusesBlocks(pl, p.mbits, p.designs, nbk))) {
      nrc = rows_nrc;
      ncc = MinI(CeilDiv(split, nrc), nbk);
      pl.cols_per = CeilDiv(nbk, ncc) * kNB;
      ncc = CeilDiv(p.n, pl.cols_per);
      return;
    }
    ncc = MinI(split, nbk);
    pl.cols_per = CeilDiv(nbk, ncc) * kNB;
    ncc = CeilDiv(p.n, pl.cols_per);
    nrc = MinI(CeilDiv(split, ncc), MaxI(1, p.m / min_rows));
  };
  // About two tasks per thread (slack for a busy machine), unless that cuts
  // the rows into chunks so short that the tiles every row chunk builds for
  // itself (2^M per k block and column block) are a sizeable part of its
  // work (fewer than 64 * 2^M rows): one task per thread then. 2 threads,
  // M = 7: 8192x576x64 6.5 -> 5.9 ms, 12544x800x64 (LeNet-5 conv 2) 13.2 -> 12.0 ms.
  const int64_t target = MaxI(2, 2 * threads);
  split_for(target);
  if (pl.stream) {
    // As few column chunks as fit kStreamCols (each row's LUT rows are
    // fetched once per column chunk); the threads split the rows.
    ncc = CeilDiv(nbk * kNB, kStreamCols);
    pl.cols_per = CeilDiv(nbk, ncc) * kNB;
    ncc = CeilDiv(p.n, pl.cols_per);
    nrc = MinI(MaxI(1, CeilDiv(target, units0 * ks.chunks * ncc)), MaxI(1, p.m / pl.mr));
  }
  if (strategy == kTiles && nrc > 1 && CeilDiv(p.m, nrc) < 64 * usize) split_for(threads);
  // Fewer tasks than threads: shorter row chunks (each rebuilding its tiles)
  // beat idle threads. 800x2548x32 M=7 (a conv weight gradient) ran as one
  // task: 4.6 ms on 2 threads, 2.6 ms as two.
  if (units0 * ks.chunks * ncc * nrc < threads) {
    const int64_t floor_rows = strategy == kTiles ? MaxI(pl.mr, usize / 2) : pl.mr;
    nrc = MaxI(nrc, MinI(CeilDiv(threads, units0 * ks.chunks * ncc), p.m / floor_rows));
  }
  // A task whose columns span several blocks (or that streams) packs a for
  // all its rows per k block (RunTask), once per design unless a is shared:
  // bound that pack (kPackBudget per thread) by cutting the rows, down to the
  // tile path's amortisation floor, then the designs per task. Unbounded, a
  // 200000x64x640 product held an 800 MB pack per thread, and scratch is kept
  // per thread between calls. (Same sums: only the task split changes.)
  const bool packs_all_rows = pl.stream || pl.cols_per > kNB;
  const int64_t pack_budget = g_pack_budget > 0 ? g_pack_budget : kPackBudget;
  const int64_t row_pack_bytes = PanelPackWords(pl.kb_max) * 4 / pl.mr;
  const int64_t packs_per_task = pl.share_a || !group ? 1 : p.designs;
  if (packs_all_rows) {
    const int64_t floor_rows = strategy == kTiles ? MaxI(pl.mr, 64 * usize) : 64 * pl.mr;
    const int64_t cap =
        RoundUp(MaxI(floor_rows, pack_budget / (row_pack_bytes * packs_per_task)), pl.mr);
    if (CeilDiv(p.m, nrc) > cap) nrc = CeilDiv(p.m, cap);
  }
  pl.rows_per = RoundUp(CeilDiv(p.m, nrc), pl.mr);
  nrc = CeilDiv(p.m, pl.rows_per);
  pl.nrc = nrc;
  pl.ncc = ncc;
  pl.dg = 1;
  pl.ngroups = 1;
  int64_t units = problems;
  if (group) {
    const int64_t tasks1 = ks.chunks * p.batch * nrc * ncc;
    int64_t ng = MinI(p.designs, MaxI(1, CeilDiv(target, tasks1)));
    pl.dg = CeilDiv(p.designs, ng);
    if (packs_all_rows && !pl.share_a)
      pl.dg = MinI(pl.dg, MaxI(1, pack_budget / (row_pack_bytes * pl.rows_per)));
    pl.ngroups = CeilDiv(p.designs, pl.dg);
    units = p.batch * pl.ngroups;
  }
  pl.failed = 0;
  runner.run(runner.ctx, ks.chunks * units * nrc * ncc, &RunTask, &pl);
  return __atomic_load_n(&pl.failed, __ATOMIC_RELAXED) ? kSimdNoMemory : kSimdOk;
}

}  // namespace
