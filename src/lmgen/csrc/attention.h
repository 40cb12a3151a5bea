// Paged attention over the KV cache for any mix of prefill chunks and decode tokens (float32, CPU), with RoPE
// and the K/V write: lmgen.model.transformer's fused path for every step.
//
//   paged_attention(qkv, cos, sin, k_cache, v_cache, slots, kv_index, token_seq, token_kv_start, token_kv_len,
//                   heads, kv_heads, scale)
//     qkv (T, (heads + 2 kv_heads) D) the step's projected tokens, cos/sin (T, D) their RoPE rows,
//     k_cache/v_cache (slots, kv_heads, D), slots (T,) where each token's K/V goes,
//     kv_index (B, max_kv) cache slots of each sequence's context in position order,
//     token_seq (T,) the sequence of each token, token_kv_start / token_kv_len (T,) the span of its
//     sequence's kv_index row the token sees (causal, and the sliding window when there is one)
//     -> out (T, heads D)
//
// Batch invariance: first every token's q and k are rotated and its K/V written; then each (token, head)
// attends over its span in one fixed order (scores, max, exp, sum, weighted sum of V, all in position order),
// with no split of the KV that depends on the batch.  A token's result is therefore the same whether it is
// decoded alone, next to 31 other sequences, or computed as part of a prefill chunk of any size; and a
// prefilled K/V row is the same whatever chunk it was computed in.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fused_ops.h"

namespace lmgen_attn {

using lmgen_fused::dot;
using lmgen_fused::rope_head;

#if defined(__AVX2__) && defined(__FMA__)
// dot(q, k_j) for 4 keys at once, each in exactly `dot`'s order (one 8-lane FMA chain, the fixed lane tree):
// four independent chains hide the FMA latency that bounds a single dot.  n % 8 == 0.
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
#endif

// one query head over n cached positions idx[0..n) of K/V head g; scores: scratch of n floats; o (D,)
inline void attend(const float* qh, const float* kc, const float* vc, const int64_t* idx, int64_t n, int64_t kv_heads,
                   int64_t g, int64_t D, float sc, float* scores, float* __restrict o) {
  int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    for (; t + 4 <= n; t += 4) {
      dot4(qh, kc + (idx[t] * kv_heads + g) * D, kc + (idx[t + 1] * kv_heads + g) * D,
           kc + (idx[t + 2] * kv_heads + g) * D, kc + (idx[t + 3] * kv_heads + g) * D, D, scores + t);
    }
  }
#endif
  for (; t < n; ++t) scores[t] = dot(qh, kc + (idx[t] * kv_heads + g) * D, D);
  float mx = -INFINITY;
  for (t = 0; t < n; ++t) {
    scores[t] *= sc;
    mx = std::max(mx, scores[t]);
  }
  float sum = 0.f;
  int64_t t0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; t0 + 8 <= n; t0 += 8) {
    const __m256 e = lmgen_fused::exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t0), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(scores + t0, e);
  }
  for (t = 0; t < t0; ++t) sum += scores[t];
#endif
  for (t = t0; t < n; ++t) sum += (scores[t] = std::exp(scores[t] - mx));
  std::fill(o, o + D, 0.f);
  const float inv = 1.f / sum;
  for (t = 0; t < n; ++t) {
    const float p = scores[t] * inv;
    const float* __restrict v = vc + (idx[t] * kv_heads + g) * D;
    for (int64_t i = 0; i < D; ++i) o[i] += p * v[i];
  }
}

inline torch::Tensor paged_attention(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                     torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                     const torch::Tensor& kv_index, const torch::Tensor& token_seq,
                                     const torch::Tensor& token_kv_start, const torch::Tensor& token_kv_len,
                                     int64_t heads, int64_t kv_heads, double scale) {
  using lmgen_fused::check_f32_cpu;
  check_f32_cpu(qkv, "qkv");
  check_f32_cpu(cos, "cos");
  check_f32_cpu(sin, "sin");
  check_f32_cpu(k_cache, "k_cache");
  check_f32_cpu(v_cache, "v_cache");
  TORCH_CHECK_VALUE(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK_VALUE(k_cache.dim() == 3 && k_cache.size(1) == kv_heads && v_cache.sizes() == k_cache.sizes(),
                    "caches must be (slots, kv_heads, head_dim)");
  const int64_t T = qkv.size(0), D = k_cache.size(2), S = k_cache.size(0);
  TORCH_CHECK_VALUE(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(1) == (heads + 2 * kv_heads) * D, "qkv must be (T, (H + 2 KVH) D)");
  TORCH_CHECK_VALUE(cos.numel() == T * D && sin.numel() == T * D, "cos/sin must be (T, D)");
  for (const auto* t : {&slots, &kv_index, &token_seq, &token_kv_start, &token_kv_len})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                      "index tensors must be contiguous CPU int64");
  TORCH_CHECK_VALUE(slots.numel() == T && token_seq.numel() == T && token_kv_start.numel() == T &&
                        token_kv_len.numel() == T && kv_index.dim() == 2,
                    "slots, token_seq, token_kv_start, token_kv_len (T,); kv_index (B, max_kv)");
  const int64_t B = kv_index.size(0), max_kv = kv_index.size(1), group = heads / kv_heads;
  const int64_t row = (heads + 2 * kv_heads) * D;
  const float *qp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const int64_t *slot = slots.data_ptr<int64_t>(), *kvi = kv_index.data_ptr<int64_t>();
  const int64_t *seq = token_seq.data_ptr<int64_t>(), *kv0 = token_kv_start.data_ptr<int64_t>(),
                *kvn = token_kv_len.data_ptr<int64_t>();
  int64_t work = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(slot[t] >= 0 && slot[t] < S, "slot ", slot[t], " out of range");
    TORCH_CHECK_VALUE(seq[t] >= 0 && seq[t] < B && kvn[t] >= 1 && kv0[t] >= 0 && kv0[t] + kvn[t] <= max_kv,
                      "token ", t, ": sequence / kv span out of range");
    const int64_t* idx = kvi + seq[t] * max_kv + kv0[t];
    for (int64_t j = 0; j < kvn[t]; ++j) TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < S, "kv_index out of range");
    work += kvn[t];
  }
  auto q = torch::empty({T, heads * D}, qkv.options()), out = torch::empty({T, heads * D}, qkv.options());
  float *qr = q.data_ptr<float>(), *op = out.data_ptr<float>();
  // 1. RoPE on q and k, K/V written to the cache (before any token reads the cache)
  for (int64_t t = 0; t < T; ++t) {
    const float *x = qp + t * row, *c = cp + t * D, *s = sp + t * D;
    for (int64_t h = 0; h < heads; ++h) rope_head(x + h * D, c, s, D, qr + t * heads * D + h * D);
    for (int64_t g = 0; g < kv_heads; ++g) {
      rope_head(x + (heads + g) * D, c, s, D, kc + (slot[t] * kv_heads + g) * D);
      std::copy(x + (heads + kv_heads + g) * D, x + (heads + kv_heads + g + 1) * D, vc + (slot[t] * kv_heads + g) * D);
    }
  }
  // 2. each (token, head) over its span, in position order; threads only split the (token, head) pairs
  const float sc = static_cast<float>(scale);
  auto pairs = [&](int64_t p0, int64_t p1) {
    std::vector<float> scores(max_kv);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t = p / heads, h = p % heads;
      attend(qr + t * heads * D + h * D, kc, vc, kvi + seq[t] * max_kv + kv0[t], kvn[t], kv_heads, h / group, D, sc,
             scores.data(), op + t * heads * D + h * D);
    }
  };
  // decode-size steps stay on the calling thread (waking helpers costs more than a few microseconds of work)
  if (work * heads * D >= (int64_t{1} << 20))
    at::parallel_for(0, T * heads, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work / T * D)), pairs);
  else
    pairs(0, T * heads);
  return out;
}

}  // namespace lmgen_attn
