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
#include "quant_kernels.h"

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

// an int8 row (n values, then n / 32 float16 scales) -> n float32 values q * d: Q8_0 blocks, dequantized as the
// packed kernels dequantize theirs
inline void to_f32(const int8_t* src, int64_t n, float* dst) {
  const auto* scales = reinterpret_cast<const uint8_t*>(src + n);
  for (int64_t b = 0; b < n / 32; ++b)
    lmgen_q::int8_to_f32(src + 32 * b, lmgen_q::fp16_to_f32(scales + 2 * b), dst + 32 * b);
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
// the lane sums of 4 accumulators, each in lmgen_fused::hsum8_fixed's tree (b0 + b2) + (b1 + b3), b_i = lane i +
// lane i + 4, done for the 4 at once through a 4 x 4 transpose
inline void hsum8_fixed4(const __m256* a, float* out) {
  __m128 b[4];
  for (int r = 0; r < 4; ++r) b[r] = _mm_add_ps(_mm256_castps256_ps128(a[r]), _mm256_extractf128_ps(a[r], 1));
  _MM_TRANSPOSE4_PS(b[0], b[1], b[2], b[3]);  // b[i] = lane i of the 4 accumulators
  _mm_storeu_ps(out, _mm_add_ps(_mm_add_ps(b[0], b[2]), _mm_add_ps(b[1], b[3])));
}

// dot(q, k_j) for the K (4 or 8) consecutive keys of k (rows of n floats), each in exactly lmgen_fused::dot's order
// (one 8-lane FMA chain, the fixed lane tree): independent chains hide the FMA latency that bounds a single dot,
// eight keep both FMA ports busy.  n % 8 == 0.
template <int K>
inline void dot_keys(const float* q, const float* k, int64_t n, float* out) {
  static_assert(K % 4 == 0, "keys come in fours (hsum8_fixed4)");
  __m256 a[K];
  for (int r = 0; r < K; ++r) a[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int r = 0; r < K; ++r) a[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + r * n + i), a[r]);
  }
  for (int r = 0; r < K; r += 4) hsum8_fixed4(a + r, out + r);
}

// dot_keys<4> for two queries at once: each key row is loaded once for both (the same chains, so the same values)
inline void dot2x4(const float* q0, const float* q1, const float* k, int64_t n, float* out0, float* out1) {
  __m256 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 x0 = _mm256_loadu_ps(q0 + i), x1 = _mm256_loadu_ps(q1 + i);
    for (int r = 0; r < 4; ++r) {
      const __m256 kv = _mm256_loadu_ps(k + r * n + i);
      a[r] = _mm256_fmadd_ps(x0, kv, a[r]);
      a[4 + r] = _mm256_fmadd_ps(x1, kv, a[4 + r]);
    }
  }
  hsum8_fixed4(a, out0);
  hsum8_fixed4(a + 4, out1);
}
#endif

// s[j] = q . k_j for the n keys of kt (rows of D floats), each in lmgen_fused::dot's order
inline void scores(const float* q, const float* kt, int64_t n, int64_t D, float* s) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) dot_keys<8>(q, kt + j * D, D, s + j);
    for (; j + 4 <= n; j += 4) dot_keys<4>(q, kt + j * D, D, s + j);
  }
#endif
  for (; j < n; ++j) s[j] = lmgen_fused::dot(q, kt + j * D, D);
}

// `scores` for two queries, sharing the key loads
inline void scores2(const float* q0, const float* q1, const float* kt, int64_t n, int64_t D, float* s0, float* s1) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0)
    for (; j + 4 <= n; j += 4) dot2x4(q0, q1, kt + j * D, D, s0 + j, s1 + j);
#endif
  for (; j < n; ++j) {
    s0[j] = lmgen_fused::dot(q0, kt + j * D, D);
    s1[j] = lmgen_fused::dot(q1, kt + j * D, D);
  }
}

// columns [i, D) of scale_accumulate: 8 at a time, then one by one
inline void accumulate_tail(float* acc, float alpha, const float* p, const float* v, int64_t n, int64_t D, int64_t i) {
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= D; i += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + i), _mm256_set1_ps(alpha));
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
#endif
  accumulate_tail(acc, alpha, p, v, n, D, i);
}

// scale_accumulate for two queries (p0 / p1 into acc0 / acc1), each V row loaded once for both; every column's
// chain is the single query's, so the same values
inline void scale_accumulate2(float* acc0, float* acc1, float alpha0, float alpha1, const float* p0, const float* p1,
                              const float* v, int64_t n, int64_t D) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 al0 = _mm256_set1_ps(alpha0), al1 = _mm256_set1_ps(alpha1);
  for (; i + 32 <= D; i += 32) {
    __m256 a[8];
    for (int r = 0; r < 4; ++r) {
      a[r] = _mm256_mul_ps(_mm256_loadu_ps(acc0 + i + 8 * r), al0);
      a[4 + r] = _mm256_mul_ps(_mm256_loadu_ps(acc1 + i + 8 * r), al1);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m256 x0 = _mm256_set1_ps(p0[j]), x1 = _mm256_set1_ps(p1[j]);
      const float* vj = v + j * D + i;
      for (int r = 0; r < 4; ++r) {
        const __m256 vv = _mm256_loadu_ps(vj + 8 * r);
        a[r] = _mm256_fmadd_ps(x0, vv, a[r]);
        a[4 + r] = _mm256_fmadd_ps(x1, vv, a[4 + r]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_ps(acc0 + i + 8 * r, a[r]);
      _mm256_storeu_ps(acc1 + i + 8 * r, a[4 + r]);
    }
  }
#endif
  accumulate_tail(acc0, alpha0, p0, v, n, D, i);
  accumulate_tail(acc1, alpha1, p1, v, n, D, i);
}

// The online-softmax step on one query's n scores: s[j] <- exp(s[j] * sc - m'), l <- l * alpha + sum_j s[j],
// m <- m' = max(m, max_j s[j] * sc); returns alpha = exp(m - m'), the factor for the running output.
inline float softmax_step(float* s, int64_t n, float sc, float* m, float* l) {
  float bm = -INFINITY;
  int64_t j = 0;
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
  return alpha;
}

// One query head's online-softmax state st = [m: running max, l: running sum, acc(D): unnormalised output] takes in
// n positions of a K/V tile (kt, vt: n rows of D floats).  s: scratch of n floats.
inline void block_update(const float* q, const float* kt, const float* vt, int64_t n, int64_t D, float sc, float* st,
                         float* s) {
  scores(q, kt, n, D, s);
  const float alpha = softmax_step(s, n, sc, st, st + 1);
  scale_accumulate(st + 2, alpha, s, vt, n, D);
}

// block_update for two queries over the same n positions, each K/V row read once for both: every number of
// either is computed as block_update computes it alone.  s: scratch of 2 n floats.
inline void block_update2(const float* q0, const float* q1, const float* kt, const float* vt, int64_t n, int64_t D,
                          float sc, float* st0, float* st1, float* s) {
  float* s1 = s + n;
  scores2(q0, q1, kt, n, D, s, s1);
  const float a0 = softmax_step(s, n, sc, st0, st0 + 1), a1 = softmax_step(s1, n, sc, st1, st1 + 1);
  scale_accumulate2(st0 + 2, st1 + 2, a0, a1, s, s1, vt, n, D);
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
