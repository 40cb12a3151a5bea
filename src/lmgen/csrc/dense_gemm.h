// Fixed-order float32 matmul for dense (unquantized) linear layers: y = x W^T (+ bias), W (N, K) row-major
// as the model stores it.  Used on the CPU in batch-invariant mode (lmgen.model.linear.DenseLinear).
// Two variants, chosen once per machine (never per call): AVX-512 (16 lanes) where the CPU has AVX-512F, else
// AVX2 (8 lanes); the order below is that of the variant in use.
//
// Why: MKL's sgemm picks a different kernel and blocking for 1, 2-8 and 16+ rows, so the same row of x gets
// a different result depending on how many other rows share the call (measured: up to 6e-5 apart on
// 576 x 1536), and a greedy token can flip.  Here every output element y[m, n] is computed in one order that
// depends only on K: lane j of one L-wide accumulator (L = 16 or 8) sums x[k] W[n, k] for k = j, j + L, ... as
// an FMA chain, the L lanes are added by a fixed tree, the K % L remaining products are added one by one, then
// the bias.  Register tiles of MR rows x NR weight rows only decide which outputs are computed together, and
// threads split the output columns, so a row's result is the same alone or in any batch.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fused_ops.h"
#include "share_pool.h"

namespace lmgen_dense {

using lmgen_fused::hsum8_fixed;  // the fixed tree that adds an accumulator's 8 lanes

#define LMGEN_AVX512F __attribute__((target("avx512f")))

inline bool cpu_has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// the 16-lane variant's fixed tree: upper 8 lanes onto the lower 8, then hsum8_fixed
LMGEN_AVX512F inline float hsum16_fixed(__m512 acc) {
  const __m256 lo = _mm512_castps512_ps256(acc);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  return hsum8_fixed(_mm256_add_ps(lo, hi));
}

template <int MR, int NR>
LMGEN_AVX512F inline void dense_tile16(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K,
                                       const float* bias, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_setzero_ps();
  const int64_t K16 = K & ~int64_t{15};
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_loadu_ps(w + n * ldw + k);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + k);
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_fmadd_ps(xv, wv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) {
      float s = hsum16_fixed(acc[r][n]);
      for (int64_t k = K16; k < K; ++k) s = std::fma(x[r * ldx + k], w[n * ldw + k], s);
      if (bias != nullptr) s += bias[n];
      y[r * ldy + n] = s;
    }
}

template <int NR>
LMGEN_AVX512F inline void dense_rows16(const float* x, int64_t M, int64_t K, const float* w, const float* bias,
                                       float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dense_tile16<4, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy);
  switch (M - m) {
    case 3: dense_tile16<3, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy); break;
    case 2: dense_tile16<2, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy); break;
    case 1: dense_tile16<1, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy); break;
    default: break;
  }
}

// rows [mb, mb + mr) of y, weight rows [n, n + nr) (nr <= 4), the AVX-512 variant
LMGEN_AVX512F inline void dense_panel16(const float* xm, int64_t mr, int64_t K, const float* wn, const float* bn,
                                        float* yn, int64_t ldy, int64_t nr) {
  switch (nr) {
    case 4: dense_rows16<4>(xm, mr, K, wn, bn, yn, ldy); break;
    case 3: dense_rows16<3>(xm, mr, K, wn, bn, yn, ldy); break;
    case 2: dense_rows16<2>(xm, mr, K, wn, bn, yn, ldy); break;
    default: dense_rows16<1>(xm, mr, K, wn, bn, yn, ldy); break;
  }
}

// y[r, n] for r < MR, n < NR: x rows at x + r * ldx, weight rows at w + n * ldw
template <int MR, int NR>
inline void dense_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, const float* bias,
                       float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) acc[r][n] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm256_loadu_ps(w + n * ldw + k);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm256_fmadd_ps(xv, wv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) {
      float s = hsum8_fixed(acc[r][n]);
      for (int64_t k = K8; k < K; ++k) s = std::fma(x[r * ldx + k], w[n * ldw + k], s);
      if (bias != nullptr) s += bias[n];
      y[r * ldy + n] = s;
    }
}

template <int NR>
inline void dense_rows(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dense_tile<4, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy);
  switch (M - m) {
    case 3: dense_tile<3, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy); break;
    case 2: dense_tile<2, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy); break;
    case 1: dense_tile<1, NR>(x + m * K, K, w, K, K, bias, y + m * ldy, ldy); break;
    default: break;
  }
}

// x (M, K), w (N, K), bias (N,) or null -> y (M, N); rows of x in blocks that stay in L2, weight rows in
// panels (4 with AVX-512, 3 with AVX2: the accumulators fill the registers) that stay in L1
inline void dense_gemm(const float* x, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* y,
                       int nthreads) {
  const bool wide = cpu_has_avx512f();
  const int64_t NR = wide ? 4 : 3;
  const int64_t panels = (N + NR - 1) / NR;
  const int64_t mblock = std::max<int64_t>(4, (int64_t{1} << 19) / (4 * std::max<int64_t>(K, 1)) / 4 * 4);  // 512 KiB of x
  auto work = [&](int64_t p0, int64_t p1) {  // panels [p0, p1) of NR weight rows
    const int64_t n0 = p0 * NR, n1 = std::min(N, p1 * NR);
    for (int64_t mb = 0; mb < M; mb += mblock) {
      const int64_t mr = std::min(mblock, M - mb);
      for (int64_t n = n0; n < n1; n += NR) {
        const float* bn = bias == nullptr ? nullptr : bias + n;
        const float* xm = x + mb * K;
        float* yn = y + mb * N + n;
        const int64_t nr = std::min<int64_t>(NR, n1 - n);
        if (wide) {
          dense_panel16(xm, mr, K, w + n * K, bn, yn, N, nr);
          continue;
        }
        switch (nr) {
          case 3: dense_rows<3>(xm, mr, K, w + n * K, bn, yn, N); break;
          case 2: dense_rows<2>(xm, mr, K, w + n * K, bn, yn, N); break;
          default: dense_rows<1>(xm, mr, K, w + n * K, bn, yn, N); break;
        }
      }
    }
  };
  // at least ~64K multiply-adds and 16 panels per chunk (a chunk streams its x blocks once for all its panels);
  // tiny calls stay on the calling thread
  const int64_t grain = std::max<int64_t>({int64_t{1}, (int64_t{1} << 16) / std::max<int64_t>(1, NR * K * M),
                                           std::min<int64_t>(16, (panels + 2 * nthreads - 1) / (2 * nthreads))});
  const int threads = M * N * K < (int64_t{1} << 18) ? 1 : nthreads;
  lmgen_q::parallel_chunks(panels, grain, threads, work);
}

// torch entry: x (..., K) float32 CPU, weight (N, K) float32 contiguous, bias (N,) or None -> (..., N)
inline torch::Tensor dense_linear(const torch::Tensor& x, const torch::Tensor& weight,
                                  const c10::optional<torch::Tensor>& bias, int64_t nthreads) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.device().is_cpu() && weight.scalar_type() == torch::kFloat32 &&
                        weight.is_contiguous(), "weight must be a contiguous CPU float32 (out, in) tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() >= 1 && x.size(-1) == K,
                    "x must be a CPU float32 (..., ", K, ") tensor, got ", x.sizes());
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                          bias->numel() == N, "bias must be a contiguous CPU float32 tensor of ", N, " values");
    bp = bias->data_ptr<float>();
  }
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto y = torch::empty({M, N}, x2.options());
  if (M > 0) {
    const int threads = static_cast<int>(nthreads > 0 ? nthreads : lmgen_fused::kernel_threads());
    dense_gemm(x2.data_ptr<float>(), M, K, weight.data_ptr<float>(), N, bp, y.data_ptr<float>(), threads);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

}  // namespace lmgen_dense
