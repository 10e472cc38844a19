// qwen3lab fast CPU kernels, one source for every CPU: built at first use by qwen3lab/fast/build.py through
// torch.utils.cpp_extension, once per path (avx512, avx2, portable; simd.h says what differs), the best path
// the CPU has chosen at run time. A pure-PyTorch fallback runs when none can be built.
//
// y[m, n] = sum_k x[m, k] * W[n, k] (* scale[n] for int8, per group for int4), W row-major [N, K] as checkpoints
// store it.
// - Small M (decode, a few sequences): each thread streams a contiguous band of W rows, a block of rows at a
//   time, against a block of input rows held in fp32; bf16 weights are widened to fp32 by integer shifts
//   (exact) and multiplied with FMA, fp32 accumulation throughout, one rounding to the output dtype at the end.
//   Where the CPU has AVX512-BF16 (the avx512 build gets -mavx512bf16 then), bf16 x bf16 pairs go through
//   vdpbf16ps instead (Bf16Dot): the same exact products and float32 sums, half the instructions; a batch of
//   16 rows ran 1.5x faster on Zen 4, one row the same (it is memory-bound).
// - int8 weights: each input row is quantised to int16 (x = x16 * sx, sx = max|x| / 32767: a relative error
//   <= 1.5e-5 of the row's largest element, far below int8's own ~4e-3) and int8 weights, sign-extended to
//   int16, are multiplied in pairs into exact int32 sums (vpdpwssd with AVX512-VNNI, vpmaddwd on AVX2 and
//   AVX-512, shifts and multiplies elsewhere): a third of the instructions of widening to float32 + FMA.
// - int4 weights (packed two a byte, a float32 scale per group of 32 or 128 along K, llama.cpp Q4_0's nibble
//   order): the nibbles are unpacked in registers and multiplied with the same int16 inputs into exact int32
//   sums per group, each scaled into float32 accumulators (linear_q4; see "int4 weights" below).
// - Large M (prefill): W is widened to fp32 a band of rows at a time (cache-resident) and handed to sgemm
//   (int4: dequantised to q * scale, linear_q4_large).
// - Leaf ops of the model: RMSNorm, RoPE, SiLU(gate) * up, single-query attention that writes the new
//   key/value into each sequence's cache and attends over it (attend_decode: a contiguous cache per sequence;
//   attend_paged_decode: a paged pool read through block tables, online softmax). Each rounds to the model
//   dtype exactly where the eager PyTorch ops do (bf16 after the norm, after the weight, after each RoPE
//   product), so the fast path tracks the eager one to float32 summation order (~1e-6 relative) and to bf16
//   rounding order in bfloat16.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

using namespace simd;

namespace {

// Software prefetch in each weight row: T0 a few lines ahead, and T1 (into L2) the same offset of the next
// block's rows. The FMA work between loads otherwise limits the misses in flight: streaming bf16 weights on
// 2 cores went from ~21 GB/s (none) and ~26.7 (T0 only) to ~29.5 GB/s, the speed of a plain sum (measured on
// an AVX-512 Xeon).
#ifndef QWEN3LAB_PF
#define QWEN3LAB_PF 512
#endif
constexpr int PF_BYTES = QWEN3LAB_PF;

#ifndef QWEN3LAB_PF_NEXT
#define QWEN3LAB_PF_NEXT 1
#endif

template <int NR>
inline void prefetch_rows(const void* base, int64_t row_bytes) {
  for (int r = 0; r < NR; ++r) {
    if (PF_BYTES > 0) __builtin_prefetch((const char*)base + r * row_bytes + PF_BYTES, 0, 3);
    if (QWEN3LAB_PF_NEXT) __builtin_prefetch((const char*)base + (r + QWEN3LAB_PF_NEXT * NR) * row_bytes, 0, 2);
  }
}

// ---- per-dtype inner loops: acc[r][m] += W[r, chunk] . x[m, chunk] -------------------------------------
// x rows are fp32, zero-padded to a multiple of the chunk. bf16 x rows are "split": each 2W-wide chunk holds
// the W even elements then the W odd ones, matching how 2W bf16 weights read as W uint32 widen in place.
// Each weight type gives its chunk width CH, and one `step` over a chunk; TAIL (the last, partial chunk of
// n < CH columns) loads only n weights, the full chunks whole vectors.
struct Bf16W {
  using WT = uint16_t;
  static constexpr int CH = 2 * W;
  static constexpr int XC = 1;  // columns a float of the x rows holds (a slice at column k0 starts at x + k0 / XC)
  template <int NR, int NM, bool TAIL>
  static inline void step(const uint16_t* Wp, int64_t K, int64_t k, int64_t n, const float* x, int64_t ldx,
                          vf (&acc)[NR][NM]) {
    vf we[NR], wo[NR];
    for (int r = 0; r < NR; ++r) {
      const vu w = TAIL ? load_n<vu>(Wp + r * K + k, n) : load<vu>(Wp + r * K + k);
      we[r] = (vf)(w << 16);
      wo[r] = (vf)(w & 0xffff0000u);
    }
    for (int m = 0; m < NM; ++m) {
      const vf xe = load<vf>(x + m * ldx + k), xo = load<vf>(x + m * ldx + k + W);
      for (int r = 0; r < NR; ++r) acc[r][m] = fmadd(wo[r], xo, fmadd(we[r], xe, acc[r][m]));
    }
  }
};

#if defined(__AVX512BF16__)
// bf16 weights x bf16 inputs on CPUs with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids): vdpbf16ps takes 32
// bf16 weights and 32 bf16 inputs a step and adds each pair's two products into a float32 lane. A product of two
// bf16 is exact in float32, so every add is one rounding, as with the widening path's FMAs (only the order of
// the pair's two adds differs). x rows are the input's own bf16 values, natural order, read as float-sized
// pairs (prep_x_bf16); one instruction replaces the widening path's shift, mask and two FMAs per input row.
struct Bf16Dot {
  using WT = uint16_t;
  static constexpr int CH = 2 * W;
  static constexpr int XC = 2;  // x rows are the input's bf16 pairs
  template <int NR, int NM, bool TAIL>
  static inline void step(const uint16_t* Wp, int64_t K, int64_t k, int64_t n, const float* x, int64_t ldx,
                          vf (&acc)[NR][NM]) {
    __m512bh w[NR];
    for (int r = 0; r < NR; ++r)
      w[r] = (__m512bh)(TAIL ? load_n<vu>(Wp + r * K + k, n) : load<vu>(Wp + r * K + k));
    for (int m = 0; m < NM; ++m) {
      const __m512bh xv = (__m512bh)load<vu>(x + m * ldx + k / 2);
      for (int r = 0; r < NR; ++r) acc[r][m] = (vf)_mm512_dpbf16_ps((__m512)acc[r][m], w[r], xv);
    }
  }
};
#endif

// float32 and int8 weights (the latter only for inputs int16 cannot carry: inf / NaN): W per chunk, widened
// to float32, one FMA per input row.
template <class T>
inline vf widen_w(const T* p, bool tail, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    return tail ? load_n<vf>(p, n) : load<vf>(p);
  } else {
    typedef int8_t vb __attribute__((vector_size(W)));
    return __builtin_convertvector(tail ? load_n<vb>(p, n) : load<vb>(p), vf);
  }
}

template <class T>
struct WideW {
  using WT = T;
  static constexpr int CH = W;
  static constexpr int XC = 1;
  template <int NR, int NM, bool TAIL>
  static inline void step(const T* Wp, int64_t K, int64_t k, int64_t n, const float* x, int64_t ldx,
                          vf (&acc)[NR][NM]) {
    vf w[NR];
    for (int r = 0; r < NR; ++r) w[r] = widen_w(Wp + r * K + k, TAIL, n);
    for (int m = 0; m < NM; ++m) {
      const vf xv = load<vf>(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[r][m] = fmadd(w[r], xv, acc[r][m]);
    }
  }
};

// One weight row against one input row (a one-sequence decode step, bound by memory): each thread reads its band
// of rows front to back as one sequential stream, which the hardware prefetcher follows by itself on AMD Zen 4;
// Intel Xeons and Zen 3 need a software prefetch ahead as well (stream_pf, chosen per CPU at load: runspec.py's
// stream_prefetch has the figures); U1 chunks a step go to U1 independent accumulators, so the adds' latency does not cap the
// streaming speed. Qwen3-0.6B's 113 weights on Zen 4, 2 threads, 8-row blocks (the batched path's, 8 streams a
// thread) -> one row, U1 = 4: bf16 52.7 -> 65.6 GB/s (avx512), 49.5 -> 59.9 (avx2), 40.5 -> 44.9 (portable);
// float32 57.6 -> 73.6; int8 48.1 -> 58.0 (avx512). U1 = 2 was as fast on avx512, slower on avx2 and portable.
constexpr int U1 = 4;  // stream_rows spells its four accumulators out: keep the two in step
// Bytes ahead the one-row streams prefetch (0: none), set_stream_prefetch: one distance for weights narrower than
// float32 (bf16, int8: more instructions a byte, so fewer lines in flight from the out-of-order window alone)
// and one for float32 weights; on Zen 3 the first gains from 1 KiB ahead and the second loses (runspec.py).
int64_t stream_pf = 0, stream_pf_f32 = 0;

// The lines of [p, p + n) + the distance for weights of type T, into L1 (nothing when it is 0).
template <class T>
inline void stream_prefetch(const T* p, int64_t n) {
  const int64_t d = sizeof(T) >= 4 ? stream_pf_f32 : stream_pf;
  if (d <= 0) return;
  for (int64_t b = 0; b < n; b += 64) __builtin_prefetch((const char*)p + d + b, 0, 3);
}

// The loop all weight types share: full chunks (a prefetch at each new cache line), then the tail.
// Columns [0, n) of rows of stride K (n < K: one slice of them, Wp and x pointing at its start, x at column k0 / XC
// of its rows; batches only).
template <class Kern, int NR, int NM>
inline void stream_rows(const typename Kern::WT* Wp, int64_t K, int64_t n, const float* x, int64_t ldx,
                        vf (&acc)[NR][NM]) {
  constexpr int64_t per_line = 64 / sizeof(typename Kern::WT);
  int64_t k = 0;
  if constexpr (NR == 1 && NM == 1) {
    // four accumulators as four arrays, not one array of four: GCC 12 kept `vf part[U1][1][1]` on the stack (a
    // store a step) and loaded each bf16 weight vector twice; as four it holds them in registers (1.02-1.03x
    // the bf16 / fp32 decode stream on Zen 3 in benchmarks/ab_kernels.py, bit-identical sums)
    static_assert(U1 == 4, "stream_rows runs four accumulators");
    vf p0[1][1] = {}, p1[1][1] = {}, p2[1][1] = {}, p3[1][1] = {};
    for (; k + U1 * Kern::CH <= n; k += U1 * Kern::CH) {
      stream_prefetch(Wp + k, U1 * Kern::CH * (int64_t)sizeof(typename Kern::WT));
      Kern::template step<1, 1, false>(Wp, K, k, 0, x, ldx, p0);
      Kern::template step<1, 1, false>(Wp, K, k + Kern::CH, 0, x, ldx, p1);
      Kern::template step<1, 1, false>(Wp, K, k + 2 * Kern::CH, 0, x, ldx, p2);
      Kern::template step<1, 1, false>(Wp, K, k + 3 * Kern::CH, 0, x, ldx, p3);
    }
    acc[0][0] += p0[0][0];
    acc[0][0] += p1[0][0];
    acc[0][0] += p2[0][0];
    acc[0][0] += p3[0][0];
    for (; k + Kern::CH <= n; k += Kern::CH) Kern::template step<1, 1, false>(Wp, K, k, 0, x, ldx, acc);
    if (k < n) Kern::template step<1, 1, true>(Wp, K, k, n - k, x, ldx, acc);
    return;
  }
  for (; k + Kern::CH <= n; k += Kern::CH) {
    if (k % per_line == 0) prefetch_rows<NR>(Wp + k, K * sizeof(typename Kern::WT));
    Kern::template step<NR, NM, false>(Wp, K, k, 0, x, ldx, acc);
  }
  if (k < n) Kern::template step<NR, NM, true>(Wp, K, k, n - k, x, ldx, acc);
}

template <class OT>
inline void put(OT* y, float v) {
  if constexpr (std::is_same<OT, float>::value) *y = v;
  else *y = f32_to_bf16(v);
}

// Where a block's columns are taken in slices: [k0, k0 + kn) this time, the vector sums carried from one slice to
// the next in `part` (NR * NM vectors; nullptr: all K columns at once).
struct Slice {
  int64_t k0, kn;  // kn < 0: to the end
  vf* part;
};

// One block of NR weight rows x NM input rows: sums (times scale) written to y (fp32 or bf16, row stride N) after
// the last slice. The sums per lane run over k in order whatever the slices, so slicing never changes a result.
template <class Kern, int NR, int NM, class OT>
inline void run_block(const typename Kern::WT* Wp, int64_t K, const float* x, int64_t ldx, const float* scale,
                      OT* y, int64_t N, const Slice& sl = {0, -1, nullptr}) {
  const int64_t kn = sl.kn < 0 ? K - sl.k0 : sl.kn;
  vf acc[NR][NM];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < NM; ++m) acc[r][m] = sl.k0 == 0 ? vf{} : sl.part[r * NM + m];
  stream_rows<Kern, NR, NM>(Wp + sl.k0, K, kn, x + sl.k0 / Kern::XC, ldx, acc);
  if (sl.k0 + kn < K) {
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < NM; ++m) sl.part[r * NM + m] = acc[r][m];
    return;
  }
  for (int m = 0; m < NM; ++m) {
    float s[NR];
    if constexpr (NR % 4 == 0) {
      for (int r = 0; r < NR; r += 4) hsum4(acc[r][m], acc[r + 1][m], acc[r + 2][m], acc[r + 3][m], s + r);
    } else {
      for (int r = 0; r < NR; ++r) s[r] = hsum(acc[r][m]);
    }
    for (int r = 0; r < NR; ++r) put(y + m * N + r, scale ? s[r] * scale[r] : s[r]);
  }
}

// Input rows [m, m + nm) (nm <= NM) against NR weight rows.
template <class Kern, int NR, int NM, class OT>
inline void rows_some_m(const typename Kern::WT* Wp, int64_t K, const float* x, int64_t ldx, int64_t m, int64_t nm,
                        const float* scale, OT* y, int64_t N, const Slice& sl = {0, -1, nullptr}) {
  x += m * ldx;
  y += m * N;
  if (nm == NM) run_block<Kern, NR, NM>(Wp, K, x, ldx, scale, y, N, sl);
  if constexpr (NM > 1) {
    if (nm == 1) run_block<Kern, NR, 1>(Wp, K, x, ldx, scale, y, N, sl);
  }
  if constexpr (NM > 2) {
    if (nm == 2) run_block<Kern, NR, 2>(Wp, K, x, ldx, scale, y, N, sl);
  }
  if constexpr (NM > 3) {
    if (nm == 3) run_block<Kern, NR, 3>(Wp, K, x, ldx, scale, y, N, sl);
  }
}

// All M input rows against NR weight rows, NM input rows at a time (fewer for the last ones).
template <class Kern, int NR, int NM, class OT>
inline void rows_all_m(const typename Kern::WT* Wp, int64_t K, const float* x, int64_t ldx, int64_t M,
                       const float* scale, OT* y, int64_t N) {
  for (int64_t m = 0; m < M; m += NM)
    rows_some_m<Kern, NR, NM>(Wp, K, x, ldx, m, std::min<int64_t>(NM, M - m), scale, y, N);
}

// Blocks [b, e) of NR weight rows against all M input rows. Weights narrower than the float32 inputs (bf16), more
// than NM input rows: a run of blocks (about 128 KiB of weights, which L2 keeps) meets each group of NM input rows
// in turn, so the group's rows stay in L1 across the run instead of all M rows passing through L1 for every block
// (8 rows of 1024 float32 fill L1 by themselves). Batch-8 decode of Qwen3-0.6B's bf16 weights on Zen 3, 2 threads:
// 1.06x in two runs of benchmarks/ab_kernels.py --rows 8 (~1.10x in cache, one thread). float32 weights lost
// (0.88-0.92x): a block's own rows (8 KiB) are what L1 then keeps between the groups, and the order keeps that.
template <class Kern, int NR, int NM, class OT>
inline void blocks_all_m(const typename Kern::WT* Wp, int64_t K, const float* x, int64_t ldx, int64_t M,
                         const float* scale, OT* y, int64_t N, int64_t b, int64_t e) {
  if (M <= NM || sizeof(typename Kern::WT) >= sizeof(float)) {
    for (int64_t i = b; i < e; ++i)
      rows_all_m<Kern, NR, NM>(Wp + i * NR * K, K, x, ldx, M, scale ? scale + i * NR : nullptr, y + i * NR, N);
    return;
  }
  const int64_t run = std::max<int64_t>(1, (128 << 10) / (NR * K * (int64_t)sizeof(typename Kern::WT)));
  // a group's rows over more columns than half of L1 holds (o_proj's 2048, down_proj's 3072): slices of them
  // (in cache, one thread, 8 rows x 1024 weight rows, bf16: 1.03x at K = 2048, 1.04x at 3072, bit-identical)
  const int64_t ks = std::max<int64_t>(Kern::CH, (16 << 10) / (NM * 4) / Kern::CH * Kern::CH);
  const int64_t nsl = (K + ks - 1) / ks, groups = (M + NM - 1) / NM;
  static thread_local std::vector<vf> parts;
  if (nsl > 1 && int64_t(parts.size()) < run * groups * NR * NM) parts.resize(run * groups * NR * NM);
  for (int64_t r0 = b; r0 < e; r0 += run)
    for (int64_t j = 0; j < nsl; ++j) {
      const Slice sl0 = {j * ks, std::min(ks, K - j * ks), nullptr};
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = r0; i < std::min(e, r0 + run); ++i) {
          Slice sl = sl0;
          if (nsl > 1) sl.part = parts.data() + ((i - r0) * groups + g) * NR * NM;
          rows_some_m<Kern, NR, NM>(Wp + i * NR * K, K, x, ldx, g * NM, std::min<int64_t>(NM, M - g * NM),
                                    scale ? scale + i * NR : nullptr, y + i * NR, N, sl);
        }
    }
}

// A zero-filled scratch buffer of n elements starting on a 64-byte boundary, in `v` (grown, never shrunk).
// Alignment matters: a vector load that straddles two cache lines costs two, and the linear kernels load an
// input vector per FMA group: the same loop ran ~100 vs ~148 GFLOP/s per core unaligned vs aligned (AVX-512).
template <class T>
T* aligned_zeros(std::vector<T>& v, int64_t n) {
  v.resize(n + 64 / sizeof(T));
  T* p = (T*)(((uintptr_t)v.data() + 63) & ~uintptr_t(63));
  std::fill(p, p + n, T(0));
  return p;
}

// x [M, K] -> fp32 rows of ldx floats (zero-padded) in a per-thread buffer reused across calls (no allocation
// per step); bf16 rows are split even/odd per 2W-chunk when `split`.
const float* prep_x(const at::Tensor& x, bool split, int64_t ldx) {
  static thread_local std::vector<float> buf;
  const int64_t M = x.size(0), K = x.size(1);
  float* o = aligned_zeros(buf, M * ldx);
  if (x.scalar_type() == at::kFloat) {
    const float* s = x.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) std::memcpy(o + m * ldx, s + m * K, K * 4);
    return o;
  }
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "qwen3lab fast linear: x must be float32 or bfloat16");
  // vectors, not an element loop (its index arithmetic cost ~12 us a call at 8 rows of 1024, ~1 % of a batch-8
  // decode step); the split order is what Bf16W does to its weights: 2W bf16 read as W uint32, the low halves
  // (even elements) shifted up, the high ones (odd) masked
  const uint16_t* s = (const uint16_t*)x.data_ptr();
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* sr = s + m * K;
    float* orow = o + m * ldx;
    int64_t k = 0;
    for (; k + 2 * W <= K; k += 2 * W) {
      const vu u = load<vu>(sr + k);
      if (split) {
        store(orow + k, (vf)(u << 16));
        store(orow + k + W, (vf)(u & 0xffff0000u));
      } else {
        store(orow + k, widen(load<vh>(sr + k)));
        store(orow + k + W, widen(load<vh>(sr + k + W)));
      }
    }
    for (; k < K; ++k) {  // the last K % 2W (zero-padded past K by aligned_zeros)
      const int64_t j = k % (2 * W), at = split ? k - j + (j & 1) * W + j / 2 : k;
      orow[at] = bf(sr[k]);
    }
  }
  return o;
}

#if defined(__AVX512BF16__)
// bf16 x [M, K] -> its bf16 rows as they are, zero-padded to ldx floats (2 * ldx bf16) a row (Bf16Dot).
const float* prep_x_bf16(const at::Tensor& x, int64_t ldx) {
  static thread_local std::vector<float> buf;
  const int64_t M = x.size(0), K = x.size(1);
  float* o = aligned_zeros(buf, M * ldx);
  const uint16_t* s = (const uint16_t*)x.data_ptr();
  for (int64_t m = 0; m < M; ++m) std::memcpy((uint16_t*)(o + m * ldx), s + m * K, K * 2);
  return o;
}
#endif

// Row blocks: as many accumulators as the registers hold (AVX-512: 32 zmm, the others 16 ymm or 2x16 NEON
// q registers for 8 floats): one input row streams 8 weight rows, more input rows share 4 (AVX-512: 2 and 4
// input rows; 8-float paths: 2 input rows, or 2 weight rows x 4 input rows from 4 inputs on).
template <class Kern, class OT>
void small_m(const typename Kern::WT* Wp, int64_t N, int64_t K, const float* x, int64_t ldx, int64_t M,
             const float* scale, OT* y) {
  auto rows = [&](auto RR, auto NMc) {
    constexpr int R = decltype(RR)::value, NM = decltype(NMc)::value;
    const int64_t nblk = N / R;
    // each thread a contiguous band of rows: one forward stream of weights per thread
    at::parallel_for(0, nblk, 1,
                     [&](int64_t b, int64_t e) { blocks_all_m<Kern, R, NM>(Wp, K, x, ldx, M, scale, y, N, b, e); });
    for (int64_t n = nblk * R; n < N; ++n)
      rows_all_m<Kern, 1, NM>(Wp + n * K, K, x, ldx, M, scale ? scale + n : nullptr, y + n, N);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;
  using I8 = std::integral_constant<int, 8>;
  if (M == 1) {
    rows(I1{}, I1{});  // one sequential stream a thread (stream_rows)
    return;
  }
  if constexpr (W >= 16) {
    if (M <= 2) rows(I8{}, I2{});
    else rows(I4{}, I4{});
  } else {
    // 4+ input rows: 2 weight rows x 4 inputs, each widened weight vector used 4 times instead of 2 (batch-8
    // decode of Qwen3-0.6B's 113 bf16 weights: 3-7 % less time a step in four A/B pairs on Zen 3)
    if (M <= 3) rows(I4{}, I2{});
    else rows(I2{}, I4{});
  }
}

// ---- int8 weights x int16-quantised inputs -----------------------------------------------------------------
// Sums are exact within a segment of SEG columns (|sum| per lane <= SEG / (2W) * 2 * 127 * 32767 < 2^31 for
// W >= 8) and added up in float32 across segments.
constexpr int64_t SEG = 2048;
static_assert(SEG / (2 * W) * 2 * 127 * 32767LL < (1LL << 31), "int8 segment sums would overflow int32");

template <int NR, int NM, class OT>
inline void i8_block(const int8_t* Wp, int64_t K, const int16_t* x, int64_t ldx, const float* xs, const float* ws,
                     OT* y, int64_t N) {
  float part[NR][NM] = {};
  for (int64_t k0 = 0; k0 < K; k0 += SEG) {
    const int64_t k1 = std::min(K, k0 + SEG);
    vi acc[NR][NM];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < NM; ++m) acc[r][m] = vi{};
    int64_t k = k0;
    if constexpr (NR == 1 && NM == 1) {  // one row: a sequential stream, U1 accumulators (see stream_rows)
      vi part[U1] = {};
      for (; k + U1 * 2 * W <= k1; k += U1 * 2 * W) {
        stream_prefetch(Wp + k, U1 * 2 * W);
        for (int u = 0; u < U1; ++u)
          part[u] = madd(part[u], widen_i8(load<vb2>(Wp + k + u * 2 * W)),
                         load<vs2>(x + k + u * 2 * W));
      }
      for (int u = 0; u < U1; ++u) acc[0][0] += part[u];
    }
    for (; k < k1; k += 2 * W) {
      if (NR * NM > 1 && (k & 63) == 0) prefetch_rows<NR>(Wp + k, K);  // one row: no prefetch (see above)
      const bool tail = k + 2 * W > K;
      vs2 w[NR];
      for (int r = 0; r < NR; ++r)
        w[r] = widen_i8(tail ? load_n<vb2>(Wp + r * K + k, K - k) : load<vb2>(Wp + r * K + k));
      for (int m = 0; m < NM; ++m) {
        const vs2 xv = load<vs2>(x + m * ldx + k);  // zero-padded past K
        for (int r = 0; r < NR; ++r) acc[r][m] = madd(acc[r][m], w[r], xv);
      }
    }
    for (int m = 0; m < NM; ++m) {
      float sm[NR];
      if constexpr (NR % 4 == 0) {
        for (int r = 0; r < NR; r += 4)
          hsum4(__builtin_convertvector(acc[r][m], vf), __builtin_convertvector(acc[r + 1][m], vf),
                __builtin_convertvector(acc[r + 2][m], vf), __builtin_convertvector(acc[r + 3][m], vf), sm + r);
      } else {
        for (int r = 0; r < NR; ++r) sm[r] = hsum(__builtin_convertvector(acc[r][m], vf));
      }
      for (int r = 0; r < NR; ++r) part[r][m] += sm[r];
    }
  }
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < NR; ++r) put(y + m * N + r, part[r][m] * xs[m] * ws[r]);
}

template <int NR, int NM, class OT>
inline void i8_rows(const int8_t* Wp, int64_t K, const int16_t* x, int64_t ldx, const float* xs, int64_t M,
                    const float* ws, OT* y, int64_t N) {
  int64_t m = 0;
  for (; m + NM <= M; m += NM) i8_block<NR, NM>(Wp, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N);
  const int64_t rest = M - m;
  if constexpr (NM > 1) {
    if (rest == 1) i8_block<NR, 1>(Wp, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N);
  }
  if constexpr (NM > 2) {
    if (rest == 2) i8_block<NR, 2>(Wp, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N);
  }
  if constexpr (NM > 3) {
    if (rest == 3) i8_block<NR, 3>(Wp, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N);
  }
}

template <int RR, int NM, class OT>
void i8_all(const int8_t* Wp, int64_t N, int64_t K, const int16_t* x, int64_t ldx, const float* xs, int64_t M,
            const float* ws, OT* y) {
  const int64_t nblk = N / RR;
  at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) i8_rows<RR, NM>(Wp + i * RR * K, K, x, ldx, xs, M, ws + i * RR, y + i * RR, N);
  });
  for (int64_t n = nblk * RR; n < N; ++n) i8_rows<1, NM>(Wp + n * K, K, x, ldx, xs, M, ws + n, y + n, N);
}

// x [M, K] (bf16 / fp32) -> int16 rows of ldx (zero-padded) and one scale per row, in per-thread buffers.
// Returns false (buffers unusable) when x holds an inf or NaN, which int16 cannot carry.
bool prep_x16(const at::Tensor& x, int64_t ldx, const int16_t*& xq, const float*& xs) {
  static thread_local std::vector<int16_t> buf;
  static thread_local std::vector<float> scales;
  const int64_t M = x.size(0), K = x.size(1);
  int16_t* xb = aligned_zeros(buf, M * ldx);
  scales.assign(M, 1.f);
  const bool b16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(b16 || x.scalar_type() == at::kFloat, "qwen3lab fast linear: x must be float32 or bfloat16");
  const uint16_t* xh = b16 ? (const uint16_t*)x.data_ptr() : nullptr;
  const float* xf = b16 ? nullptr : x.data_ptr<float>();
  auto ld = [&](int64_t i, int64_t n) {  // W elements of x (n of them when n < W) from flat index i, as float32
    if (b16) return widen(n >= W ? load<vh>(xh + i) : load_n<vh>(xh + i, n));
    return n >= W ? load<vf>(xf + i) : load_n<vf>(xf + i, n);
  };
  const vf lim = splat(32767.f), magic = splat(12582912.0f);
  for (int64_t m = 0; m < M; ++m) {
    vf mx = {};
    vi finite = isplat(-1);
    for (int64_t k = 0; k < K; k += W) {
      const vf a = vabs(ld(m * K + k, K - k));
      finite &= a < splat(INFINITY);  // false for inf and NaN
      mx = vmax(mx, a);
    }
    if (any(~finite)) return false;
    const float amax = hmax(mx);
    const float sx = amax > 0.f ? amax / 32767.f : 1.f;
    scales[m] = sx;
    const vf inv = splat(1.f / sx);
    for (int64_t k = 0; k < K; k += W) {  // round to nearest even (as nearbyint), within +-32767
      const vf v = vmax(-lim, vmin(lim, ld(m * K + k, K - k) * inv));
      const vs q = __builtin_convertvector(__builtin_convertvector((v + magic) - magic, vi), vs);
      if (K - k >= W) store(xb + m * ldx + k, q);
      else store_n(xb + m * ldx + k, q, K - k);
    }
  }
  xq = xb;
  xs = scales.data();
  return true;
}

// false: x holds inf/NaN (nothing written); the caller's float path then propagates them.
template <class OT>
bool i8_linear(const at::Tensor& x, const int8_t* Wp, int64_t N, int64_t K, const float* ws, OT* y) {
  const int64_t M = x.size(0), ldx = (K + 2 * W - 1) / (2 * W) * (2 * W);
  const int16_t* xp;
  const float* xs;
  if (!prep_x16(x, ldx, xp, xs)) return false;
  if (M == 1) {
    i8_all<1, 1>(Wp, N, K, xp, ldx, xs, M, ws, y);  // one sequential stream a thread (i8_block)
  } else if constexpr (W >= 16) {
    if (M <= 2) i8_all<8, 2>(Wp, N, K, xp, ldx, xs, M, ws, y);
    else i8_all<4, 4>(Wp, N, K, xp, ldx, xs, M, ws, y);
  } else {
    i8_all<4, 2>(Wp, N, K, xp, ldx, xs, M, ws, y);
  }
  return true;
}

void check_2d(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), "qwen3lab fast linear: ", what,
              " must be a contiguous 2-d CPU tensor, got sizes ", t.sizes(), " strides ", t.strides());
}

// An activation x [..., C] (any leading shape, any strides) as contiguous rows [M, C]: a view when x is contiguous
// already (a decode step's q/k/v, split from the fused projection, are). The model's leaves pass their tensors
// as they are and get their leading shape back (with_lead): a reshape, a contiguous and a view less per call in
// Python, which at ~1-3 us each were a tenth of a small model's decode step.
at::Tensor rows_of(const at::Tensor& x, int64_t C) {
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), "qwen3lab kernel: x must be a CPU tensor, got sizes ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(C > 0 && x.numel() % C == 0, "qwen3lab kernel: x of sizes ", x.sizes(), " is not rows of ", C);
  return x.contiguous().view({x.numel() / C, C});
}
at::Tensor rows_of(const at::Tensor& x) { return rows_of(x, x.dim() >= 1 ? std::max<int64_t>(1, x.size(-1)) : 1); }

// y [M, N] (M = the rows of x) viewed with x's leading dims: [..., N].
at::Tensor with_lead(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  auto s = x.sizes().vec();
  s.back() = y.size(1);
  return y.view(s);
}

// ---- int4 weights with group-wise scales x int16-quantised inputs --------------------------------------------
// qweight [N, K/2] uint8 in llama.cpp Q4_0's nibble order: each block of 32 weights of a row is 16 bytes, byte j
// holding q_j + 8 in its low nibble and q_{j+16} + 8 in its high one (q in -8..7); scales [N, K/G] float32, one
// per group of G = 32 or 128 columns (whole blocks). The bytes are widened to uint16 and split into nibbles
// n = q + 8 (an AND and a shift), which are multiplied in pairs with the int16-quantised input (madd, as for
// int8) into int32 sums; each group's sum starts from -8 * (the group's sum of x) (the `bias` vectors, lane 0)
// so it ends exactly sum q * x (|.| <= 128 * 15 * 32767 < 2^31). It is converted to float32 and multiplied by
// the group's scale into float32 accumulators (one convert and one FMA a vector per group), times the row's x
// scale at the end. On AVX2 a block of one row against one input row is 9 instructions (vpmovzxbw, and, shift,
// 2 x (vpmaddwd + add), with the group's convert + FMA shared by 4 blocks at G = 128); sign-extending through
// int8 with generic conversions compiled to ~20.
constexpr int BV = 32 / (2 * W);  // int16 vectors (2W lanes) a block fills: 2 on the 8-float paths, 1 on AVX-512
static_assert(BV * sizeof(vs2) == 2 * sizeof(vw16), "a block is 32 int16");

// One block of 32 packed weights -> their nibbles n = q + 8 in column order, as BV vectors of 2W int16.
inline void unpack_q4(const uint8_t* p, vs2 (&w)[BV]) {
  const vw16 b = widen_u8(load<vq16>(p));
  join16(b & 15, b >> 4, w);  // [lo | hi]: one vector on AVX-512, two on the others
}

// NR weight rows x NM input rows over all K columns; BPG blocks of 32 a group (G = 32 * BPG).
template <int NR, int NM, int BPG, class OT>
inline void q4_block(const uint8_t* Wp, int64_t K, const float* sc, const int16_t* x, int64_t ldx, const vi* bias,
                     const float* xs, OT* y, int64_t N) {
  constexpr int64_t G = 32 * BPG;
  const int64_t rb = K / 2, ng = K / G;
  vf acc[NR][NM];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < NM; ++m) acc[r][m] = vf{};
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t k0 = g * G;
    if ((k0 & 127) == 0) prefetch_rows<NR>(Wp + k0 / 2, rb);  // each new 64-byte line of the rows
    for (int r = 0; r < NR; ++r) {
      vi t[NM];
      for (int m = 0; m < NM; ++m) t[m] = bias[m * ng + g];
      for (int b = 0; b < BPG; ++b) {
        vs2 w[BV];
        unpack_q4(Wp + r * rb + (k0 + 32 * b) / 2, w);
        for (int m = 0; m < NM; ++m)
          for (int i = 0; i < BV; ++i) t[m] = madd(t[m], w[i], load<vs2>(x + m * ldx + k0 + 32 * b + 2 * W * i));
      }
      const vf s = splat(sc[r * ng + g]);
      for (int m = 0; m < NM; ++m) acc[r][m] = fmadd(__builtin_convertvector(t[m], vf), s, acc[r][m]);
    }
  }
  for (int m = 0; m < NM; ++m) {
    float sm[NR];
    if constexpr (NR % 4 == 0) {
      for (int r = 0; r < NR; r += 4) hsum4(acc[r][m], acc[r + 1][m], acc[r + 2][m], acc[r + 3][m], sm + r);
    } else {
      for (int r = 0; r < NR; ++r) sm[r] = hsum(acc[r][m]);
    }
    for (int r = 0; r < NR; ++r) put(y + m * N + r, sm[r] * xs[m]);
  }
}

// All M input rows against NR weight rows, NM at a time (then the 1..NM-1 left).
template <int NR, int NM, int BPG, class OT>
inline void q4_rows(const uint8_t* Wp, int64_t K, const float* sc, const int16_t* x, int64_t ldx, const vi* bias,
                    const float* xs, int64_t M, OT* y, int64_t N) {
  const int64_t ng = K / (32 * BPG);
  int64_t m = 0;
  for (; m + NM <= M; m += NM)
    q4_block<NR, NM, BPG>(Wp, K, sc, x + m * ldx, ldx, bias + m * ng, xs + m, y + m * N, N);
  const int64_t rest = M - m;
  if constexpr (NM > 1) {
    if (rest == 1) q4_block<NR, 1, BPG>(Wp, K, sc, x + m * ldx, ldx, bias + m * ng, xs + m, y + m * N, N);
  }
  if constexpr (NM > 2) {
    if (rest == 2) q4_block<NR, 2, BPG>(Wp, K, sc, x + m * ldx, ldx, bias + m * ng, xs + m, y + m * N, N);
  }
  if constexpr (NM > 3) {
    if (rest == 3) q4_block<NR, 3, BPG>(Wp, K, sc, x + m * ldx, ldx, bias + m * ng, xs + m, y + m * N, N);
  }
}

// Each thread a contiguous band of RR-row blocks (one forward stream of weights), the last N % RR rows alone.
template <int RR, int NM, int BPG, class OT>
void q4_all(const uint8_t* Wp, int64_t N, int64_t K, const float* sc, const int16_t* x, int64_t ldx, const vi* bias,
            const float* xs, int64_t M, OT* y) {
  const int64_t nblk = N / RR, rb = K / 2, ng = K / (32 * BPG);
  at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      q4_rows<RR, NM, BPG>(Wp + i * RR * rb, K, sc + i * RR * ng, x, ldx, bias, xs, M, y + i * RR, N);
  });
  for (int64_t n = nblk * RR; n < N; ++n)
    q4_rows<1, NM, BPG>(Wp + n * rb, K, sc + n * ng, x, ldx, bias, xs, M, y + n, N);
}

// false: x holds inf/NaN (nothing written); the caller then runs the float32 band GEMM, which propagates them.
template <class OT>
bool q4_linear(const at::Tensor& x, const uint8_t* Wp, int64_t N, int64_t K, const float* sc, int64_t G, OT* y) {
  const int64_t M = x.size(0), ldx = K;  // K is a multiple of 32 >= 2W: no padding
  const int16_t* xp;
  const float* xs;
  if (!prep_x16(x, ldx, xp, xs)) return false;
  // bias[m * ng + g]: -8 * (the sum of row m's int16 x over group g) in lane 0, zeros elsewhere
  static thread_local std::vector<vi> bias;
  const int64_t ng = K / G;
  bias.assign(M * ng, vi{});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      int32_t s = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xp[m * ldx + k];
      bias[m * ng + g][0] = -8 * s;
    }
  const vi* bp = bias.data();
  auto run = [&](auto BPGc) {
    constexpr int BPG = decltype(BPGc)::value;
    // One input row (decode of one sequence): one weight row at a time, so each thread reads its band as one
    // sequential stream, as the other weight types' one-row decode does; 8 rows side by side (8 streams a
    // thread) ran 0.82-0.90x as fast (Zen 3, avx2: 60 weights of [3072, 1024], 1 and 2 threads).
    // Batches: blocks of NR weight rows x NM input rows, as many as the registers hold: NR * NM float32
    // accumulators + NM int32 group sums + BV unpacked weights (16 ymm / 32 zmm).
    if (M == 1) {
      q4_all<1, 1, BPG>(Wp, N, K, sc, xp, ldx, bp, xs, M, y);
    } else if constexpr (W >= 16) {
      if (M == 2) q4_all<8, 2, BPG>(Wp, N, K, sc, xp, ldx, bp, xs, M, y);
      else q4_all<4, 4, BPG>(Wp, N, K, sc, xp, ldx, bp, xs, M, y);
    } else {
      q4_all<4, 2, BPG>(Wp, N, K, sc, xp, ldx, bp, xs, M, y);
    }
  };
  if (G == 32) run(std::integral_constant<int, 1>{});
  else run(std::integral_constant<int, 4>{});
  return true;
}

// Weight rows [n0, n0 + nc) of packed int4 dequantised to float32 (q * scale, one rounding) into out [nc, K].
void widen_q4_rows(const uint8_t* qw, const float* sc, int64_t K, int64_t G, int64_t n0, int64_t nc, float* out) {
  const int64_t rb = K / 2, ng = K / G;
  at::parallel_for(n0, n0 + nc, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float* o = out + (n - n0) * K;
      for (int64_t g = 0; g < ng; ++g) {
        const vf s = splat(sc[n * ng + g]), eight = splat(8.f);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
          const vq16 v = load<vq16>(qw + n * rb + k / 2);
          uint8_t nib[32];  // the block's nibbles q + 8 in column order
          store(nib, v & 15);
          store(nib + 16, v >> 4);
          for (int i = 0; i < 32; i += W) store(o + k + i, (u8_to_float(nib + i) - eight) * s);
        }
      }
    }
  });
}

void check_q4(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sc, int64_t G) {
  check_2d(x, "x");
  check_2d(qw, "qweight");
  check_2d(sc, "scales");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "qwen3lab int4 linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(qw.scalar_type() == at::kByte, "qwen3lab int4 linear: qweight must be uint8 (two int4 a byte), got ",
              qw.scalar_type());
  TORCH_CHECK(sc.scalar_type() == at::kFloat, "qwen3lab int4 linear: scales must be float32, got ", sc.scalar_type());
  TORCH_CHECK(G == 32 || G == 128, "qwen3lab int4 linear: group_size must be 32 or 128, got ", G);
  const int64_t K = x.size(1), N = qw.size(0);
  TORCH_CHECK(qw.size(1) * 2 == K, "qwen3lab int4 linear: x has ", K, " columns, qweight ", qw.sizes(), " holds ",
              qw.size(1) * 2);
  TORCH_CHECK(K % G == 0, "qwen3lab int4 linear: K = ", K, " is not a multiple of group_size ", G);
  TORCH_CHECK(sc.size(0) == N && sc.size(1) == K / G, "qwen3lab int4 linear: scales must be [N, K / group_size] = [",
              N, ", ", K / G, "], got ", sc.sizes());
}

}  // namespace

// y = x @ W.T for small M; W bfloat16 or float32 (same dtype as x) or int8 with per-row fp32 scales.
at::Tensor linear_small_2d(const at::Tensor& x, const at::Tensor& Wt, const c10::optional<at::Tensor>& scale) {
  check_2d(x, "x");
  check_2d(Wt, "W");
  const int64_t M = x.size(0), K = x.size(1), N = Wt.size(0);
  TORCH_CHECK(Wt.size(1) == K, "qwen3lab fast linear: x has ", K, " columns, W has ", Wt.size(1));
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* sp = nullptr;
  if (Wt.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat && scale->numel() == N &&
                    scale->is_contiguous(), "qwen3lab fast linear: int8 W needs a contiguous float32 scale [N]");
    sp = scale->data_ptr<float>();
  } else {
    TORCH_CHECK(Wt.scalar_type() == x.scalar_type(), "qwen3lab fast linear: W dtype ", Wt.scalar_type(),
                " differs from x dtype ", x.scalar_type());
  }
  const bool bf16w = Wt.scalar_type() == at::kBFloat16;
  const int64_t ch = bf16w ? 2 * W : W;
  const int64_t ldx = (K + ch - 1) / ch * ch;
  const bool out_bf16 = x.scalar_type() == at::kBFloat16;
  uint16_t* yb = out_bf16 ? (uint16_t*)y.data_ptr() : nullptr;
  float* yf = out_bf16 ? nullptr : y.data_ptr<float>();
  switch (Wt.scalar_type()) {
    case at::kBFloat16:
#if defined(__AVX512BF16__)
      small_m<Bf16Dot>((const uint16_t*)Wt.data_ptr(), N, K, prep_x_bf16(x, ldx / 2), ldx / 2, M, sp, yb);
#else
      small_m<Bf16W>((const uint16_t*)Wt.data_ptr(), N, K, prep_x(x, true, ldx), ldx, M, sp, yb);
#endif
      break;
    case at::kFloat:
      small_m<WideW<float>>(Wt.data_ptr<float>(), N, K, prep_x(x, false, ldx), ldx, M, sp, yf);
      break;
    case at::kChar: {
      if (out_bf16 ? i8_linear(x, Wt.data_ptr<int8_t>(), N, K, sp, yb) : i8_linear(x, Wt.data_ptr<int8_t>(), N, K, sp, yf))
        break;
      const float* xp = prep_x(x, false, ldx);
      if (out_bf16) small_m<WideW<int8_t>>(Wt.data_ptr<int8_t>(), N, K, xp, ldx, M, sp, yb);
      else small_m<WideW<int8_t>>(Wt.data_ptr<int8_t>(), N, K, xp, ldx, M, sp, yf);
      break;
    }
    default:
      TORCH_CHECK(false, "qwen3lab fast linear: unsupported weight dtype ", Wt.scalar_type());
  }
  return y;
}

// W rows [n0, n0 + nc) widened to fp32 (times scale for int8) into out [nc, K].
void widen_rows(const at::Tensor& Wt, const c10::optional<at::Tensor>& scale, int64_t n0, int64_t nc, float* out) {
  const int64_t K = Wt.size(1);
  at::parallel_for(n0, n0 + nc, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float* o = out + (n - n0) * K;
      if (Wt.scalar_type() == at::kBFloat16) {
        const uint16_t* w = (const uint16_t*)Wt.data_ptr() + n * K;
        int64_t k = 0;
        for (; k + W <= K; k += W) store(o + k, widen(load<vh>(w + k)));
        for (; k < K; ++k) o[k] = bf(w[k]);
      } else {
        const int8_t* w = Wt.data_ptr<int8_t>() + n * K;
        const float s = scale->data_ptr<float>()[n];
        for (int64_t k = 0; k < K; ++k) o[k] = float(w[k]) * s;
      }
    }
  });
}

// y = x @ W.T for large M: W (bf16, or int8 with scales) widened a band of rows at a time, BLAS sgemm.
at::Tensor linear_large_2d(const at::Tensor& x, const at::Tensor& Wt, const c10::optional<at::Tensor>& scale,
                        int64_t band_rows) {
  check_2d(x, "x");
  check_2d(Wt, "W");
  const int64_t M = x.size(0), K = x.size(1), N = Wt.size(0);
  TORCH_CHECK(Wt.size(1) == K, "qwen3lab fast linear: x has ", K, " columns, W has ", Wt.size(1));
  TORCH_CHECK(Wt.scalar_type() == at::kBFloat16 || Wt.scalar_type() == at::kChar,
              "qwen3lab fast linear (large): W must be bfloat16 or int8");
  if (Wt.scalar_type() == at::kChar)
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat && scale->numel() == N,
                "qwen3lab fast linear: int8 W needs a float32 scale [N]");
  auto x32 = x.to(at::kFloat).contiguous();
  auto y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int64_t nb = std::max<int64_t>(16, std::min<int64_t>(band_rows, N));
  auto band = at::empty({nb, K}, x.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nc = std::min(nb, N - n0);
    widen_rows(Wt, scale, n0, nc, band.data_ptr<float>());
    auto out = y32.narrow(1, n0, nc);
    at::mm_out(out, x32, band.narrow(0, 0, nc).t());
  }
  return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}

// y = x @ W'.T for many rows, W' the packed int4 weight dequantised (q * scale) a band of rows at a time to
// float32 and handed to BLAS sgemm (cache-resident bands, like linear_large).
at::Tensor linear_q4_large_2d(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           int64_t group_size, int64_t band_rows) {
  check_q4(x, qweight, scales, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto x32 = x.to(at::kFloat).contiguous();
  auto y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
  const int64_t nb = std::max<int64_t>(16, std::min<int64_t>(band_rows, N));
  auto band = at::empty({nb, K}, x.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nc = std::min(nb, N - n0);
    widen_q4_rows(qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(), K, group_size, n0, nc,
                  band.data_ptr<float>());
    auto out = y32.narrow(1, n0, nc);
    at::mm_out(out, x32, band.narrow(0, 0, nc).t());
  }
  return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}

// y = x @ W'.T for few rows (decode): the packed int4 weight streamed once, nibbles x int16-quantised x.
at::Tensor linear_q4_2d(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size) {
  check_q4(x, qweight, scales, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const bool ok = x.scalar_type() == at::kBFloat16 ? q4_linear(x, qp, N, K, sp, group_size, (uint16_t*)y.data_ptr())
                                                   : q4_linear(x, qp, N, K, sp, group_size, y.data_ptr<float>());
  if (ok) return y;
  return linear_q4_large_2d(x, qweight, scales, group_size, std::max<int64_t>(16, (8 << 20) / (4 * K)));
}

// ---- leaf ops of the model -----------------------------------------------------------------------------------
namespace {

// W values in the model dtype <-> fp32 vectors; n < W loads / stores only the first n (tails); rnd() = what
// storing and reloading gives.
struct F32T {
  using T = float;
  static inline vf ld(const float* p, int64_t n) { return n >= W ? load<vf>(p) : load_n<vf>(p, n); }
  static inline void st(float* p, vf v, int64_t n) {
    if (n >= W) store(p, v);
    else store_n(p, v, n);
  }
  static inline vf rnd(vf v) { return v; }
};
struct BF16T {
  using T = uint16_t;
  static inline vf ld(const uint16_t* p, int64_t n) { return widen(n >= W ? load<vh>(p) : load_n<vh>(p, n)); }
  static inline void st(uint16_t* p, vf v, int64_t n) {
    if (n >= W) store(p, narrow(v));
    else store_n(p, narrow(v), n);
  }
  static inline vf rnd(vf v) { return (vf)(bf16_bits(v) & 0xffff0000u); }
};

template <class D>
inline float sum_squares(const typename D::T* x, int64_t n) {
  vf acc = {};
  for (int64_t i = 0; i < n; i += W) {
    const vf v = D::ld(x + i, n - i);
    acc = fmadd(v, v, acc);
  }
  return hsum(acc);
}

// y = w * dtype(x * rsqrt(mean(x^2) + eps)) over one row, as RMSNorm.forward does it.
template <class D>
inline void rms_row(const typename D::T* x, const typename D::T* w, typename D::T* y, int64_t n, float eps) {
  const vf r = splat(1.0f / std::sqrt(sum_squares<D>(x, n) / float(n) + eps));
  for (int64_t i = 0; i < n; i += W) D::st(y + i, D::ld(w + i, n - i) * D::rnd(D::ld(x + i, n - i) * r), n - i);
}

template <class D>
void rmsnorm_impl(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, double eps) {
  using T = typename D::T;
  const int64_t M = x.size(0), n = x.size(1);
  const T* xp = (const T*)x.data_ptr();
  const T* wp = (const T*)w.data_ptr();
  T* yp = (T*)y.data_ptr();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) rms_row<D>(xp + m * n, wp, yp + m * n, n, float(eps));
  });
}

// RoPE of one head's row: out = dtype(x * cos) + dtype(rotate_half(x) * sin), rounded again, as apply_rope's
// three eager ops round them. c / s: the token's angles [Dh]; t / rot: scratch of Dh + W floats.
template <class D>
inline void rope_row(const typename D::T* xr, const typename D::T* c, const typename D::T* s, typename D::T* out,
                     int64_t Dh, float* t, float* rot) {
  const int64_t half = Dh / 2;
  for (int64_t j = 0; j < Dh; j += W) store(t + j, D::ld(xr + j, Dh - j));
  for (int64_t j = 0; j < half; ++j) {  // rotate_half: [-t2, t1]
    rot[j] = -t[j + half];
    rot[j + half] = t[j];
  }
  for (int64_t j = 0; j < Dh; j += W) {  // each product rounded to the dtype, then the sum
    const vf a = D::rnd(load<vf>(t + j) * D::ld(c + j, Dh - j));
    const vf bb = D::rnd(load<vf>(rot + j) * D::ld(s + j, Dh - j));
    D::st(out + j, a + bb, Dh - j);
  }
}

// RoPE over rows of one head each (rope_row). x [M, H, Dh], cos / sin [M, Dh] (one row per token).
template <class D>
void rope_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  using T = typename D::T;
  const int64_t M = x.size(0), H = x.size(1), Dh = x.size(2);
  const T* xp = (const T*)x.data_ptr();
  const T* cp = (const T*)cos.data_ptr();
  const T* sp = (const T*)sin.data_ptr();
  T* op = (T*)out.data_ptr();
  at::parallel_for(0, M * H, 64, [&](int64_t b, int64_t e) {
    std::vector<float> t(Dh + W), rot(Dh + W);  // room for a whole last vector
    for (int64_t i = b; i < e; ++i) {
      const int64_t m = i / H;
      rope_row<D>(xp + i * Dh, cp + m * Dh, sp + m * Dh, op + i * Dh, Dh, t.data(), rot.data());
    }
  });
}

// q's and k's per-head RMSNorm (each its own weight and eps) and then RoPE in one pass over their rows: qn / kn =
// rms_row (the norm kernel's arithmetic), qr / kr = rope_row of those rounded rows, so all four equal what rmsnorm
// then rope give, bit for bit. q [M, Hq, Dh], k [M, Hkv, Dh], wq / wk [Dh], cos / sin [M, Dh] (any leading
// shapes, contiguous). One leaf call a layer instead of four.
template <class D>
void qk_norm_rope_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& wq, const at::Tensor& wk,
                       double eps_q, double eps_k, const at::Tensor& cos, const at::Tensor& sin, int64_t M,
                       at::Tensor& qn, at::Tensor& kn, at::Tensor& qr, at::Tensor& kr) {
  using T = typename D::T;
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), Dh = q.size(-1), H = Hq + Hkv;
  const T* cp = (const T*)cos.data_ptr();
  const T* sp = (const T*)sin.data_ptr();
  const T* x[2] = {(const T*)q.data_ptr(), (const T*)k.data_ptr()};  // [0]: q's, [1]: k's
  const T* w[2] = {(const T*)wq.data_ptr(), (const T*)wk.data_ptr()};
  const float eps[2] = {float(eps_q), float(eps_k)};
  T* n[2] = {(T*)qn.data_ptr(), (T*)kn.data_ptr()};
  T* r[2] = {(T*)qr.data_ptr(), (T*)kr.data_ptr()};
  at::parallel_for(0, M * H, 64, [&](int64_t b, int64_t e) {
    std::vector<float> t(Dh + W), rot(Dh + W);
    for (int64_t i = b; i < e; ++i) {
      const int64_t m = i / H, h = i % H;
      const int j = h < Hq ? 0 : 1;
      const int64_t off = (j == 0 ? m * Hq + h : m * Hkv + (h - Hq)) * Dh;  // the head's row in q or in k
      rms_row<D>(x[j] + off, w[j], n[j] + off, Dh, eps[j]);
      rope_row<D>(n[j] + off, cp + m * Dh, sp + m * Dh, r[j] + off, Dh, t.data(), rot.data());
    }
  });
}

template <class D>
void silu_mul_impl(const at::Tensor& gu, at::Tensor& out) {
  using T = typename D::T;
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  const T* g = (const T*)gu.data_ptr();
  T* o = (T*)out.data_ptr();
  const int64_t chunks = (I + W - 1) / W;
  at::parallel_for(0, M * chunks, 256, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t m = c / chunks, i = (c % chunks) * W, n = I - i;
      const vf a = D::ld(g + m * 2 * I + i, n);
      const vf sl = D::rnd(a / (splat(1.0f) + vexp(-a)));
      D::st(o + m * I + i, sl * D::ld(g + m * 2 * I + I + i, n), n);
    }
  });
}

// f(std::true_type{}) if `flag`, else f(std::false_type{}): a run-time fact made a template argument (the
// decode attentions' FULL, below)
template <class F>
inline void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// scores[r, s] = q[r] . K[s] for NR heads over n keys, 4 at a time (q rows float32, already scaled, zero-padded
// to a multiple of W; key tails load as zeros), prefetching the same rows of `next`: the next block a paged
// sequence reads (blocks lie apart in the pool, where no hardware prefetcher follows), or 16 keys ahead.
// FULL: Dh a multiple of W, so every key load is a whole vector with no length check. vals (or nullptr): rows
// prefetched into L2 alongside, 4 a step: the paged kernel passes the values of this same block, which its p.V
// pass reads once the chunk's scores are done (they were fetched then, block by block as p.V reached them:
// 1.06-1.10x the decode attention of one or 8 sequences at 144 positions and of one at 1024 on Zen 3, 2 threads,
// the caches emptied between layers as a step's weights empty them).
template <class D, int NR, bool FULL>
inline void qk_block(const typename D::T* K, const typename D::T* next, int64_t n, int64_t Dh, const float* q,
                     int64_t ldq, float* sc, int64_t lds, const typename D::T* vals = nullptr) {
  const int64_t row_bytes = Dh * int64_t(sizeof(typename D::T));
  int64_t s = 0;
  for (; s + 4 <= n; s += 4) {
    for (int64_t l = 0; l < 4 * row_bytes; l += 64) __builtin_prefetch((const char*)(next + s * Dh) + l, 0, 3);
    if (vals != nullptr)
      for (int64_t l = 0; l < 4 * row_bytes; l += 64) __builtin_prefetch((const char*)(vals + s * Dh) + l, 0, 2);
    vf acc[4][NR];
    for (int j = 0; j < 4; ++j)
      for (int r = 0; r < NR; ++r) acc[j][r] = vf{};
    for (int64_t c = 0; c < Dh; c += W) {
      vf qv[NR];
      for (int r = 0; r < NR; ++r) qv[r] = load<vf>(q + r * ldq + c);
      for (int j = 0; j < 4; ++j) {
        const vf kv = D::ld(K + (s + j) * Dh + c, FULL ? W : Dh - c);
        for (int r = 0; r < NR; ++r) acc[j][r] = fmadd(qv[r], kv, acc[j][r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      float out[4];
      hsum4(acc[0][r], acc[1][r], acc[2][r], acc[3][r], out);
      std::memcpy(sc + r * lds + s, out, sizeof out);
    }
  }
  for (; s < n; ++s)
    for (int r = 0; r < NR; ++r) {
      vf acc = {};
      for (int64_t c = 0; c < Dh; c += W) acc = fmadd(load<vf>(q + r * ldq + c), D::ld(K + s * Dh + c, Dh - c), acc);
      sc[r * lds + s] = hsum(acc);
    }
}

// scores[r, s] = q[r] . K[s] for NR heads over a contiguous cache: qk_block with its prefetch 16 keys ahead.
template <class D, int NR>
inline void qk_rows(const typename D::T* K, int64_t S, int64_t Dh, const float* q, int64_t ldq, float* sc,
                    int64_t lds) {
  with_flag(Dh % W == 0, [&](auto full) {
    qk_block<D, NR, decltype(full)::value>(K, K + 16 * Dh, S, Dh, q, ldq, sc, lds);
  });
}

// a[r][c] += p[r * ldp] * Vrow[c0 + c*W ..] for NR heads: one key position's values (nc whole or partial vectors
// of the row from column c0), what both decode attentions' p.V loops do at each position. FULL: the CB vectors
// from c0 are all whole (nc = CB), so every load is a plain vector load with no length check.
template <class D, int NR, int CB, bool FULL>
inline void pv_add_row(const typename D::T* Vrow, int64_t Dh, int64_t c0, int64_t nc, const float* p, int64_t ldp,
                       vf (&a)[NR][CB]) {
  vf vv[CB];
  for (int c = 0; c < CB; ++c)
    vv[c] = FULL ? D::ld(Vrow + c0 + c * W, W) : c < nc ? D::ld(Vrow + c0 + c * W, Dh - c0 - c * W) : vf{};
  for (int r = 0; r < NR; ++r) {
    const vf pr = splat(p[r * ldp]);
    for (int c = 0; c < CB; ++c) a[r][c] = fmadd(pr, vv[c], a[r][c]);
  }
}

// out[r, c0 .. c0 + CB*W) = sum_s p[r, s] * V[s, c0 ..] for NR heads: every accumulator in registers
// (NR * CB of them), one pass over these columns of V, summed over s in order.
// FULL: as pv_paged_cols's.
template <class D, int NR, int CB, bool FULL>
inline void pv_cols(const typename D::T* V, int64_t S, int64_t Dh, int64_t c0, const float* p, int64_t ldp,
                    typename D::T* o) {
  vf a[NR][CB];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < CB; ++c) a[r][c] = vf{};
  // whole or partial vectors left in the row
  const int64_t nc = FULL ? CB : std::min<int64_t>(CB, (Dh - c0 + W - 1) / W);
  for (int64_t s = 0; s < S; ++s) {
    __builtin_prefetch((const char*)(V + (s + 16) * Dh + c0), 0, 3);
    pv_add_row<D, NR, CB, FULL>(V + s * Dh, Dh, c0, nc, p + s, ldp, a);
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < CB; ++c)
      if (c < nc) D::st(o + r * Dh + c0 + c * W, a[r][c], FULL ? W : Dh - c0 - c * W);
}

template <class D>
inline void pv_heads(const typename D::T* V, int64_t S, int64_t Dh, const float* p, int64_t R, typename D::T* o) {
  constexpr int CB = W >= 16 ? 8 : 4;  // 128 / 64 columns of V at a time, 2 heads: 16 / 8 accumulators
  for (int64_t c0 = 0; c0 < Dh; c0 += CB * W) {
    with_flag(Dh - c0 >= CB * W, [&](auto full) {
      constexpr bool FULL = decltype(full)::value;
      int64_t r = 0;
      for (; r + 2 <= R; r += 2) pv_cols<D, 2, CB, FULL>(V, S, Dh, c0, p + r * S, S, o + r * Dh);
      for (; r < R; ++r) pv_cols<D, 1, CB, FULL>(V, S, Dh, c0, p + r * S, S, o + r * Dh);
    });
  }
}

// softmax over one row of n float32 scores, in place
inline void softmax_row(float* x, int64_t n) {
  vf mx = splat(-INFINITY);
  int64_t s = 0;
  for (; s + W <= n; s += W) mx = vmax(mx, load<vf>(x + s));
  float m = hmax(mx);
  for (; s < n; ++s) m = x[s] > m ? x[s] : m;
  vf den = {};
  for (s = 0; s + W <= n; s += W) {
    const vf e = vexp(load<vf>(x + s) - m);
    den += e;
    store(x + s, e);
  }
  if (s < n) {  // the tail: only its first n - s lanes are scores (the rest would add exp(0 - m))
    const vf e = sel(first_lanes(n - s), vexp(load_n<vf>(x + s, n - s) - m), vf{});
    den += e;
    store_n(x + s, e, n - s);
  }
  const vf inv = splat(1.0f / hsum(den));
  for (s = 0; s + W <= n; s += W) store(x + s, load<vf>(x + s) * inv);
  for (; s < n; ++s) x[s] *= inv[0];
}

// Single-query attention for B sequences: k_new/v_new [B, Hkv, Dh] are written at position pos[b] of each
// sequence's cache [Hkv, cap, Dh] (this layer's view), then q [B, Hq, Dh] attends over positions 0..pos[b].
// Scores and softmax in float32, output accumulated in float32 and rounded once (as SDPA's CPU kernel).
template <class D>
void attend_decode_impl(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& vn, std::vector<at::Tensor>& kc,
                        std::vector<at::Tensor>& vc, const std::vector<int64_t>& pos, double scale, at::Tensor& out) {
  using T = typename D::T;
  const int64_t B = q.size(0), Hq = q.size(1), Dh = q.size(2), Hkv = kn.size(1), R = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t cap = kc[b].size(1);
      std::memcpy((T*)kc[b].data_ptr() + (g * cap + pos[b]) * Dh, (const T*)kn.data_ptr() + (b * Hkv + g) * Dh,
                  Dh * sizeof(T));
      std::memcpy((T*)vc[b].data_ptr() + (g * cap + pos[b]) * Dh, (const T*)vn.data_ptr() + (b * Hkv + g) * Dh,
                  Dh * sizeof(T));
    }
  const T* qp = (const T*)q.data_ptr();
  T* op = (T*)out.data_ptr();
  const int64_t ldq = (Dh + W - 1) / W * W;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qf, sc;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv, S = pos[b] + 1, cap = kc[b].size(1);
      const T* K = (const T*)kc[b].data_ptr() + g * cap * Dh;
      const T* V = (const T*)vc[b].data_ptr() + g * cap * Dh;
      sc.resize(R * S);
      qf.assign(R * ldq, 0.f);  // this group's R query heads, float32, scaled, zero-padded
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < Dh; ++j) {
          const T h = qp[(b * Hq + g * R + r) * Dh + j];
          float f;
          if constexpr (std::is_same<T, uint16_t>::value) f = bf(h);
          else f = h;
          qf[r * ldq + j] = float(scale) * f;
        }
      int64_t r = 0;
      for (; r + 2 <= R; r += 2) qk_rows<D, 2>(K, S, Dh, qf.data() + r * ldq, ldq, sc.data() + r * S, S);
      for (; r < R; ++r) qk_rows<D, 1>(K, S, Dh, qf.data() + r * ldq, ldq, sc.data() + r * S, S);
      for (r = 0; r < R; ++r) softmax_row(sc.data() + r * S, S);
      pv_heads<D>(V, S, Dh, sc.data(), R, op + (b * Hq + g * R) * Dh);
    }
  });
}

// ---- paged single-query attention: keys / values read through each sequence's block table ---------------------
#ifndef QWEN3LAB_PFB
#define QWEN3LAB_PFB 2
#endif
constexpr int PFB = QWEN3LAB_PFB;  // blocks ahead to prefetch
// acc[r, c0 .. c0 + CB*W) += sum_s p[r, s] * V[s, c0 ..] over the n keys of one chunk, whose rows lie in blocks
// (Vb[j]: block j's rows for this head, bs of them, [bs, Dh]); accumulators in registers over the whole chunk.
// FULL (CB whole vectors from c0, as head_dim 128 gives): every count a constant, so the accumulators stay in
// registers; with a run-time count GCC 12 kept them on the stack, a store of each per key (seen in the
// disassembly), and p.V took ~60 cycles a key per KV head on Zen 3 for 2 heads x 128 values (~40 with FULL).
template <class D, int NR, int CB, bool FULL>
inline void pv_paged_cols(const typename D::T* const* Vb, int64_t bs, int64_t n, int64_t Dh, int64_t c0,
                          const float* p, int64_t ldp, float* acc, int64_t lda) {
  vf a[NR][CB];
  const int64_t nc = FULL ? CB : std::min<int64_t>(CB, (Dh - c0 + W - 1) / W);
  const int64_t col_bytes = nc * W * int64_t(sizeof(typename D::T));  // these columns of one row
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < CB; ++c) a[r][c] = c < nc ? load<vf>(acc + r * lda + c0 + c * W) : vf{};
  for (int64_t j = 0, s = 0; s < n; ++j) {
    const typename D::T* V = Vb[j];
    const typename D::T* next = Vb[j + PFB];  // the next block's rows, prefetched as this one's are read
    const int64_t nn = std::min(bs, n - s);
    for (int64_t t = 0; t < nn; ++t) {
      for (int64_t l = 0; l < col_bytes; l += 64)  // every line of these columns
        __builtin_prefetch((const char*)(next + t * Dh + c0) + l, 0, 3);
      pv_add_row<D, NR, CB, FULL>(V + t * Dh, Dh, c0, nc, p + s + t, ldp, a);
    }
    s += nn;
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < CB; ++c)
      if (c < nc) store(acc + r * lda + c0 + c * W, a[r][c]);
}

// x[i] = exp(x[i] - m) over n float32 scores, in place; returns their sum
inline float exp_row(float* x, int64_t n, float m) {
  vf den = {};
  int64_t s = 0;
  for (; s + W <= n; s += W) {
    const vf e = vexp(load<vf>(x + s) - m);
    den += e;
    store(x + s, e);
  }
  if (s < n) {
    const vf e = sel(first_lanes(n - s), vexp(load_n<vf>(x + s, n - s) - m), vf{});
    den += e;
    store_n(x + s, e, n - s);
  }
  return hsum(den);
}

inline float max_row(const float* x, int64_t n) {
  vf mx = splat(-INFINITY);
  int64_t s = 0;
  for (; s + W <= n; s += W) mx = vmax(mx, load<vf>(x + s));
  float m = hmax(mx);
  for (; s < n; ++s) m = x[s] > m ? x[s] : m;
  return m;
}

// Single-query attention for B sequences over a paged KV pool: k_new / v_new [B, Hkv, Dh] go to slot pos[b] of
// sequence b (block tables[b, pos[b] / bs], offset pos[b] % bs of the pool layer [NB, Hkv, bs, Dh]), then q
// [B, Hq, Dh] attends over positions 0..pos[b]. Keys are taken a chunk of whole blocks at a time (about 256):
// float32 scores, an online softmax (running max and sum, the accumulators rescaled when the max grows), the
// float32 output divided by the sum and rounded once. kp / vp: one pool layer shared by all, or one per sequence.
template <class D>
void attend_paged_impl(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& vn, const std::vector<at::Tensor>& kp,
                       const std::vector<at::Tensor>& vp, const int32_t* tab, int64_t MB, const int64_t* pos,
                       double scale, at::Tensor& out) {
  using T = typename D::T;
  const int64_t B = q.size(0), Hq = q.size(1), Dh = q.size(2), Hkv = kn.size(1), R = Hq / Hkv;
  const int64_t bs = kp[0].size(2);
  const bool shared = kp.size() == 1;
  auto pool = [&](const std::vector<at::Tensor>& p, int64_t b) { return (T*)p[shared ? 0 : b].data_ptr(); };
  auto row = [&](const std::vector<at::Tensor>& p, int64_t b, int64_t blk, int64_t g) {  // block blk, head g
    return pool(p, b) + ((int64_t)tab[b * MB + blk] * Hkv + g) * bs * Dh;
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t off = (pos[b] % bs) * Dh;
      std::memcpy(row(kp, b, pos[b] / bs, g) + off, (const T*)kn.data_ptr() + (b * Hkv + g) * Dh, Dh * sizeof(T));
      std::memcpy(row(vp, b, pos[b] / bs, g) + off, (const T*)vn.data_ptr() + (b * Hkv + g) * Dh, Dh * sizeof(T));
    }
  const T* qp = (const T*)q.data_ptr();
  T* op = (T*)out.data_ptr();
  const int64_t ldq = (Dh + W - 1) / W * W;
  const int64_t nbc = std::max<int64_t>(1, 256 / bs), CH = nbc * bs;  // blocks and keys per chunk
  constexpr int CB = W >= 16 ? 8 : 4;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qf(R * ldq), acc(R * ldq), sc(R * CH), m(R), l(R);
    std::vector<const T*> Kb(nbc + PFB), Vb(nbc + PFB);  // the chunk's blocks, and PFB after it (prefetch)
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv, S = pos[b] + 1;
      std::fill(qf.begin(), qf.end(), 0.f);  // this group's R query heads, float32, scaled, zero-padded
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < Dh; ++j) {
          const T h = qp[(b * Hq + g * R + r) * Dh + j];
          float f;
          if constexpr (std::is_same<T, uint16_t>::value) f = bf(h);
          else f = h;
          qf[r * ldq + j] = float(scale) * f;
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t s0 = 0; s0 < S; s0 += CH) {
        const int64_t n = std::min(CH, S - s0), nb = (n + bs - 1) / bs, last = pos[b] / bs;
        for (int64_t j = 0; j < nb + PFB; ++j) {
          const int64_t blk = std::min(s0 / bs + j, last);  // past the end: the last block again (harmless)
          Kb[j] = row(kp, b, blk, g);
          Vb[j] = row(vp, b, blk, g);
        }
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t nn = std::min(bs, n - j * bs);
          float* scj = sc.data() + j * bs;
          with_flag(Dh % W == 0, [&](auto full) {
            constexpr bool FULL = decltype(full)::value;
            const T* vals = Vb[j];  // prefetched by the first head group's pass only
            int64_t r = 0;
            for (; r + 2 <= R; r += 2, vals = nullptr)
              qk_block<D, 2, FULL>(Kb[j], Kb[j + PFB], nn, Dh, qf.data() + r * ldq, ldq, scj + r * CH, CH, vals);
            for (; r < R; ++r, vals = nullptr)
              qk_block<D, 1, FULL>(Kb[j], Kb[j + PFB], nn, Dh, qf.data() + r * ldq, ldq, scj + r * CH, CH, vals);
          });
        }
        for (int64_t r = 0; r < R; ++r) {  // online softmax: rescale what was summed under the old max
          const float mnew = std::max(m[r], max_row(sc.data() + r * CH, n));
          const float alpha = std::exp(m[r] - mnew);  // 0 on the first chunk (m = -inf)
          l[r] = l[r] * alpha + exp_row(sc.data() + r * CH, n, mnew);
          m[r] = mnew;
          if (alpha != 1.f)
            for (int64_t c = 0; c < ldq; c += W) store(acc.data() + r * ldq + c, load<vf>(acc.data() + r * ldq + c) * alpha);
        }
        for (int64_t c0 = 0; c0 < Dh; c0 += CB * W) {
          with_flag(Dh - c0 >= CB * W, [&](auto full) {
            constexpr bool FULL = decltype(full)::value;
            int64_t r = 0;
            for (; r + 2 <= R; r += 2)
              pv_paged_cols<D, 2, CB, FULL>(Vb.data(), bs, n, Dh, c0, sc.data() + r * CH, CH, acc.data() + r * ldq,
                                            ldq);
            for (; r < R; ++r)
              pv_paged_cols<D, 1, CB, FULL>(Vb.data(), bs, n, Dh, c0, sc.data() + r * CH, CH, acc.data() + r * ldq,
                                            ldq);
          });
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const vf inv = splat(1.0f / l[r]);
        T* o = op + (b * Hq + g * R + r) * Dh;
        for (int64_t c = 0; c < Dh; c += W) D::st(o + c, load<vf>(acc.data() + r * ldq + c) * inv, Dh - c);
      }
    }
  });
}

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              "qwen3lab kernel: dtype must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

void check_c(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "qwen3lab kernel: ", what, " must be contiguous on CPU");
}

}  // namespace

// RMSNorm(x) * w over the rows of x [M, D] (RMSNorm and q/k's per-head norm alike), in a new tensor.
at::Tensor rmsnorm_2d(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_c(x, "x");
  check_c(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == x.scalar_type(),
              "rmsnorm: x [M, D] and w [D] of one dtype, got ", x.sizes(), " and ", w.sizes());
  auto y = at::empty_like(x);
  if (is_bf16(x)) rmsnorm_impl<BF16T>(x, w, y, eps);
  else rmsnorm_impl<F32T>(x, w, y, eps);
  return y;
}

// x [M, H, Dh] rotated by cos / sin [M, Dh] (RoPE, half-split pairs), in a new tensor.
at::Tensor rope_2d(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  for (auto* t : {&x, &cos, &sin}) check_c(*t, "rope input");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
                  sin.sizes() == cos.sizes() && x.size(2) % 2 == 0, "rope: x [M, H, Dh], cos/sin [M, Dh], got ",
              x.sizes(), " and ", cos.sizes());
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope: dtypes differ");
  auto out = at::empty_like(x);
  if (is_bf16(x)) rope_impl<BF16T>(x, cos, sin, out);
  else rope_impl<F32T>(x, cos, sin, out);
  return out;
}

// gate_up [M, 2I] -> dtype(silu(gate)) * up [M, I]
at::Tensor silu_mul_2d(const at::Tensor& gu) {
  check_c(gu, "gate_up");
  auto out = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  if (is_bf16(gu)) silu_mul_impl<BF16T>(gu, out);
  else silu_mul_impl<F32T>(gu, out);
  return out;
}

at::Tensor attend_decode_2d(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& vn, std::vector<at::Tensor> kc,
                         std::vector<at::Tensor> vc, std::vector<int64_t> pos, double scale) {
  for (auto* t : {&q, &kn, &vn}) check_c(*t, "attend_decode input");
  const int64_t B = q.size(0);
  TORCH_CHECK(int64_t(kc.size()) == B && int64_t(vc.size()) == B && int64_t(pos.size()) == B, "attend_decode: B");
  for (int64_t b = 0; b < B; ++b) {
    check_c(kc[b], "k cache");
    check_c(vc[b], "v cache");
    TORCH_CHECK(kc[b].scalar_type() == q.scalar_type() && pos[b] >= 0 && pos[b] < kc[b].size(1),
                "attend_decode: cache dtype or position out of range");
  }
  auto out = at::empty_like(q);
  if (is_bf16(q)) attend_decode_impl<BF16T>(q, kn, vn, kc, vc, pos, scale, out);
  else attend_decode_impl<F32T>(q, kn, vn, kc, vc, pos, scale, out);
  return out;
}

// q [B, Hq, Dh], k_new / v_new [B, Hkv, Dh]; kp / vp: pool layers [NB, Hkv, bs, Dh] (one for all or one per
// sequence); tables [B, MB] int32 block ids; pos [B] int64 (the new token's position = the cached length).
at::Tensor attend_paged_decode_2d(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& vn,
                                  std::vector<at::Tensor> kp, std::vector<at::Tensor> vp, const at::Tensor& tables,
                                  const at::Tensor& pos, double scale) {
  for (auto* t : {&q, &kn, &vn, &tables, &pos}) check_c(*t, "attend_paged_decode input");
  const int64_t B = q.size(0), Hkv = kn.size(1);
  TORCH_CHECK(kn.sizes() == vn.sizes() && kn.size(0) == B && kn.size(2) == q.size(2) && Hkv > 0 &&
                  q.size(1) % Hkv == 0, "attend_paged_decode: q [B, Hq, Dh], k / v [B, Hkv, Dh], got ", q.sizes(),
              " and ", kn.sizes());
  TORCH_CHECK(kn.scalar_type() == q.scalar_type() && vn.scalar_type() == q.scalar_type(), "attend_paged_decode: dtypes");
  TORCH_CHECK(tables.scalar_type() == at::kInt && tables.dim() == 2 && tables.size(0) == B &&
                  pos.scalar_type() == at::kLong && pos.dim() == 1 && pos.size(0) == B,
              "attend_paged_decode: tables [B, MB] int32 and pos [B] int64, got ", tables.sizes(), " and ", pos.sizes());
  TORCH_CHECK(!kp.empty() && kp.size() == vp.size() && (kp.size() == 1 || int64_t(kp.size()) == B),
              "attend_paged_decode: one pool layer for all sequences or one per sequence");
  for (size_t i = 0; i < kp.size(); ++i)
    for (auto* t : {&kp[i], &vp[i]}) {
      check_c(*t, "KV pool layer");
      TORCH_CHECK(t->dim() == 4 && t->size(1) == Hkv && t->size(3) == q.size(2) && t->sizes() == kp[i].sizes() &&
                      t->scalar_type() == q.scalar_type(), "attend_paged_decode: pool layer must be [NB, Hkv, bs, Dh] ",
                  "of q's dtype, got ", t->sizes());
    }
  const int32_t* tab = tables.data_ptr<int32_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  const int64_t MB = tables.size(1), bs = kp[0].size(2);
  for (int64_t b = 0; b < B; ++b) {  // every block the sequence reads is a block of its pool
    TORCH_CHECK(ps[b] >= 0 && ps[b] / bs < MB, "attend_paged_decode: position ", ps[b], " past the block table");
    const int64_t NB = kp[kp.size() == 1 ? 0 : b].size(0);
    for (int64_t j = 0; j <= ps[b] / bs; ++j)
      TORCH_CHECK(tab[b * MB + j] >= 0 && tab[b * MB + j] < NB, "attend_paged_decode: block id ", tab[b * MB + j],
                  " outside the pool's ", NB);
  }
  auto out = at::empty_like(q);
  if (is_bf16(q)) attend_paged_impl<BF16T>(q, kn, vn, kp, vp, tab, MB, ps, scale, out);
  else attend_paged_impl<F32T>(q, kn, vn, kp, vp, tab, MB, ps, scale, out);
  return out;
}

// Row-wise argmax of logits [B, V] (float32 or bfloat16): the first index of the maximum, a NaN wins (as
// torch.argmax); instead of a float32 copy plus torch's argmax (~0.35 ms per step at V = 151936).
template <class D>
int64_t argmax_row(const typename D::T* x, int64_t V) {
  auto at = [&](int64_t i) { return D::ld(x + i, 1)[0]; };
  vf mx = splat(-INFINITY);
  vi nan = {};
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    const vf v = D::ld(x + i, W);
    nan |= v != v;
    mx = vmax(mx, v);
  }
  float m = hmax(mx);
  bool tail_nan = false;
  for (int64_t j = i; j < V; ++j) {
    const float v = at(j);
    tail_nan |= std::isnan(v);
    m = v > m ? v : m;
  }
  if (any(nan) || tail_nan) {  // a NaN: the first one is the answer
    for (int64_t j = 0; j < V; ++j)
      if (std::isnan(at(j))) return j;
  }
  const vf mv = splat(m);
  for (i = 0; i + W <= V; i += W)
    if (any(D::ld(x + i, W) == mv))
      for (int64_t j = i;; ++j)
        if (at(j) == m) return j;
  for (; i < V; ++i)
    if (at(i) == m) return i;
  return 0;  // every logit -inf
}

std::vector<int64_t> argmax_rows(const at::Tensor& logits) {
  check_c(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "argmax_rows: logits must be [B, V]");
  const int64_t B = logits.size(0), V = logits.size(1);
  std::vector<int64_t> out(B, 0);
  for (int64_t b = 0; b < B; ++b)
    out[b] = is_bf16(logits) ? argmax_row<BF16T>((const uint16_t*)logits.data_ptr() + b * V, V)
                             : argmax_row<F32T>(logits.data_ptr<float>() + b * V, V);
  return out;
}

// Read every byte of a CPU tensor once, as the decode kernels stream weights (each thread a contiguous band,
// whole-vector loads, software prefetch), and return the sum of its bytes (as unsigned 8-bit values), so the
// reads cannot be skipped and a test can check them. The bench's bandwidth probe: a torch sum streams more
// slowly than the linear kernels do.
double stream_read(const at::Tensor& t) {
  check_c(t, "stream_read input");
  typedef uint16_t v32h __attribute__((vector_size(64)));  // one cache line as 32 byte pairs
  typedef uint32_t v16u __attribute__((vector_size(64)));
  const int64_t nbytes = t.numel() * t.element_size(), lines = nbytes / 64;
  const uint8_t* base = (const uint8_t*)t.data_ptr();
  std::vector<int64_t> part(at::get_num_threads() + 1, 0);
  at::parallel_for(0, lines, 4096, [&](int64_t b, int64_t e) {
    v16u total = {};
    for (int64_t i0 = b; i0 < e; i0 += 128) {  // 16-bit lane sums: at most 128 lines x 2 x 255 < 2^16
      v32h acc = {};
      const int64_t i1 = std::min(e, i0 + 128);
      for (int64_t i = i0; i < i1; ++i) {
        __builtin_prefetch((const char*)base + (i + 32) * 64, 0, 3);
        const v32h v = load<v32h>(base + i * 64);
        acc += (v & 0xff) + (v >> 8);
      }
      typedef uint16_t v16h __attribute__((vector_size(32)));
      v16h lo, hi;
      std::memcpy(&lo, &acc, 32);
      std::memcpy(&hi, (const char*)&acc + 32, 32);
      total += __builtin_convertvector(lo, v16u) + __builtin_convertvector(hi, v16u);
    }
    int64_t s = 0;
    for (int j = 0; j < 16; ++j) s += total[j];
    part[at::get_thread_num()] += s;
  });
  int64_t total = 0;
  for (int64_t v : part) total += v;
  for (int64_t i = lines * 64; i < nbytes; ++i) total += base[i];
  return double(total);
}

// The one-row streams' software prefetch distances in bytes (0: none, the hardware prefetcher alone): weights
// narrower than float32, and float32 weights. Set once at load (runspec.py's stream_prefetch says why the best
// distances depend on the CPU).
void set_stream_prefetch(int64_t narrow, int64_t f32) {
  for (int64_t b : {narrow, f32})
    TORCH_CHECK(b >= 0 && b <= (1 << 20), "qwen3lab stream prefetch: 0 .. 1 MiB ahead, got ", b);
  stream_pf = narrow;
  stream_pf_f32 = f32;
}

// ---- entry points: activations of any leading shape ([..., C] -> [..., N]), see rows_of ------------------------
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& Wt, const c10::optional<at::Tensor>& scale) {
  return with_lead(linear_small_2d(rows_of(x), Wt, scale), x);
}
at::Tensor linear_large(const at::Tensor& x, const at::Tensor& Wt, const c10::optional<at::Tensor>& scale,
                        int64_t band_rows) {
  return with_lead(linear_large_2d(rows_of(x), Wt, scale, band_rows), x);
}
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t group_size) {
  return with_lead(linear_q4_2d(rows_of(x), qweight, scales, group_size), x);
}
at::Tensor linear_q4_large(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           int64_t group_size, int64_t band_rows) {
  return with_lead(linear_q4_large_2d(rows_of(x), qweight, scales, group_size, band_rows), x);
}
// x [..., D]
at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return rmsnorm_2d(rows_of(x), w, eps).view(x.sizes());
}
// x [..., H, Dh], cos / sin [..., Dh] with one row per H heads of x (a token's angles)
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() >= 2, "rope: x must be [..., H, Dh], got ", x.sizes());
  const int64_t H = x.size(-2), Dh = x.size(-1);
  return rope_2d(rows_of(x, H * Dh).view({-1, H, Dh}), rows_of(cos), rows_of(sin)).view(x.sizes());
}
// q [..., Hq, Dh], k [..., Hkv, Dh] over the same M tokens, cos / sin [..., Dh] one row a token -> (q_norm,
// k_norm, q_rot, k_rot), new contiguous tensors shaped as q, k, q, k. Inputs are used in place when contiguous
// (a decode step's q / k slices are), outputs made in their final shapes: a call costs ~2 us besides its rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& wq, const at::Tensor& wk, double eps_q,
    double eps_k, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(q_in.dim() >= 2 && k_in.dim() >= 2 && q_in.size(-1) == k_in.size(-1) && q_in.size(-1) % 2 == 0,
              "qk_norm_rope: q / k must be [..., H, Dh] with one even Dh, got ", q_in.sizes(), " and ", k_in.sizes());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  for (auto* t : {&q, &k, &wq, &wk, &cos, &sin}) check_c(*t, "qk_norm_rope input");
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), Dh = q.size(-1), M = q.numel() / (Hq * Dh);
  TORCH_CHECK(k.numel() == M * Hkv * Dh && wq.dim() == 1 && wq.size(0) == Dh && wk.sizes() == wq.sizes() &&
                  cos.numel() == M * Dh && cos.size(-1) == Dh && sin.sizes() == cos.sizes(),
              "qk_norm_rope: q [..., Hq, Dh], k [..., Hkv, Dh] over the same tokens, weights [Dh], cos/sin [..., Dh] "
              "one row a token, got ", q.sizes(), ", ", k.sizes(), ", ", wq.sizes(), ", ", cos.sizes());
  for (auto* t : {&k, &wq, &wk, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "qk_norm_rope: every input in q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
  auto qn = at::empty_like(q), kn = at::empty_like(k), qr = at::empty_like(q), kr = at::empty_like(k);
  if (is_bf16(q)) qk_norm_rope_impl<BF16T>(q, k, wq, wk, eps_q, eps_k, cos, sin, M, qn, kn, qr, kr);
  else qk_norm_rope_impl<F32T>(q, k, wq, wk, eps_q, eps_k, cos, sin, M, qn, kn, qr, kr);
  return {qn, kn, qr, kr};
}
// gate_up [..., 2I] -> [..., I]
at::Tensor silu_mul(const at::Tensor& gu) { return with_lead(silu_mul_2d(rows_of(gu)), gu); }
// q [..., B, Hq, Dh], k_new / v_new [..., B, Hkv, Dh] (a leading 1 of the packed stream is fine)
at::Tensor attend_decode(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& vn, std::vector<at::Tensor> kc,
                         std::vector<at::Tensor> vc, std::vector<int64_t> pos, double scale) {
  for (auto* t : {&q, &kn, &vn}) TORCH_CHECK(t->dim() >= 3, "attend_decode: q / k / v must be [..., B, H, Dh]");
  auto heads = [](const at::Tensor& t) { return rows_of(t, t.size(-2) * t.size(-1)).view({-1, t.size(-2), t.size(-1)}); };
  return attend_decode_2d(heads(q), heads(kn), heads(vn), std::move(kc), std::move(vc), std::move(pos), scale)
      .view(q.sizes());
}

// q [..., B, Hq, Dh], k_new / v_new [..., B, Hkv, Dh] as attend_decode; the caches are paged (see above)
at::Tensor attend_paged_decode(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& vn, std::vector<at::Tensor> kp,
                               std::vector<at::Tensor> vp, const at::Tensor& tables, const at::Tensor& pos, double scale) {
  for (auto* t : {&q, &kn, &vn}) TORCH_CHECK(t->dim() >= 3, "attend_paged_decode: q / k / v must be [..., B, H, Dh]");
  auto heads = [](const at::Tensor& t) { return rows_of(t, t.size(-2) * t.size(-1)).view({-1, t.size(-2), t.size(-1)}); };
  return attend_paged_decode_2d(heads(q), heads(kn), heads(vn), std::move(kp), std::move(vp), tables, pos, scale)
      .view(q.sizes());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("PATH") = QWEN3LAB_PATH;  // which build of this source: avx512, avx2 or portable
  m.attr("WIDTH") = W;             // floats per vector
#if defined(__AVX512BF16__)
  m.attr("BF16_DOT") = true;  // bf16 linears by vdpbf16ps (Bf16Dot), not by widening
#else
  m.attr("BF16_DOT") = false;
#endif
  m.def("set_stream_prefetch", &set_stream_prefetch,
        "one-row streams' software prefetch distances (bytes): weights narrower than float32, float32 weights");
  m.def("stream_prefetch", [] { return std::make_tuple(stream_pf, stream_pf_f32); },
        "the one-row streams' software prefetch distances (bytes): (narrower than float32, float32)");
  m.def("stream_read", &stream_read, "read a tensor's bytes once (bandwidth probe)");
  m.def("argmax_rows", &argmax_rows, "first argmax of each row (NaN wins), as a list");
  m.def("rmsnorm", &rmsnorm, "RMSNorm(x) * w over rows");
  m.def("rope", &rope, "RoPE over [M, H, Dh] rows with per-token cos/sin [M, Dh]");
  m.def("qk_norm_rope", &qk_norm_rope, "q / k per-head RMSNorm then RoPE: [q_norm, k_norm, q_rot, k_rot]");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from a fused gate_up row");
  m.def("attend_decode", &attend_decode, "single-query attention over per-sequence KV caches (writes the new k/v)");
  m.def("attend_paged_decode", &attend_paged_decode,
        "single-query attention over a paged KV pool through block tables (writes the new k/v)");
  m.def("linear_small", &linear_small, "y = x @ W.T, small M (decode)");
  m.def("linear_large", &linear_large, "y = x @ W.T, large M (prefill): W widened in bands, sgemm");
  m.def("linear_q4", &linear_q4, "y = x @ W'.T, packed int4 W with group scales, small M (decode)");
  m.def("linear_q4_large", &linear_q4_large, "y = x @ W'.T, packed int4 W, large M: dequantised bands, sgemm");
}
