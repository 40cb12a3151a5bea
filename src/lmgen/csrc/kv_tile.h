// The KV cache's element types and the per-block arithmetic of attention.h (float32 math on float32 tiles).
//
// The cache holds float32, float16 (IEEE half), bfloat16 or int8 rows; a K/V row is converted to float32 when it
// is copied into a tile of kBlock positions (exact: every half / bfloat16 value is a float32), and written from
// float32 with round-to-nearest-even (torch's .to() rounding; float16 saturates at +-65504 instead of overflowing
// to inf).  An int8 row of D values is D int8 then D / 32 float16 scales (Q8_0's blocks of 32: x ~ q * d,
// d = max|x| / 127 rounded to float16, q = round(x / d)), D + D / 16 bytes: lmgen.layers.attention's
// `to_cache_dtype` / `from_cache_dtype` compute the same bytes and values.
// `block_update` is the one online-softmax step every path uses (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax"; FlashAttention's blocked form): a token's result depends only on its own span.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "fused_ops.h"

namespace lmgen_attn {

// n floats of a cache row -> float32
inline void to_f32(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }

inline void to_f32(const at::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void to_f32(const at::BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));  // bf16 = the float's top half
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// an int8 row (n values, then n / 32 float16 scales) -> n float32 values q * d
inline void to_f32(const int8_t* src, int64_t n, float* dst) {
  for (int64_t b = 0; b < n / 32; ++b) {
    at::Half h;
    std::memcpy(&h, src + n + 2 * b, sizeof(h));
    const float d = static_cast<float>(h);
    const int8_t* q = src + 32 * b;
    float* o = dst + 32 * b;
    int64_t i = 0;
#if defined(__AVX2__)
    const __m256 dv = _mm256_set1_ps(d);
    for (; i < 32; i += 8) {
      const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_cvtepi32_ps(w), dv));
    }
#endif
    for (; i < 32; ++i) o[i] = static_cast<float>(q[i]) * d;
  }
}

// n float32 values -> a cache row
inline void from_f32(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }

constexpr float kHalfMax = 65504.f;  // the largest finite float16

inline void from_f32(const float* src, int64_t n, at::Half* dst) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  const __m256 lo = _mm256_set1_ps(-kHalfMax), hi = _mm256_set1_ps(kHalfMax);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(src + i), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < n; ++i) dst[i] = at::Half(std::min(std::max(src[i], -kHalfMax), kHalfMax));
}

inline void from_f32(const float* src, int64_t n, at::BFloat16* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(src[i]);  // round to nearest even
}

// n float32 values (n % 32 == 0) -> an int8 row: per block of 32, d = half(min(max|x| / 127, 65504)),
// q = clamp(round_even(x * (1 / d)), -127, 127) (0 where d is 0), the scales after the n values
inline void from_f32(const float* src, int64_t n, int8_t* dst) {
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* x = src + 32 * b;
    float amax = 0.f;
    for (int64_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const at::Half h(std::min(amax / 127.f, kHalfMax));
    const float d = static_cast<float>(h), id = d > 0.f ? 1.f / d : 0.f;
    for (int64_t i = 0; i < 32; ++i)
      dst[32 * b + i] = static_cast<int8_t>(std::min(std::max(std::nearbyint(x[i] * id), -127.f), 127.f));
    std::memcpy(dst + n + 2 * b, &h, sizeof(h));
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// dot(q, k_j) for 4 keys at once, each in exactly lmgen_fused::dot's order (one 8-lane FMA chain, the fixed lane
// tree): four independent chains hide the FMA latency that bounds a single dot.  n % 8 == 0.
inline void dot4(const float* q, const float* k0, const float* k1, const float* k2, const float* k3, int64_t n,
                 float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
  }
  out[0] = lmgen_fused::hsum8_fixed(a0);
  out[1] = lmgen_fused::hsum8_fixed(a1);
  out[2] = lmgen_fused::hsum8_fixed(a2);
  out[3] = lmgen_fused::hsum8_fixed(a3);
}

// dot(q, k_j) for the 8 consecutive keys of k (rows of n floats), each in exactly lmgen_fused::dot's order: one
// 8-lane FMA chain per key (eight independent chains keep both FMA ports busy), then hsum8_fixed's tree
// (b0 + b2) + (b1 + b3), b_i = lane i + lane i + 4, done for 4 keys at once through a 4 x 4 transpose.  n % 8 == 0.
inline void dot8(const float* q, const float* k, int64_t n, float* out) {
  __m256 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + r * n + i), a[r]);
  }
  for (int h = 0; h < 2; ++h) {
    __m128 b[4];
    for (int r = 0; r < 4; ++r)
      b[r] = _mm_add_ps(_mm256_castps256_ps128(a[4 * h + r]), _mm256_extractf128_ps(a[4 * h + r], 1));
    _MM_TRANSPOSE4_PS(b[0], b[1], b[2], b[3]);  // b[i] = lane i of the 4 keys
    _mm_storeu_ps(out + 4 * h, _mm_add_ps(_mm_add_ps(b[0], b[2]), _mm_add_ps(b[1], b[3])));
  }
}
#endif

// acc[i] = acc[i] * alpha + sum_j p[j] v[j][i], j ascending, for each of the D columns independently (v: n rows of
// D floats).  Eight 8-lane chains per 64 columns keep both FMA ports busy.
inline void scale_accumulate(float* acc, float alpha, const float* p, const float* v, int64_t n, int64_t D) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 al = _mm256_set1_ps(alpha);
  for (; i + 64 <= D; i += 64) {
    __m256 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 8 * r), al);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const float* vj = v + j * D + i;
      for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * r), a[r]);
    }
    for (int r = 0; r < 8; ++r) _mm256_storeu_ps(acc + i + 8 * r, a[r]);
  }
  for (; i + 8 <= D; i += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + i), al);
    for (int64_t j = 0; j < n; ++j) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * D + i), a);
    _mm256_storeu_ps(acc + i, a);
  }
#endif
  for (; i < D; ++i) {
    float a = acc[i] * alpha;
    for (int64_t j = 0; j < n; ++j) a = std::fma(p[j], v[j * D + i], a);
    acc[i] = a;
  }
}

// One query head's online-softmax state (m: running max, l: running sum, acc[D]: unnormalised output) takes in n
// positions of a K/V tile (kt, vt: n rows of D floats).  s: scratch of n floats.
inline void block_update(const float* q, const float* kt, const float* vt, int64_t n, int64_t D, float sc, float* m,
                         float* l, float* acc, float* s) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) dot8(q, kt + j * D, D, s + j);
    for (; j + 4 <= n; j += 4) dot4(q, kt + j * D, kt + (j + 1) * D, kt + (j + 2) * D, kt + (j + 3) * D, D, s + j);
  }
#endif
  for (; j < n; ++j) s[j] = lmgen_fused::dot(q, kt + j * D, D);
  float bm = -INFINITY;
  j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 bm8 = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) {  // elementwise products and a max: the same values as the scalar loop
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(sc));
    _mm256_storeu_ps(s + j, v);
    bm8 = _mm256_max_ps(bm8, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, bm8);
  for (float x : lanes) bm = std::max(bm, x);
#endif
  for (; j < n; ++j) {
    s[j] *= sc;
    bm = std::max(bm, s[j]);
  }
  const float mn = std::max(*m, bm);
  const float alpha = std::exp(*m - mn);  // 0 on the first block (m = -inf)
  float sum = 0.f;
  j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 sum8 = _mm256_setzero_ps();  // the exps summed in 8 lanes, then the fixed lane tree
  for (; j + 8 <= n; j += 8) {
    const __m256 e = lmgen_fused::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(mn)));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  sum = lmgen_fused::hsum8_fixed(sum8);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mn);
    sum += s[j];
  }
  *l = std::fma(*l, alpha, sum);
  *m = mn;
  scale_accumulate(acc, alpha, s, vt, n, D);
}

// A running state [M, L, A(D)] takes in a split's state [m, l, a(D)]; splits are always taken in position order.
inline void merge_state(float* run, const float* part, int64_t D) {
  const float mn = std::max(run[0], part[0]);
  const float x = std::exp(run[0] - mn), y = std::exp(part[0] - mn);
  run[1] = std::fma(run[1], x, part[1] * y);
  run[0] = mn;
  for (int64_t i = 0; i < D; ++i) run[2 + i] = std::fma(run[2 + i], x, part[2 + i] * y);
}

inline void init_state(float* st, int64_t D) {
  st[0] = -INFINITY;
  std::fill(st + 1, st + 2 + D, 0.f);
}

// out (D) = A / L
inline void finish_state(const float* st, int64_t D, float* out) {
  const float inv = 1.f / st[1];
  for (int64_t i = 0; i < D; ++i) out[i] = st[2 + i] * inv;
}

}  // namespace lmgen_attn
