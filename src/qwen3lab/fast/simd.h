// qwen3lab fast kernels: the vector layer kernels.cpp is written against, one source for every CPU.
//
// The kernels use GCC/Clang vector extensions (`float __attribute__((vector_size(..)))`): ordinary C++
// arithmetic on whole vectors that the compiler turns into the instructions of the target it is built for.
// build.py compiles kernels.cpp once per path, and the path decides the width:
//   avx512    (-mavx512f/bw/vl/dq -mfma, +vnni where present)  16 floats a vector, one zmm register
//   avx2      (-mavx2 -mfma -mf16c)                             8 floats, one ymm register
//   portable  (no -m flags: SSE2 on x86-64, NEON on arm64)      8 floats, two registers of 4
// A handful of operations that the compiler cannot find on its own from plain vector code (fused multiply-add,
// horizontal sums, the int16 pair multiply-add) have an intrinsic for avx2/avx512 and plain code otherwise,
// so the portable path computes the same thing, only slower.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace simd {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int W = 16;
#define QWEN3LAB_PATH "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
#define QWEN3LAB_PATH "avx2"
#else
constexpr int W = 8;
#define QWEN3LAB_PATH "portable"
#endif

typedef float vf __attribute__((vector_size(W * 4)));     // W float32
typedef int32_t vi __attribute__((vector_size(W * 4)));   // W int32 (also: comparison results, -1 / 0)
typedef uint32_t vu __attribute__((vector_size(W * 4)));  // W uint32 = 2W bfloat16 read as pairs
typedef uint16_t vh __attribute__((vector_size(W * 2)));  // W bfloat16
typedef int16_t vs __attribute__((vector_size(W * 2)));   // W int16
typedef int16_t vs2 __attribute__((vector_size(W * 4)));  // 2W int16
typedef int8_t vb2 __attribute__((vector_size(W * 2)));   // 2W int8
typedef uint8_t vq16 __attribute__((vector_size(16)));    // 16 uint8 (a block of 32 packed int4 weights)
typedef uint16_t vw16 __attribute__((vector_size(32)));   // 16 uint16

// Unaligned whole-vector loads and stores (memcpy of a fixed size compiles to one vector move).
template <class V, class T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V, class T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
// The first n elements (n <= the vector's), zeros after: the tails of rows whose length is not a multiple.
// Copied as n's binary digits, each a fixed-size copy (a move or two), not one memcpy of n * sizeof(T) bytes:
// GCC 12 makes that a libc call, and a call anywhere in a loop (even behind the branch a whole vector takes)
// made it keep the loop's accumulators on the stack, e.g. the decode attention's p.V sums: a store and a
// reload per FMA. All three always inlined for the same reason: in a larger build of the linear kernels GCC
// outlined copy_digits, then load_n (seen in the disassembly), which brings the call back into the loops.
#define QWEN3LAB_INLINE __attribute__((always_inline)) inline
template <int B, class T>
QWEN3LAB_INLINE void copy_digits(char* d, const char* s, int64_t n) {  // the elements of n's digits B, B/2, .., 1
  if (n & B) {
    std::memcpy(d, s, B * sizeof(T));
    d += B * sizeof(T);
    s += B * sizeof(T);
  }
  if constexpr (B > 1) copy_digits<B / 2, T>(d, s, n);
}
template <class V, class T>
QWEN3LAB_INLINE V load_n(const T* p, int64_t n) {
  V v = {};
  copy_digits<sizeof(V) / sizeof(T), T>((char*)&v, (const char*)p, n);
  return v;
}
template <class V, class T>
QWEN3LAB_INLINE void store_n(T* p, V v, int64_t n) {
  copy_digits<sizeof(V) / sizeof(T), T>((char*)p, (const char*)&v, n);
}

inline vf splat(float a) { return vf{} + a; }
inline vi isplat(int32_t a) { return vi{} + a; }

// lanes where m is -1 take a, the others b
inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
inline vf vmin(vf a, vf b) { return sel(a < b, a, b); }
inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }

// -1 in lanes 0 .. n-1, 0 in the rest
inline vi first_lanes(int64_t n) {
  vi m;
  for (int i = 0; i < W; ++i) m[i] = i < n ? -1 : 0;
  return m;
}

inline bool any(vi m) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif defined(__AVX2__)
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#else
  int32_t r = 0;
  for (int i = 0; i < W; ++i) r |= m[i];
  return r != 0;
#endif
}

// a * b + c, one rounding where the CPU has FMA
inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;  // two roundings: the baseline targets have no vector FMA to rely on
#endif
}

inline float hsum(vf v) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#else
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
#endif
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Four horizontal sums at once into out[0..3].
inline void hsum4(vf a, vf b, vf c, vf d, float* out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)a, (__m512)b, 0x44), _mm512_shuffle_f32x4((__m512)a, (__m512)b, 0xEE));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)c, (__m512)d, 0x44), _mm512_shuffle_f32x4((__m512)c, (__m512)d, 0xEE));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  _mm_storeu_ps(out, _mm512_castps512_ps128(
                         _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), t)));
#elif defined(__AVX2__)
  const __m256 ab = _mm256_hadd_ps((__m256)a, (__m256)b), cd = _mm256_hadd_ps((__m256)c, (__m256)d);
  const __m256 t = _mm256_hadd_ps(ab, cd);  // [a b c d | a b c d] halves
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#else
  out[0] = hsum(a);
  out[1] = hsum(b);
  out[2] = hsum(c);
  out[3] = hsum(d);
#endif
}

// acc + the sums of adjacent int16 pairs' products (pmaddwd): exact in int32.
inline vi madd(vi acc, vs2 a, vs2 b) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  return (vi)_mm512_dpwssd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
#elif defined(__AVX512F__) && defined(__AVX512BW__)
  return acc + (vi)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
  return acc + (vi)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#else
  const vi ai = (vi)a, bi = (vi)b;  // each int32 lane holds one pair: low half then high half
  return acc + ((ai << 16) >> 16) * ((bi << 16) >> 16) + (ai >> 16) * (bi >> 16);
#endif
}

// 2W int8 sign-extended to int16: one vpmovsxbw where there is AVX2. GCC 12 splits the generic conversion of 32
// lanes into two 16-lane halves, an extract and an insert: three shuffle-port uops per 32 weights, which capped the
// one-row int8 decode stream at ~16 GB/s a core from L2 on an Emerald Rapids Xeon (one: ~2x that).
inline vs2 widen_i8(vb2 b) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return (vs2)_mm512_cvtepi8_epi16((__m256i)b);
#elif defined(__AVX2__)
  return (vs2)_mm256_cvtepi8_epi16((__m128i)b);
#else
  return __builtin_convertvector(b, vs2);
#endif
}

// 16 uint8 zero-extended to uint16: one vpmovzxbw where there is AVX2 (GCC 12 splits the generic conversion
// into two 128-bit halves and an insert).
inline vw16 widen_u8(vq16 b) {
#if defined(__AVX2__)
  return (vw16)_mm256_cvtepu8_epi16((__m128i)b);
#else
  return __builtin_convertvector(b, vw16);
#endif
}

// W uint8 from p to float32 (exact): a zero-extend and a convert where there is AVX2 (GCC 12 converts the generic
// vector one lane at a time).
inline vf u8_to_float(const uint8_t* p) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  vf f;
  for (int i = 0; i < W; ++i) f[i] = float(p[i]);
  return f;
#endif
}

// Two vectors of 16 int16 laid end to end as 32 int16 in `out`: one vector of 2W int16 on AVX-512 (an insert
// rather than two stores and a wider reload, which stalls store forwarding), two on the 8-float paths.
inline void join16(vw16 lo, vw16 hi, vs2* out) {
  static_assert(sizeof(vs2) == 32 || sizeof(vs2) == 64, "2W int16 is 16 or 32 lanes");
#if defined(__AVX512F__) && defined(__AVX512BW__)
  out[0] = (vs2)_mm512_inserti64x4(_mm512_castsi256_si512((__m256i)lo), (__m256i)hi, 1);
#else
  std::memcpy((char*)out, &lo, sizeof lo);
  std::memcpy((char*)out + sizeof lo, &hi, sizeof hi);
#endif
}

// ---- bfloat16 <-> float32 -----------------------------------------------------------------------------------
inline float bf(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// W bfloat16 to float32 (exact): one vpmovzxwd and a shift where there is AVX2. GCC 12 compiles the generic
// conversion of 8 lanes as two 4-lane halves, a byte shift and an insert (6 instructions for 2), and every bf16
// load of the norm, RoPE, SiLU and attention kernels goes through here.
inline vf widen(vh h) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
#elif defined(__AVX2__)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#else
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

// float32 bits rounded to nearest even at bfloat16's precision (upper 16 bits kept; NaN stays a quiet NaN)
inline vu bf16_bits(vf v) {
  const vu u = (vu)v;
  const vu r = u + 0x7fffu + ((u >> 16) & 1u);
  const vi nan = v != v;
  return (vu)(((vi)r & ~nan) | ((vi)(u | 0x00400000u) & nan));
}
inline vh narrow(vf v) { return __builtin_convertvector(bf16_bits(v) >> 16, vh); }

// exp(x) to float32 accuracy: range reduction by ln 2, a degree-6 polynomial, and 2^n built in two halves so
// that n down to -150 (denormal results) and up to 128 (overflow to inf) come out as exp does.
inline vf vexp(vf x) {
  x = vmax(vmin(x, splat(88.8f)), splat(-104.0f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = fmadd(n, splat(-0.693145751953125f), x);
  r = fmadd(n, splat(-1.428606765330187045e-06f), r);
  vf p = splat(1.0f / 720);
  p = fmadd(p, r, splat(1.0f / 120));
  p = fmadd(p, r, splat(1.0f / 24));
  p = fmadd(p, r, splat(1.0f / 6));
  p = fmadd(p, r, splat(0.5f));
  p = fmadd(p, r, splat(1.0f));
  p = fmadd(p, r, splat(1.0f));
  const vi ni = __builtin_convertvector(n, vi), n1 = ni >> 1, n2 = ni - n1;
  return p * (vf)((n1 + 127) << 23) * (vf)((n2 + 127) << 23);
}

}  // namespace simd
