// Fused float32 CPU ops for the decode step of the transformer (lmgen.model.transformer's fast path).
//
// Why: decoding one token of a small model (SmolLM2-135M: 30 layers, hidden 576) spends more time in the
// ~50 small PyTorch ops per layer (dispatch, allocation, OpenMP wake-ups on tiny tensors) than in the packed
// matmuls.  These ops do the same arithmetic in one call each, on the calling thread only (the work is a few
// microseconds; waking helper threads would cost more than it saves).  Prefill-size calls split their rows over the
// packed kernels' share pool (share_pool.h), not OpenMP: an OpenMP worker left spinning after a region takes a
// core from the pool's helper on a small machine.
//
//   rms_norm(x, w, eps)                      x (M, H) -> x / sqrt(mean(x^2) + eps) * w
//   add_rms_norm(x, d, w, eps)               (x + d, rms_norm(x + d, w, eps)): residual add and the next norm
//   silu_mul(gate_up, I)                     gate_up (M, 2I) -> silu(gate) * up (M, I)
//   argmax_rows(x)                           x (M, V) -> (M,) int64: the greedy token of each row of logits
// (RoPE + K/V write + attention: attention.h.)  All accumulate in float32 in the same order of operations as the
// PyTorch path up to summation order, and each row's order is fixed: a row's result never depends on the
// other rows of the call (batch invariance).

#pragma once

#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "share_pool.h"

namespace lmgen_fused {

// threads for lmgen's kernels (the packed matmuls, attention, these ops): KernelTuning.threads, else torch's count
inline int kernel_threads() {
  const int n = lmgen_q::SharePool::instance().threads();
  return n > 0 ? n : at::get_num_threads();
}

// rows(m0, m1) over M rows of `width` floats: calls of 16K+ elements (a prefill, a batched decode step: 32 x 1,536
// for SmolLM2's activation) split over the kernels' share pool in chunks of ~16K; a single sequence's decode-size
// ones run on the calling thread (waking a helper would cost more than it saves)
template <class F>
inline void for_rows(int64_t M, int64_t width, F&& rows) {
  if (M * width >= 16384) lmgen_q::parallel_chunks(M, std::max<int64_t>(1, 16384 / width), kernel_threads(), rows);
  else rows(int64_t{0}, M);
}

inline void check_f32_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
                    " must be a contiguous CPU float32 tensor");
}

#if defined(__AVX2__) && defined(__FMA__)
// the fixed tree that adds the 8 lanes of an accumulator (dot, the attention's dot_keys in kv_tile.h, dense_gemm.h)
inline float hsum8_fixed(__m256 acc) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}
#endif

// sum_i a[i] b[i] with 8-lane FMA accumulators (a strict-order scalar loop does not vectorize); the order
// depends on n only
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float r = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  r = hsum8_fixed(acc);
#endif
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

#if defined(__AVX2__) && defined(__FMA__)
// exp of 8 floats (Cephes expf: range reduction by ln 2, degree-5 polynomial; ~1e-7 relative error)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

inline void rms_row(const float* x, const float* w, float eps, int64_t H, float* out) {
  const float ss = dot(x, x, H);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = x[i] * r * w[i];
}

// x (M, H), w (H,) -> (M, H)
inline torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_f32_cpu(x, "x");
  check_f32_cpu(w, "weight");
  const int64_t H = w.numel();
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == H, "x must be (M, hidden)");
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) rms_row(xp + m * H, wp, static_cast<float>(eps), H, op + m * H);
  };
  for_rows(x.size(0), H, rows);
  return out;
}

// qkv (T, (H + 2 KVH) D), q_w, k_w (D,) -> the same with every query head normed by q_w and every key head by k_w
// (Gemma 3's and Qwen3's q/k norms), the values copied: one call instead of the split, two copies, two norms and
// the concatenation; each head row is rms_row's, so the values are those of rms_norm on the (T H, D) rows
inline torch::Tensor qk_rms_norm(const torch::Tensor& qkv, const torch::Tensor& q_w, const torch::Tensor& k_w,
                                 int64_t heads, int64_t kv_heads, double eps) {
  check_f32_cpu(qkv, "qkv");
  check_f32_cpu(q_w, "q_norm weight");
  check_f32_cpu(k_w, "k_norm weight");
  const int64_t D = q_w.numel(), W = (heads + 2 * kv_heads) * D;
  TORCH_CHECK_VALUE(k_w.numel() == D && qkv.dim() == 2 && qkv.size(1) == W, "qkv must be (tokens, (heads + 2 kv_heads) ",
                    "head_dim) with q/k norm weights of head_dim values");
  auto out = torch::empty_like(qkv);
  const float *xp = qkv.data_ptr<float>(), *qw = q_w.data_ptr<float>(), *kw = k_w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  auto rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* x = xp + t * W;
      float* o = op + t * W;
      for (int64_t h = 0; h < heads + kv_heads; ++h) rms_row(x + h * D, h < heads ? qw : kw, e, D, o + h * D);
      std::copy(x + (heads + kv_heads) * D, x + W, o + (heads + kv_heads) * D);
    }
  };
  for_rows(qkv.size(0), W, rows);
  return out;
}

// x, d (M, H), w (H,) -> (x + d, rms_norm(x + d))
inline std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& d, const torch::Tensor& w,
                                               double eps) {
  check_f32_cpu(x, "x");
  check_f32_cpu(d, "delta");
  check_f32_cpu(w, "weight");
  const int64_t H = w.numel();
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == H && d.sizes() == x.sizes(), "x, delta must be (M, hidden)");
  auto sum = torch::empty_like(x), out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *dp = d.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  auto rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t i = 0; i < H; ++i) sp[m * H + i] = xp[m * H + i] + dp[m * H + i];
      rms_row(sp + m * H, wp, static_cast<float>(eps), H, op + m * H);
    }
  };
  for_rows(x.size(0), H, rows);
  return {sum, out};
}

// gate_up (M, 2I) -> act(gate_up[:, :I]) * gate_up[:, I:]  (M, I), act(a) = a * sigmoid(z(a)): SiLU with z = a,
// GELU's tanh form with z = 2 sqrt(2 / pi) (a + 0.044715 a^3) (0.5 a (1 + tanh(z / 2)) = a sigmoid(z))
template <bool kGelu>
inline torch::Tensor gated_act_mul(const torch::Tensor& gu, int64_t I) {
  check_f32_cpu(gu, "gate_up");
  TORCH_CHECK_VALUE(gu.dim() == 2 && gu.size(1) == 2 * I, "gate_up must be (M, 2 * intermediate)");
  const int64_t M = gu.size(0);
  auto out = torch::empty({M, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  constexpr float kZ = 1.5957691216057308f, kCube = 0.044715f;  // 2 sqrt(2 / pi), GELU's cubic coefficient
  auto rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float *gm = g + m * 2 * I, *um = gm + I;
      float* om = o + m * I;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      for (; i + 8 <= I; i += 8) {
        const __m256 a = _mm256_loadu_ps(gm + i);
        __m256 z = a;
        if (kGelu)
          z = _mm256_mul_ps(_mm256_set1_ps(kZ), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kCube), a),
                                                                _mm256_mul_ps(a, a), a));
        const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), z)));
        _mm256_storeu_ps(om + i, _mm256_mul_ps(_mm256_div_ps(a, den), _mm256_loadu_ps(um + i)));
      }
#endif
      for (; i < I; ++i) {
        const float a = gm[i], z = kGelu ? kZ * std::fma(kCube * a, a * a, a) : a;
        om[i] = a / (1.f + std::exp(-z)) * um[i];
      }
    }
  };
  for_rows(M, I, rows);
  return out;
}

inline torch::Tensor silu_mul(const torch::Tensor& gu, int64_t I) { return gated_act_mul<false>(gu, I); }
inline torch::Tensor gelu_tanh_mul(const torch::Tensor& gu, int64_t I) { return gated_act_mul<true>(gu, I); }

// x (V,) -> the index of its largest value: the first among equal maxima, the first NaN if there is one
// (torch.argmax's rules, so the greedy token is the same on every path).  Four 8-lane chains each keep the first
// maximum of the positions they scan; the 32 candidates are merged largest value, then lowest index, first.
inline int64_t argmax_row(const float* x, int64_t V) {
  int64_t i = 0, best = 0;
  float bv = -INFINITY;
  bool nan = false;
#if defined(__AVX2__)
  if (V >= 32) {
    __m256 val[4], unord = _mm256_setzero_ps();
    __m256i ix[4], at[4];
    for (int a = 0; a < 4; ++a) {
      val[a] = _mm256_set1_ps(-INFINITY);
      at[a] = ix[a] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * a));
    }
    const __m256i step = _mm256_set1_epi32(32);
    for (; i + 32 <= V; i += 32)
      for (int a = 0; a < 4; ++a) {
        const __m256 v = _mm256_loadu_ps(x + i + 8 * a);
        const __m256 gt = _mm256_cmp_ps(v, val[a], _CMP_GT_OQ);
        val[a] = _mm256_blendv_ps(val[a], v, gt);
        ix[a] = _mm256_blendv_epi8(ix[a], at[a], _mm256_castps_si256(gt));
        unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        at[a] = _mm256_add_epi32(at[a], step);
      }
    nan = _mm256_movemask_ps(unord) != 0;
    alignas(32) float lv[32];
    alignas(32) int32_t li[32];
    for (int a = 0; a < 4; ++a) {
      _mm256_store_ps(lv + 8 * a, val[a]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(li + 8 * a), ix[a]);
    }
    best = li[0];
    bv = lv[0];
    for (int k = 1; k < 32; ++k)
      if (lv[k] > bv || (lv[k] == bv && li[k] < best)) {
        bv = lv[k];
        best = li[k];
      }
  }
#endif
  for (; i < V && !nan; ++i) {
    nan = std::isnan(x[i]);
    if (x[i] > bv) {
      bv = x[i];
      best = i;
    }
  }
  if (nan)
    for (i = 0; i < V; ++i)
      if (std::isnan(x[i])) return i;
  return best;
}

// x (M, V) float32 -> (M,) int64, argmax_row of each row (rows of a big call split over the share pool)
inline torch::Tensor argmax_rows(const torch::Tensor& x) {
  check_f32_cpu(x, "logits");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.size(1) < (int64_t{1} << 31), "logits must be (rows, vocab)");
  const int64_t M = x.size(0), V = x.size(1);
  auto out = torch::empty({M}, x.options().dtype(torch::kInt64));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for_rows(M, V, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) op[m] = argmax_row(xp + m * V, V);
  });
  return out;
}

// x (D,) rotated in the rotate_half layout: out[i] = x[i] cos[i] - x[i+D/2] sin[i]; out[i+D/2] = x[i+D/2] cos + x[i] sin
inline void rope_head(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    out[i] = x[i] * cos[i] - x[i + h] * sin[i];
    out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
  }
}

}  // namespace lmgen_fused
