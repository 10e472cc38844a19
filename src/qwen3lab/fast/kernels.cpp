// qwen3lab fast CPU kernels: weight-streaming linear layers for decode (AVX-512F), built at first use by
// qwen3lab/fast/build.py through torch.utils.cpp_extension (a pure-PyTorch fallback runs when it cannot build).
//
// y[m, n] = sum_k x[m, k] * W[n, k] (* scale[n] for int8), W row-major [N, K] as checkpoints store it.
// - Small M (decode, a few sequences): each thread streams a contiguous band of W rows, 4 rows at a time,
//   against up to 4 input rows held in fp32; bf16 weights are widened to fp32 by integer shifts (exact) and
//   multiplied with FMA, fp32 accumulation throughout, one rounding to the output dtype at the end.
//   (vdpbf16ps was measured slower than shift+FMA on this kind of machine when its inputs come from memory.)
// - Large M (prefill): W is widened to fp32 a band of rows at a time (cache-resident) and handed to the BLAS
//   sgemm, which reaches far more of the FMA peak than the bf16 GEMM paths available here.
// - Fused decode ops (no taps: the model only calls them when no tap session is active): RMSNorm with the
//   residual add, per-head q/k RMSNorm + RoPE, SiLU(gate) * up, and single-query attention that writes the new
//   key/value into each sequence's cache and attends over it. Each rounds to the model dtype exactly where the
//   eager PyTorch ops do (bf16 after the norm, after the weight, after each RoPE product), so the fast path
//   tracks the eager one to float32 summation order (~1e-6 relative) and to bf16 rounding order in bfloat16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int MAXR = 8;  // weight rows per block: 8 when streaming for one or two input rows, else 4
constexpr int MB = 4;    // input rows per block: up to R x MB = 16 accumulators in registers
// Software prefetch in each weight row: T0 a few lines ahead, and T1 (into L2) the same offset of the next
// block's rows. The FMA work between loads otherwise limits the misses in flight: streaming bf16 weights on
// 2 cores went from ~21 GB/s (none) and ~26.7 (T0 only) to ~29.5 GB/s, the speed of a plain sum (measured).
#ifndef QWEN3LAB_PF
#define QWEN3LAB_PF 512
#endif
constexpr int PF_BYTES = QWEN3LAB_PF;

template <int NR>
inline void prefetch_rows(const void* base, int64_t row_bytes) {
  for (int r = 0; r < NR; ++r) {
    _mm_prefetch((const char*)base + r * row_bytes + PF_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char*)base + (r + NR) * row_bytes, _MM_HINT_T1);
  }
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float bf(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Four horizontal sums at once: lane i of the result = sum of all 16 floats of v[i].
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), t));
}

// ---- per-dtype inner loops: acc[r][m] += W[r, chunk] . x[m, chunk] -------------------------------------
// x rows are fp32, zero-padded to a multiple of the chunk. bf16 x rows are "split": each 32-wide chunk holds
// the 16 even elements then the 16 odd ones, matching how a 32 x bf16 weight vector widens in place.
// Each weight type gives its chunk width CH, its prefetch and one `step` over a chunk; TAIL (the last,
// partial chunk of n < CH columns) loads under a mask, the full chunks without one.
template <int CH, bool TAIL>
inline auto chunk_mask(int64_t n) {
  if constexpr (CH == 32) return TAIL ? (__mmask32)((1ull << n) - 1) : (__mmask32)0xffffffffu;
  else return TAIL ? (__mmask16)((1u << n) - 1) : (__mmask16)0xffff;
}

struct Bf16W {
  static constexpr int CH = 32;
  template <int NR>
  static inline void prefetch(const uint16_t* W, int64_t K, int64_t k) { prefetch_rows<NR>(W + k, K * 2); }
  template <int NR, int NM, bool TAIL>
  static inline void step(const uint16_t* W, int64_t K, int64_t k, int64_t n, const float* x, int64_t ldx,
                          __m512 (&acc)[MAXR][MB]) {
    const __m512i hi = _mm512_set1_epi32(int32_t(0xffff0000u));
    __m512 we[NR], wo[NR];
    for (int r = 0; r < NR; ++r) {
      const __m512i w = TAIL ? _mm512_maskz_loadu_epi16(chunk_mask<CH, TAIL>(n), W + r * K + k)
                             : _mm512_loadu_si512((const void*)(W + r * K + k));
      we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      wo[r] = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
    }
    for (int m = 0; m < NM; ++m) {
      __m512 xe = _mm512_loadu_ps(x + m * ldx + k), xo = _mm512_loadu_ps(x + m * ldx + k + 16);
      for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(wo[r], xo, _mm512_fmadd_ps(we[r], xe, acc[r][m]));
    }
  }
};

// float32 and int8 weights: 16 per chunk, widened to float32 by Wd::ld, one FMA per input row.
template <class Wd, int NR, int NM, bool TAIL, class WT>
inline void fma16_step(const WT* W, int64_t K, int64_t k, int64_t n, const float* x, int64_t ldx,
                       __m512 (&acc)[MAXR][MB]) {
  __m512 w[NR];
  for (int r = 0; r < NR; ++r) w[r] = Wd::template ld<TAIL>(W + r * K + k, chunk_mask<16, TAIL>(n));
  for (int m = 0; m < NM; ++m) {
    __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
    for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(w[r], xv, acc[r][m]);
  }
}

struct F32W {
  static constexpr int CH = 16;
  template <bool TAIL>
  static inline __m512 ld(const float* p, __mmask16 mk) {
    return TAIL ? _mm512_maskz_loadu_ps(mk, p) : _mm512_loadu_ps(p);
  }
  template <int NR>
  static inline void prefetch(const float* W, int64_t K, int64_t k) { prefetch_rows<NR>(W + k, K * 4); }
  template <int NR, int NM, bool TAIL>
  static inline void step(const float* W, int64_t K, int64_t k, int64_t n, const float* x, int64_t ldx,
                          __m512 (&acc)[MAXR][MB]) {
    fma16_step<F32W, NR, NM, TAIL>(W, K, k, n, x, ldx, acc);
  }
};

struct I8W {
  static constexpr int CH = 16;
  template <bool TAIL>
  static inline __m512 ld(const int8_t* p, __mmask16 mk) {
    const __m128i b = TAIL ? _mm_maskz_loadu_epi8(mk, p) : _mm_loadu_si128((const __m128i*)p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  template <int NR>
  static inline void prefetch(const int8_t* W, int64_t K, int64_t k) {
    if ((k & 63) == 0) prefetch_rows<NR>(W + k, K);  // one cache line is four 16-wide chunks
  }
  template <int NR, int NM, bool TAIL>
  static inline void step(const int8_t* W, int64_t K, int64_t k, int64_t n, const float* x, int64_t ldx,
                          __m512 (&acc)[MAXR][MB]) {
    fma16_step<I8W, NR, NM, TAIL>(W, K, k, n, x, ldx, acc);
  }
};

// The loop all weight types share: full chunks (each with the type's prefetch), then the masked tail.
template <class Kern, int NR, int NM, class WT>
inline void stream_rows(const WT* W, int64_t K, const float* x, int64_t ldx, __m512 (&acc)[MAXR][MB]) {
  int64_t k = 0;
  for (; k + Kern::CH <= K; k += Kern::CH) {
    Kern::template prefetch<NR>(W, K, k);
    Kern::template step<NR, NM, false>(W, K, k, 0, x, ldx, acc);
  }
  if (k < K) Kern::template step<NR, NM, true>(W, K, k, K - k, x, ldx, acc);
}

// One block of NR weight rows x NM input rows: sums (times scale) written to y (fp32 or bf16, row stride N).
template <class Kern, int NR, int NM, class WT, class OT>
inline void run_block(const WT* W, int64_t K, const float* x, int64_t ldx, const float* scale, OT* y, int64_t N) {
  __m512 acc[MAXR][MB];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < NM; ++m) acc[r][m] = _mm512_setzero_ps();
  stream_rows<Kern, NR, NM>(W, K, x, ldx, acc);
  for (int m = 0; m < NM; ++m) {
    float s[MAXR];
    if (NR % 4 == 0) {
      for (int r = 0; r < NR; r += 4) _mm_storeu_ps(s + r, hsum4(acc[r][m], acc[r + 1][m], acc[r + 2][m], acc[r + 3][m]));
    } else {
      for (int r = 0; r < NR; ++r) s[r] = _mm512_reduce_add_ps(acc[r][m]);
    }
    for (int r = 0; r < NR; ++r) {
      float v = scale ? s[r] * scale[r] : s[r];
      if constexpr (std::is_same<OT, float>::value) y[m * N + r] = v;
      else y[m * N + r] = f32_to_bf16(v);
    }
  }
}

// All M input rows against NR weight rows, MB (or fewer) input rows at a time.
template <class Kern, int NR, class WT, class OT>
inline void rows_all_m(const WT* W, int64_t K, const float* x, int64_t ldx, int64_t M, const float* scale, OT* y,
                       int64_t N) {
  constexpr int mb = NR > 4 ? 2 : 4;
  int64_t m = 0;
  for (; m + mb <= M; m += mb) run_block<Kern, NR, mb>(W, K, x + m * ldx, ldx, scale, y + m * N, N);
  switch (M - m) {
    case 1: run_block<Kern, NR, 1>(W, K, x + m * ldx, ldx, scale, y + m * N, N); break;
    case 2: run_block<Kern, NR, (mb > 2 ? 2 : 1)>(W, K, x + m * ldx, ldx, scale, y + m * N, N); break;
    case 3: run_block<Kern, NR, (mb > 3 ? 3 : 1)>(W, K, x + m * ldx, ldx, scale, y + m * N, N); break;
    default: break;
  }
}

// A zero-filled scratch buffer of n elements starting on a 64-byte boundary, in `v` (grown, never shrunk).
// Alignment matters: a 512-bit load that straddles two cache lines costs two, and the linear kernels load
// an input vector per FMA group: the same loop ran ~100 vs ~148 GFLOP/s per core unaligned vs aligned.
template <class T>
T* aligned_zeros(std::vector<T>& v, int64_t n) {
  v.resize(n + 64 / sizeof(T));
  T* p = (T*)(((uintptr_t)v.data() + 63) & ~uintptr_t(63));
  std::fill(p, p + n, T(0));
  return p;
}

// x [M, K] -> fp32 rows of ldx floats (zero-padded) in a per-thread buffer reused across calls (no allocation
// per step); bf16 rows are split even/odd per 32-chunk.
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
  const uint16_t* s = (const uint16_t*)x.data_ptr();
  if (split) {  // the weights' widening applied to x: 16 even elements then 16 odd ones per 32-chunk
    const __m512i hi = _mm512_set1_epi32(int32_t(0xffff0000u));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mk = k + 32 <= K ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
        const __m512i w = _mm512_maskz_loadu_epi16(mk, s + m * K + k);
        _mm512_storeu_ps(o + m * ldx + k, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        _mm512_storeu_ps(o + m * ldx + k + 16, _mm512_castsi512_ps(_mm512_and_si512(w, hi)));
      }
    return o;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) o[m * ldx + k] = bf(s[m * K + k]);
  return o;
}

template <class Kern, int RR, class WT, class OT>
void small_m_r(const WT* W, int64_t N, int64_t K, const float* x, int64_t ldx, int64_t M, const float* scale, OT* y) {
  const int64_t nblk = N / RR;
  // each thread a contiguous band of rows: one forward stream of weights per thread
  at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      rows_all_m<Kern, RR>(W + i * RR * K, K, x, ldx, M, scale ? scale + i * RR : nullptr, y + i * RR, N);
  });
  for (int64_t n = nblk * RR; n < N; ++n)
    rows_all_m<Kern, 1>(W + n * K, K, x, ldx, M, scale ? scale + n : nullptr, y + n, N);
}

template <class Kern, class WT, class OT>
void small_m(const WT* W, int64_t N, int64_t K, const float* x, int64_t ldx, int64_t M, const float* scale, OT* y) {
  if (M <= 2) small_m_r<Kern, 8>(W, N, K, x, ldx, M, scale, y);
  else small_m_r<Kern, 4>(W, N, K, x, ldx, M, scale, y);
}

#ifdef __AVX512VNNI__
// int8 weights with AVX512-VNNI: each input row is quantised to int16 (x = x16 * sx, sx = max|x| / 32767, so
// a relative error <= 1.5e-5 of the row's largest element, far below bf16's 4e-3), and vpdpwssd multiplies
// int8 (sign-extended to int16) by int16 pairs into exact int32 sums: 2 instructions per 32 weights instead of
// 6 for widening to float32 + FMA, which is what kept int8 streaming below the bf16 kernel's bytes/s.
// Sums are exact within a segment of SEG columns (|sum| per lane <= SEG/32 * 2 * 127 * 32767 < 2^31) and
// added up in float32 across segments.
constexpr int64_t SEG = 2048;

template <int NR, int NM, class OT>
inline void i8_vnni_block(const int8_t* W, int64_t K, const int16_t* x, int64_t ldx, const float* xs,
                          const float* ws, OT* y, int64_t N) {
  float part[MAXR][MB] = {};
  for (int64_t k0 = 0; k0 < K; k0 += SEG) {
    const int64_t k1 = std::min(K, k0 + SEG);
    __m512i acc[MAXR][MB];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < NM; ++m) acc[r][m] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 32) {
      if ((k & 63) == 0) prefetch_rows<NR>(W + k, K);
      const __mmask32 mk = k + 32 <= K ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
      __m512i w[NR];
      for (int r = 0; r < NR; ++r) w[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, W + r * K + k));
      for (int m = 0; m < NM; ++m) {
        const __m512i xv = _mm512_loadu_si512((const void*)(x + m * ldx + k));  // zero-padded past K
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], w[r], xv);
      }
    }
    for (int m = 0; m < NM; ++m) {
      float sm[MAXR];
      if (NR % 4 == 0) {
        for (int r = 0; r < NR; r += 4)
          _mm_storeu_ps(sm + r, hsum4(_mm512_cvtepi32_ps(acc[r][m]), _mm512_cvtepi32_ps(acc[r + 1][m]),
                                      _mm512_cvtepi32_ps(acc[r + 2][m]), _mm512_cvtepi32_ps(acc[r + 3][m])));
      } else {
        for (int r = 0; r < NR; ++r) sm[r] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[r][m]));
      }
      for (int r = 0; r < NR; ++r) part[r][m] += sm[r];
    }
  }
  for (int m = 0; m < NM; ++m)
    for (int r = 0; r < NR; ++r) {
      const float v = part[r][m] * xs[m] * ws[r];
      if constexpr (std::is_same<OT, float>::value) y[m * N + r] = v;
      else y[m * N + r] = f32_to_bf16(v);
    }
}

template <int NR, class OT>
inline void i8_vnni_rows(const int8_t* W, int64_t K, const int16_t* x, int64_t ldx, const float* xs, int64_t M,
                         const float* ws, OT* y, int64_t N) {
  constexpr int mb = NR > 4 ? 2 : 4;
  int64_t m = 0;
  for (; m + mb <= M; m += mb) i8_vnni_block<NR, mb>(W, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N);
  switch (M - m) {
    case 1: i8_vnni_block<NR, 1>(W, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N); break;
    case 2: i8_vnni_block<NR, (mb > 2 ? 2 : 1)>(W, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N); break;
    case 3: i8_vnni_block<NR, (mb > 3 ? 3 : 1)>(W, K, x + m * ldx, ldx, xs + m, ws, y + m * N, N); break;
    default: break;
  }
}

template <int RR, class OT>
void i8_vnni_r(const int8_t* W, int64_t N, int64_t K, const int16_t* x, int64_t ldx, const float* xs, int64_t M,
               const float* ws, OT* y) {
  const int64_t nblk = N / RR;
  at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) i8_vnni_rows<RR>(W + i * RR * K, K, x, ldx, xs, M, ws + i * RR, y + i * RR, N);
  });
  for (int64_t n = nblk * RR; n < N; ++n) i8_vnni_rows<1>(W + n * K, K, x, ldx, xs, M, ws + n, y + n, N);
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
  auto ld = [&](int64_t i, __mmask16 k) {  // 16 elements of x from flat index i, as float32
    return b16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, xh + i)), 16))
               : _mm512_maskz_loadu_ps(k, xf + i);
  };
  const __m512 lim = _mm512_set1_ps(32767.f);
  for (int64_t m = 0; m < M; ++m) {
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = k + 16 <= K ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
      const __m512 a = _mm512_abs_ps(ld(m * K + k, mk));
      bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or NaN
      mx = _mm512_max_ps(mx, a);
    }
    if (bad) return false;
    const float amax = _mm512_reduce_max_ps(mx);
    const float sx = amax > 0.f ? amax / 32767.f : 1.f;
    scales[m] = sx;
    const __m512 inv = _mm512_set1_ps(1.f / sx);
    for (int64_t k = 0; k < K; k += 16) {  // round to nearest even (as nearbyint), within +-32767
      const __mmask16 mk = k + 16 <= K ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
      const __m512 v = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim),
                                     _mm512_min_ps(lim, _mm512_mul_ps(ld(m * K + k, mk), inv)));
      _mm256_mask_storeu_epi16(xb + m * ldx + k, mk, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
    }
  }
  xq = xb;
  xs = scales.data();
  return true;
}

// false: x holds inf/NaN (nothing written); the caller's float path then propagates them.
template <class OT>
bool i8_vnni(const at::Tensor& x, const int8_t* W, int64_t N, int64_t K, const float* ws, OT* y) {
  const int64_t M = x.size(0), ldx = (K + 31) / 32 * 32;
  const int16_t* xp;
  const float* xs;
  if (!prep_x16(x, ldx, xp, xs)) return false;
  if (M <= 2) i8_vnni_r<8>(W, N, K, xp, ldx, xs, M, ws, y);
  else i8_vnni_r<4>(W, N, K, xp, ldx, xs, M, ws, y);
  return true;
}
#endif

void check_2d(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), "qwen3lab fast linear: ", what,
              " must be a contiguous 2-d CPU tensor, got sizes ", t.sizes(), " strides ", t.strides());
}

}  // namespace

// y = x @ W.T for small M; W bfloat16 or float32 (same dtype as x) or int8 with per-row fp32 scales.
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& scale) {
  check_2d(x, "x");
  check_2d(W, "W");
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0);
  TORCH_CHECK(W.size(1) == K, "qwen3lab fast linear: x has ", K, " columns, W has ", W.size(1));
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* sp = nullptr;
  if (W.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat && scale->numel() == N &&
                    scale->is_contiguous(), "qwen3lab fast linear: int8 W needs a contiguous float32 scale [N]");
    sp = scale->data_ptr<float>();
  } else {
    TORCH_CHECK(W.scalar_type() == x.scalar_type(), "qwen3lab fast linear: W dtype ", W.scalar_type(),
                " differs from x dtype ", x.scalar_type());
  }
  const bool bf16w = W.scalar_type() == at::kBFloat16;
  const int64_t ch = bf16w ? 32 : 16;
  const int64_t ldx = (K + ch - 1) / ch * ch;
  const bool out_bf16 = x.scalar_type() == at::kBFloat16;
  uint16_t* yb = out_bf16 ? (uint16_t*)y.data_ptr() : nullptr;
  float* yf = out_bf16 ? nullptr : y.data_ptr<float>();
  switch (W.scalar_type()) {
    case at::kBFloat16:
      small_m<Bf16W>((const uint16_t*)W.data_ptr(), N, K, prep_x(x, true, ldx), ldx, M, sp, yb);
      break;
    case at::kFloat:
      small_m<F32W>(W.data_ptr<float>(), N, K, prep_x(x, false, ldx), ldx, M, sp, yf);
      break;
    case at::kChar: {
#ifdef __AVX512VNNI__
      if (out_bf16 ? i8_vnni(x, W.data_ptr<int8_t>(), N, K, sp, yb) : i8_vnni(x, W.data_ptr<int8_t>(), N, K, sp, yf))
        break;
#endif
      const float* xp = prep_x(x, false, ldx);
      if (out_bf16) small_m<I8W>(W.data_ptr<int8_t>(), N, K, xp, ldx, M, sp, yb);
      else small_m<I8W>(W.data_ptr<int8_t>(), N, K, xp, ldx, M, sp, yf);
      break;
    }
    default:
      TORCH_CHECK(false, "qwen3lab fast linear: unsupported weight dtype ", W.scalar_type());
  }
  return y;
}

// W rows [n0, n0 + nc) widened to fp32 (times scale for int8) into out [nc, K].
void widen_rows(const at::Tensor& W, const c10::optional<at::Tensor>& scale, int64_t n0, int64_t nc, float* out) {
  const int64_t K = W.size(1);
  at::parallel_for(n0, n0 + nc, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      float* o = out + (n - n0) * K;
      if (W.scalar_type() == at::kBFloat16) {
        const uint16_t* w = (const uint16_t*)W.data_ptr() + n * K;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
          _mm512_storeu_ps(o + k, _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + k))), 16)));
        for (; k < K; ++k) {
          uint32_t u = uint32_t(w[k]) << 16;
          std::memcpy(o + k, &u, 4);
        }
      } else {
        const int8_t* w = W.data_ptr<int8_t>() + n * K;
        const float s = scale->data_ptr<float>()[n];
        for (int64_t k = 0; k < K; ++k) o[k] = float(w[k]) * s;
      }
    }
  });
}

// y = x @ W.T for large M: W (bf16, or int8 with scales) widened a band of rows at a time, BLAS sgemm.
at::Tensor linear_large(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& scale,
                        int64_t band_rows) {
  check_2d(x, "x");
  check_2d(W, "W");
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0);
  TORCH_CHECK(W.size(1) == K, "qwen3lab fast linear: x has ", K, " columns, W has ", W.size(1));
  TORCH_CHECK(W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kChar,
              "qwen3lab fast linear (large): W must be bfloat16 or int8");
  if (W.scalar_type() == at::kChar)
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat && scale->numel() == N,
                "qwen3lab fast linear: int8 W needs a float32 scale [N]");
  auto x32 = x.to(at::kFloat).contiguous();
  auto y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int64_t nb = std::max<int64_t>(16, std::min<int64_t>(band_rows, N));
  auto band = at::empty({nb, K}, x.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nc = std::min(nb, N - n0);
    widen_rows(W, scale, n0, nc, band.data_ptr<float>());
    auto out = y32.narrow(1, n0, nc);
    at::mm_out(out, x32, band.narrow(0, 0, nc).t());
  }
  return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}

// ---- fused elementwise ops ---------------------------------------------------------------------------------
namespace {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

// 16 floats in the model dtype <-> fp32 vectors, masked (tails); rnd() = what storing and reloading gives.
struct F32T {
  using T = float;
  static inline __m512 ld(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
  static inline void st(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
  static inline __m512 rnd(__m512 v) { return v; }
};
struct BF16T {
  using T = uint16_t;
  static inline __m512 ld(const uint16_t* p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
  }
  static inline __m512i bits(__m512 v) {  // round to nearest even, upper 16 bits kept (NaN stays NaN)
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  }
  static inline void st(uint16_t* p, __m512 v, __mmask16 k) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits(v), 16)));
  }
  static inline __m512 rnd(__m512 v) {
    return _mm512_castsi512_ps(_mm512_and_si512(bits(v), _mm512_set1_epi32(int32_t(0xffff0000u))));
  }
};

// exp(x) for x <= 0 and moderate x (SiLU), float32 accuracy (range reduction + degree-6 polynomial + scalef).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-103.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <class D>
inline float sum_squares(const typename D::T* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = D::ld(x + i, tail_mask(n - i));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y = w * dtype(x * rsqrt(mean(x^2) + eps)) over one row, as RMSNorm.forward does it.
template <class D>
inline void rms_row(const typename D::T* x, const typename D::T* w, typename D::T* y, int64_t n, float eps) {
  const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(sum_squares<D>(x, n) / float(n) + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    D::st(y + i, _mm512_mul_ps(D::ld(w + i, k), D::rnd(_mm512_mul_ps(D::ld(x + i, k), r))), k);
  }
}

template <class D>
void add_rmsnorm_impl(at::Tensor& x, const c10::optional<at::Tensor>& r, const at::Tensor& w, at::Tensor& y,
                      double eps) {
  using T = typename D::T;
  const int64_t M = x.size(0), n = x.size(1);
  T* xp = (T*)x.data_ptr();
  const T* rp = r.has_value() ? (const T*)r->data_ptr() : nullptr;
  const T* wp = (const T*)w.data_ptr();
  T* yp = (T*)y.data_ptr();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      T* xr = xp + m * n;
      if (rp)  // the residual add, rounded to the dtype as `x + a` is
        for (int64_t i = 0; i < n; i += 16) {
          const __mmask16 k = tail_mask(n - i);
          D::st(xr + i, _mm512_add_ps(D::ld(xr + i, k), D::ld(rp + m * n + i, k)), k);
        }
      rms_row<D>(xr, wp, yp + m * n, n, float(eps));
    }
  });
}

template <class D>
void qk_norm_rope_impl(const at::Tensor& qkv, const at::Tensor& qw, const at::Tensor& kw, const at::Tensor& cos,
                       const at::Tensor& sin, int64_t Hq, int64_t Hkv, double eps, at::Tensor& q, at::Tensor& k,
                       at::Tensor& v) {
  using T = typename D::T;
  const int64_t M = qkv.size(0), Dh = qw.size(0), half = Dh / 2, W = qkv.size(1);
  const T* src = (const T*)qkv.data_ptr();
  const T* qwp = (const T*)qw.data_ptr();
  const T* kwp = (const T*)kw.data_ptr();
  const T* cp = (const T*)cos.data_ptr();
  const T* sp = (const T*)sin.data_ptr();
  T* qp = (T*)q.data_ptr();
  T* kp = (T*)k.data_ptr();
  T* vp = (T*)v.data_ptr();
  const int64_t H = Hq + Hkv;  // heads that get norm + RoPE
  at::parallel_for(0, M * H, 64, [&](int64_t b, int64_t e) {
    std::vector<float> t(Dh + 16), rot(Dh + 16);
    for (int64_t i = b; i < e; ++i) {
      const int64_t m = i / H, h = i % H;
      const bool isq = h < Hq;
      const T* x = src + m * W + h * Dh;  // q heads then k heads, back to back in the fused row
      const T* w = isq ? qwp : kwp;
      T* out = isq ? qp + (m * Hq + h) * Dh : kp + (m * Hkv + (h - Hq)) * Dh;
      const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(sum_squares<D>(x, Dh) / float(Dh) + float(eps)));
      for (int64_t j = 0; j < Dh; j += 16) {  // t = dtype(w * dtype(x * r))
        const __mmask16 kk = tail_mask(Dh - j);
        _mm512_mask_storeu_ps(t.data() + j, kk,
                              D::rnd(_mm512_mul_ps(D::ld(w + j, kk), D::rnd(_mm512_mul_ps(D::ld(x + j, kk), r)))));
      }
      for (int64_t j = 0; j < half; ++j) {  // rotate_half: [-t2, t1]
        rot[j] = -t[j + half];
        rot[j + half] = t[j];
      }
      const T* c = cp + m * Dh;
      const T* s = sp + m * Dh;
      for (int64_t j = 0; j < Dh; j += 16) {  // t * cos + rot * sin, each product rounded to the dtype
        const __mmask16 kk = tail_mask(Dh - j);
        __m512 a = D::rnd(_mm512_mul_ps(_mm512_maskz_loadu_ps(kk, t.data() + j), D::ld(c + j, kk)));
        __m512 bb = D::rnd(_mm512_mul_ps(_mm512_maskz_loadu_ps(kk, rot.data() + j), D::ld(s + j, kk)));
        D::st(out + j, _mm512_add_ps(a, bb), kk);
      }
    }
  });
  const int64_t vo = (Hq + Hkv) * Dh, vn = Hkv * Dh;
  for (int64_t m = 0; m < M; ++m) std::memcpy(vp + m * vn, src + m * W + vo, vn * sizeof(T));
}

template <class D>
void silu_mul_impl(const at::Tensor& gu, at::Tensor& out) {
  using T = typename D::T;
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  const T* g = (const T*)gu.data_ptr();
  T* o = (T*)out.data_ptr();
  const int64_t chunks = (I + 15) / 16;
  at::parallel_for(0, M * chunks, 256, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t m = c / chunks, i = (c % chunks) * 16;
      const __mmask16 k = tail_mask(I - i);
      const __m512 a = D::ld(g + m * 2 * I + i, k);
      const __m512 sl = D::rnd(_mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), a)))));
      D::st(o + m * I + i, _mm512_mul_ps(sl, D::ld(g + m * 2 * I + I + i, k)), k);
    }
  });
}

// scores[r, s] = q[r] . K[s] for 4 keys at a time and NR heads (q rows float32, already scaled), Dh = 16 * NCH.
template <class D, int NCH, int NR>
inline void qk_rows(const typename D::T* K, int64_t S, const float* q, float* sc, int64_t lds) {
  constexpr int64_t Dh = 16 * NCH;
  __m512 qv[NR][NCH];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NCH; ++c) qv[r][c] = _mm512_loadu_ps(q + r * Dh + c * 16);
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    for (int l = 0; l < 4 * NCH / 2; ++l) _mm_prefetch((const char*)(K + (s + 16) * Dh) + 64 * l, _MM_HINT_T0);
    __m512 acc[4][NR];
    for (int j = 0; j < 4; ++j)
      for (int r = 0; r < NR; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int c = 0; c < NCH; ++c)
      for (int j = 0; j < 4; ++j) {
        const __m512 kv = D::ld(K + (s + j) * Dh + c * 16, 0xffff);
        for (int r = 0; r < NR; ++r) acc[j][r] = _mm512_fmadd_ps(qv[r][c], kv, acc[j][r]);
      }
    for (int r = 0; r < NR; ++r) _mm_storeu_ps(sc + r * lds + s, hsum4(acc[0][r], acc[1][r], acc[2][r], acc[3][r]));
  }
  for (; s < S; ++s)
    for (int r = 0; r < NR; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < NCH; ++c) acc = _mm512_fmadd_ps(qv[r][c], D::ld(K + s * Dh + c * 16, 0xffff), acc);
      sc[r * lds + s] = _mm512_reduce_add_ps(acc);
    }
}

// out[r, :] = sum_s p[r, s] * V[s, :] for NR heads, Dh = 16 * NCH: one sequential pass over V with every
// accumulator in registers (NR * NCH <= 16), summed over s in order (the same float32 sums as pv_generic).
template <class D, int NCH, int NR>
inline void pv_rows(const typename D::T* V, int64_t S, const float* p, int64_t ldp, typename D::T* o) {
  constexpr int64_t Dh = 16 * NCH;
  __m512 a[NR][NCH];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NCH; ++c) a[r][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    for (int l = 0; l < NCH / 2; ++l) _mm_prefetch((const char*)(V + (s + 16) * Dh) + 64 * l, _MM_HINT_T0);
    __m512 vv[NCH];
    for (int c = 0; c < NCH; ++c) vv[c] = D::ld(V + s * Dh + c * 16, 0xffff);
    for (int r = 0; r < NR; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * ldp + s]);
      for (int c = 0; c < NCH; ++c) a[r][c] = _mm512_fmadd_ps(pr, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NCH; ++c) D::st(o + r * Dh + c * 16, a[r][c], 0xffff);
}

template <class D, int NCH, int RB>
inline void pv_heads(const typename D::T* V, int64_t S, const float* p, int64_t R, typename D::T* o) {
  constexpr int64_t Dh = 16 * NCH;
  int64_t r = 0;
  for (; r + RB <= R; r += RB) pv_rows<D, NCH, RB>(V, S, p + r * S, S, o + r * Dh);
  for (; r < R; ++r) pv_rows<D, NCH, 1>(V, S, p + r * S, S, o + r * Dh);
}

// The register-blocked pass for the usual head sizes (Qwen3: 128); false for others.
template <class D>
inline bool pv_fast(const typename D::T* V, int64_t S, int64_t Dh, const float* p, int64_t R, typename D::T* o) {
  if (Dh == 128) pv_heads<D, 8, 2>(V, S, p, R, o);
  else if (Dh == 64) pv_heads<D, 4, 4>(V, S, p, R, o);
  else return false;
  return true;
}

// Any head size: chunk by chunk of 16 columns, up to 8 heads' accumulators at a time (V re-read per chunk).
template <class D>
inline void pv_generic(const typename D::T* V, int64_t S, int64_t Dh, const float* p, int64_t R, typename D::T* o) {
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const int64_t nr = std::min<int64_t>(8, R - r0);
    for (int64_t j = 0; j < Dh; j += 16) {
      const __mmask16 k = tail_mask(Dh - j);
      __m512 a[8];
      for (int64_t r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        const __m512 vv = D::ld(V + s * Dh + j, k);
        for (int64_t r = 0; r < nr; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[(r0 + r) * S + s]), vv, a[r]);
      }
      for (int64_t r = 0; r < nr; ++r) D::st(o + (r0 + r) * Dh + j, a[r], k);
    }
  }
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
  constexpr bool b16 = std::is_same<T, uint16_t>::value;
  const int64_t ch = b16 ? 32 : 16, ldq = (Dh + ch - 1) / ch * ch;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> qf, sc;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv, S = pos[b] + 1, cap = kc[b].size(1);
      const T* K = (const T*)kc[b].data_ptr() + g * cap * Dh;
      const T* V = (const T*)vc[b].data_ptr() + g * cap * Dh;
      sc.resize(R * S);
      if (Dh == 128) {  // the usual head size: a register-blocked pass over K (q rows float32, unsplit)
        qf.resize(R * Dh);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < Dh; ++j)
            qf[r * Dh + j] = float(scale) * (b16 ? bf(((const uint16_t*)qp)[(b * Hq + g * R + r) * Dh + j])
                                                 : ((const float*)qp)[(b * Hq + g * R + r) * Dh + j]);
        int64_t r = 0;
        for (; r + 2 <= R; r += 2) qk_rows<D, 8, 2>(K, S, qf.data() + r * Dh, sc.data() + r * S, S);
        for (; r < R; ++r) qk_rows<D, 8, 1>(K, S, qf.data() + r * Dh, sc.data() + r * S, S);
      } else {
      // this group's R query heads as fp32 rows in the linear kernels' layout (bf16: even/odd split)
      qf.assign(R * ldq, 0.f);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < Dh; ++j) {
          const float v = b16 ? bf(((const uint16_t*)qp)[(b * Hq + g * R + r) * Dh + j])
                              : ((const float*)qp)[(b * Hq + g * R + r) * Dh + j];
          qf[r * ldq + (b16 ? (j / 32) * 32 + ((j % 32) & 1) * 16 + (j % 32) / 2 : j)] = v * float(scale);
        }
      // scores [R, S] = (q * scale) @ K.T: the key rows are weight rows of the small-M linear kernel
      using Kern = typename std::conditional<b16, Bf16W, F32W>::type;
      int64_t s = 0;
      for (; s + 4 <= S; s += 4) rows_all_m<Kern, 4>(K + s * Dh, Dh, qf.data(), ldq, R, nullptr, sc.data() + s, S);
      for (; s < S; ++s) rows_all_m<Kern, 1>(K + s * Dh, Dh, qf.data(), ldq, R, nullptr, sc.data() + s, S);
      }
      for (int64_t r = 0; r < R; ++r) {  // softmax in float32
        float* x = sc.data() + r * S;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t s = 0; s < S; s += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(S - s), x + s));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 den = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; s += 16) {
          const __mmask16 k = tail_mask(S - s);
          const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + s), m));
          den = _mm512_add_ps(den, _mm512_maskz_mov_ps(k, e));
          _mm512_mask_storeu_ps(x + s, k, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(den));
        for (int64_t s = 0; s < S; s += 16)
          _mm512_mask_storeu_ps(x + s, tail_mask(S - s), _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask(S - s), x + s), inv));
      }
      T* o = op + (b * Hq + g * R) * Dh;
      if (!pv_fast<D>(V, S, Dh, sc.data(), R, o)) pv_generic<D>(V, S, Dh, sc.data(), R, o);
    }
  });
}

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              "qwen3lab fused op: dtype must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

void check_c(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "qwen3lab fused op: ", what, " must be contiguous on CPU");
}

}  // namespace

// x [M, D] (+= r when given, in place), returns RMSNorm(x) * w.
at::Tensor add_rmsnorm(at::Tensor x, const c10::optional<at::Tensor>& r, const at::Tensor& w, double eps) {
  check_c(x, "x");
  check_c(w, "w");
  if (r.has_value()) check_c(*r, "r");
  auto y = at::empty_like(x);
  if (is_bf16(x)) add_rmsnorm_impl<BF16T>(x, r, w, y, eps);
  else add_rmsnorm_impl<F32T>(x, r, w, y, eps);
  return y;
}

// qkv [M, (Hq+2Hkv)Dh] -> q [M, Hq, Dh], k [M, Hkv, Dh] (per-head RMSNorm then RoPE), v [M, Hkv, Dh] (copied).
std::vector<at::Tensor> qk_norm_rope(const at::Tensor& qkv, const at::Tensor& qw, const at::Tensor& kw,
                                     const at::Tensor& cos, const at::Tensor& sin, int64_t Hq, int64_t Hkv, double eps) {
  for (auto* t : {&qkv, &qw, &kw, &cos, &sin}) check_c(*t, "qk_norm_rope input");
  const int64_t M = qkv.size(0), Dh = qw.size(0);
  TORCH_CHECK(qkv.size(1) == (Hq + 2 * Hkv) * Dh && cos.size(0) == M && cos.size(1) == Dh, "qk_norm_rope: shapes");
  auto q = at::empty({M, Hq, Dh}, qkv.options());
  auto k = at::empty({M, Hkv, Dh}, qkv.options());
  auto v = at::empty({M, Hkv, Dh}, qkv.options());
  if (is_bf16(qkv)) qk_norm_rope_impl<BF16T>(qkv, qw, kw, cos, sin, Hq, Hkv, eps, q, k, v);
  else qk_norm_rope_impl<F32T>(qkv, qw, kw, cos, sin, Hq, Hkv, eps, q, k, v);
  return {q, k, v};
}

// gate_up [M, 2I] -> dtype(silu(gate)) * up [M, I]
at::Tensor silu_mul(const at::Tensor& gu) {
  check_c(gu, "gate_up");
  auto out = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  if (is_bf16(gu)) silu_mul_impl<BF16T>(gu, out);
  else silu_mul_impl<F32T>(gu, out);
  return out;
}

at::Tensor attend_decode(const at::Tensor& q, const at::Tensor& kn, const at::Tensor& vn, std::vector<at::Tensor> kc,
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

// Row-wise argmax of logits [B, V] (float32 or bfloat16): the first index of the maximum, a NaN wins (as
// torch.argmax); instead of a float32 copy plus torch's argmax (~0.35 ms per step at V = 151936).
template <class D>
int64_t argmax_row(const typename D::T* x, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 k = tail_mask(V - i);
    const __m512 v = D::ld(x + i, k);
    if (_mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q)) {  // a NaN: the first one is the answer
      for (int64_t j = i;; ++j)
        if (std::isnan(_mm512_cvtss_f32(D::ld(x + j, 1)))) return j;
    }
    mx = _mm512_mask_max_ps(mx, k, mx, v);
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail_mask(V - i), D::ld(x + i, tail_mask(V - i)), m, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
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
// 512-bit loads, software prefetch), and return the sum of its bytes (as unsigned 8-bit values), so the reads
// cannot be skipped and a test can check them. The bench's bandwidth probe: a torch sum streams more slowly
// than the linear kernels do.
double stream_read(const at::Tensor& t) {
  check_c(t, "stream_read input");
  const int64_t nbytes = t.numel() * t.element_size(), lines = nbytes / 64;
  const uint8_t* base = (const uint8_t*)t.data_ptr();
  std::vector<int64_t> part(at::get_num_threads() + 1, 0);
  at::parallel_for(0, lines, 4096, [&](int64_t b, int64_t e) {
    const __m512i z = _mm512_setzero_si512();
    __m512i a0 = z, a1 = z;
    int64_t i = b;
    for (; i + 2 <= e; i += 2) {
      _mm_prefetch((const char*)base + (i + 32) * 64, _MM_HINT_T0);
      _mm_prefetch((const char*)base + (i + 33) * 64, _MM_HINT_T0);
      a0 = _mm512_add_epi64(a0, _mm512_sad_epu8(_mm512_loadu_si512((const void*)(base + i * 64)), z));
      a1 = _mm512_add_epi64(a1, _mm512_sad_epu8(_mm512_loadu_si512((const void*)(base + (i + 1) * 64)), z));
    }
    if (i < e) a0 = _mm512_add_epi64(a0, _mm512_sad_epu8(_mm512_loadu_si512((const void*)(base + i * 64)), z));
    part[at::get_thread_num()] += _mm512_reduce_add_epi64(_mm512_add_epi64(a0, a1));
  });
  int64_t total = 0;
  for (int64_t v : part) total += v;
  for (int64_t i = lines * 64; i < nbytes; ++i) total += base[i];
  return double(total);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_read", &stream_read, "read a tensor's bytes once (bandwidth probe)");
  m.def("argmax_rows", &argmax_rows, "first argmax of each row (NaN wins), as a list");
  m.def("add_rmsnorm", &add_rmsnorm, "x += r (optional, in place); return RMSNorm(x) * w");
  m.def("qk_norm_rope", &qk_norm_rope, "fused qkv row -> q, k (per-head RMSNorm + RoPE), v");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from a fused gate_up row");
  m.def("attend_decode", &attend_decode, "single-query attention over per-sequence KV caches (writes the new k/v)");
  m.def("linear_small", &linear_small, "y = x @ W.T, small M (decode)");
  m.def("linear_large", &linear_large, "y = x @ W.T, large M (prefill): W widened in bands, sgemm");
}
