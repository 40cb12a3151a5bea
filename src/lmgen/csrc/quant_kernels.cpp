// lmgen packed-weight matmul kernels (CPU, x86-64 AVX2 + FMA + F16C; AVX-512 VNNI and AMX variants picked at run
// time).
// This file: drivers, threading, Python bindings.  The kernels are in quant_kernels.h, the pool in share_pool.h.
//
// Weights stay in GGUF block quantization (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; K-quants are re-expressed in those at
// load, lmgen/layers/kquant_repack.py) and are
// multiplied directly, the way llama.cpp does on CPU: the activation row is quantized to 8-bit blocks of 32
// (one float scale per block), and each weight block's integer dot product with it is scaled by both block
// scales.  What differs from llama.cpp's ggml_vec_dot_q4_1_q8_1 is the weight layout: load time re-packs the
// blocks of 8 consecutive rows so that one 256-bit register holds 4 quants from each of the 8 rows.  A single
// broadcast of 4 activation bytes then feeds maddubs for 8 rows at once, the 8 row results land in the 8
// int32 lanes (no horizontal sums), and the 8 fp16 scales convert with one vcvtph2ps.  Repacking is a pure
// permutation: the byte count is unchanged (see _pack_r8 in quant.py).
//
// Interleaved layout ("r8"), per group of 8 rows, per block b of 32 input features:
//   Q4_0: d[8] fp16 (16 B) | q[4][8][4] (128 B)               = 144 B
//   Q4_1: d[8] fp16 | m[8] fp16 (32 B) | q[4][8][4] (128 B)   = 160 B
//   Q8_0: d[8] fp16 (16 B) | q[8][8][4] int8 (256 B)          = 272 B
// For 4-bit types q[c][r][j] is byte (4c+j) of row r's GGUF block (low nibble: element 4c+j, high nibble:
// element 16+4c+j).  For Q8_0 q[c][r][j] is element 4c+j of row r.  Groups are stored one after another,
// each group's blocks contiguously, so a group's weights stream sequentially.
//
// Batches (prefill) of r8 types use the same integer kernels with register tiles over rows of activations
// (and, with VNNI, pairs of groups), or AMX tiles of 16 rows (amx_gemm.h) where the CPU has AMX-INT8; measured
// faster than dequantize + MKL sgemm at every batch size.  Every
// output element is summed in the same order in a tile as alone, so a row's result does not depend on the
// batch (batch invariance).  Dequantizing a tile of weight rows to fp32 for at::mm is an opt-in tuning
// (r8_dequant_min_batch), never taken by a batch-invariant layer (MKL's order depends on the batch size).
// Work is split over output rows with the share pool (share_pool.h), not OpenMP.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "amx_gemm.h"
#include "attention.h"
#include "dense_gemm.h"
#include "fused_ops.h"
#include "quant_kernels.h"
#include "share_pool.h"

namespace {
using namespace lmgen_q;

// ---------------------------------------------------------------------------------------------------------
// tuning (set from Python: lmgen.model.quant.set_tuning)
// ---------------------------------------------------------------------------------------------------------
// batches of at least this many rows dequantize a tile + at::mm (never by default: the integer kernels win at any
// batch; batch-invariant layers never)
int64_t g_r8_dequant_min_batch = INT64_MAX;
int64_t g_tile_rows = 4096;        // weight rows dequantized at once on that path
int64_t g_min_units = 1024;        // work (group-blocks x batch rows) per chunk handed to a thread, ~5 us
int64_t g_spin_us = 0;             // how long idle helper threads spin before sleeping
int64_t g_parallel_min_units = 16384;  // calls with less work than this (~80 us) stay on the calling thread

int64_t g_isa = 0;                 // 0: best available, 1: AVX2 only, 2: AVX-512 VNNI without AMX

inline bool use_vnni() { return g_isa != 1 && cpu_has_vnni(); }
inline bool use_amx() { return g_isa == 0 && cpu_has_amx(); }

using lmgen_fused::kernel_threads;
inline int kernel_threads(int64_t units) { return units < g_parallel_min_units ? 1 : kernel_threads(); }

inline int64_t grain_for(int64_t units_per_item, int64_t min_units) {
  return std::max<int64_t>(1, (min_units + units_per_item - 1) / std::max<int64_t>(1, units_per_item));
}

int64_t packed_bytes(int64_t qtype, int64_t N, int64_t K) { return (N + 7) / 8 * (K / QK) * r8_block_bytes(qtype); }

void check_qtype_shape(int64_t qtype, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(is_r8(qtype), "unsupported qtype ", qtype, " (K-quants are repacked at load: kquant_repack.py)");
  TORCH_CHECK_VALUE(N > 0 && K > 0 && K % QK == 0, "bad shape (", N, ", ", K, ")");
}

void check_w(const torch::Tensor& w, int64_t expected_bytes) {
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
                    "packed weight must be a contiguous CPU uint8 tensor");
  TORCH_CHECK_VALUE(w.numel() == expected_bytes, "packed weight has ", w.numel(), " bytes, expected ", expected_bytes);
}

// per-thread scratch for the quantized activations (grows, never shrinks)
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> ds;
};
thread_local Scratch t_scratch;

// y[M, N] (row stride ldy) = x[M, K] @ W^T (+ bias), W packed r8.
void r8_gemm_into(const float* xp, int64_t M, const uint8_t* w, int64_t qtype, int64_t N, int64_t K,
                  const float* bias, float* y, int64_t ldy, int64_t min_units) {
  const int64_t nb = K / QK, G = (N + 7) / 8;
  const int64_t gbytes = nb * r8_block_bytes(qtype);
  Scratch& sc = t_scratch;
  if (static_cast<int64_t>(sc.q.size()) < M * K) sc.q.resize(M * K);
  if (static_cast<int64_t>(sc.ds.size()) < 2 * M * nb) sc.ds.resize(2 * M * nb);
  int8_t* q = sc.q.data();
  float* ds = sc.ds.data();
  auto quant_rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_act_row(xp + m * K, K, q + m * K, ds + m * nb, ds + (M + m) * nb);
  };
  if (M * K >= 32768)
    parallel_chunks(M, std::max<int64_t>(1, 16384 / K), kernel_threads(), quant_rows);
  else
    quant_rows(0, M);
  ActQ8 act_small[8];
  std::vector<ActQ8> act_big;
  ActQ8* act = act_small;
  if (M > 8) {
    act_big.resize(M);
    act = act_big.data();
  }
  for (int64_t m = 0; m < M; ++m) act[m] = {q + m * K, ds + m * nb, ds + (M + m) * nb};

  const bool vnni = use_vnni();
  // y row m, weight rows 8g..8g+7 <- v (+ bias)
  auto store = [&](int64_t g, int64_t m, __m256 v) {
    const int nvalid = static_cast<int>(std::min<int64_t>(8, N - 8 * g));
    alignas(32) float tmp[8] = {0};
    if (bias != nullptr) {
      std::memcpy(tmp, bias + 8 * g, sizeof(float) * nvalid);
      v = _mm256_add_ps(v, _mm256_load_ps(tmp));
    }
    float* yo = y + m * ldy + 8 * g;
    if (nvalid == 8) {
      _mm256_storeu_ps(yo, v);
    } else {
      _mm256_store_ps(tmp, v);
      std::memcpy(yo, tmp, sizeof(float) * nvalid);
    }
  };
  // one group, activation rows [m, M), up to 4 rows per pass
  auto group_rows = [&](int64_t g, int64_t m) {
    const uint8_t* wg = w + g * gbytes;
    while (m < M) {
      const int64_t left = M - m;
      __m256 acc[4];
      int mr;
      if (left >= 4) {
        vnni ? r8_group_vnni<4>(qtype, wg, nb, act + m, acc) : r8_group<4>(qtype, wg, nb, act + m, acc);
        mr = 4;
      } else if (left == 3) {
        vnni ? r8_group_vnni<3>(qtype, wg, nb, act + m, acc) : r8_group<3>(qtype, wg, nb, act + m, acc);
        mr = 3;
      } else if (left == 2) {
        vnni ? r8_group_vnni<2>(qtype, wg, nb, act + m, acc) : r8_group<2>(qtype, wg, nb, act + m, acc);
        mr = 2;
      } else {
        vnni ? r8_group_vnni<1>(qtype, wg, nb, act + m, acc) : r8_group<1>(qtype, wg, nb, act + m, acc);
        mr = 1;
      }
      for (int r = 0; r < mr; ++r) store(g, m + r, acc[r]);
      m += mr;
    }
  };
  // AMX: pairs of groups (16 weight rows) x 16-row tiles; the last odd or partial group and the rows past the
  // last full tile go through the kernels above
  const int64_t amx_rows = use_amx() && M >= AMX_ROWS ? M / AMX_ROWS * AMX_ROWS : 0;
  const int64_t amx_panels = amx_rows > 0 ? N / 16 : 0;
  auto amx_work = [&](int64_t p0, int64_t p1) {
    amx_gemm_panels(qtype, w, gbytes, nb, K, q, ds, ds + M * nb, amx_rows, p0, p1, y, ldy);
    if (bias != nullptr)
      for (int64_t m = 0; m < amx_rows; ++m)
        for (int64_t n = 16 * p0; n < 16 * p1; ++n) y[m * ldy + n] += bias[n];
    for (int64_t g = 2 * p0; g < 2 * p1; ++g) group_rows(g, amx_rows);
  };
  const bool tiles = vnni && M >= GEMM_MR;
  auto work = [&](int64_t g0, int64_t g1) {
    int64_t g = g0;
    if (amx_panels > 0 && g0 / 2 < std::min(g1 / 2, amx_panels)) {  // g0 is even: chunks are whole pairs
      amx_work(g0 / 2, std::min(g1 / 2, amx_panels));
      g = 2 * std::min(g1 / 2, amx_panels);
    }
    if (tiles) {
      for (; g + GEMM_NG <= g1; g += GEMM_NG) {
        int64_t m = 0;
        for (; m + GEMM_MR <= M; m += GEMM_MR) {
          __m256 out[GEMM_NG * GEMM_MR];
          gemm_tile_vnni(qtype, w + g * gbytes, gbytes, nb, act + m, out);
          for (int gg = 0; gg < GEMM_NG; ++gg)
            for (int r = 0; r < GEMM_MR; ++r) store(g + gg, m + r, out[gg * GEMM_MR + r]);
        }
        for (int gg = 0; gg < GEMM_NG; ++gg) group_rows(g + gg, m);
      }
    }
    for (; g < g1; ++g) group_rows(g, 0);
  };
  int64_t grain = grain_for(nb * M, min_units);
  // whole pairs of groups (GEMM_NG = 2); AMX chunks of ~1/8 of a thread's share (each loads the tile config)
  if (amx_panels > 0) grain = std::max(grain, G / (8 * kernel_threads()));
  if (tiles || amx_panels > 0) grain = (grain + 1) / 2 * 2;
  parallel_chunks(G, grain, kernel_threads(G * nb * M), work);
}

// rows [n0, n1) of the weight (n0 a multiple of 8) -> out (n1 - n0, K) fp32
void dequant_rows_into(const uint8_t* w, int64_t qtype, int64_t N, int64_t K, int64_t n0, int64_t n1, float* out) {
  const int64_t nb = K / QK, gbytes = nb * r8_block_bytes(qtype);
  const int64_t g0 = n0 / 8, g1 = (n1 + 7) / 8;
  parallel_chunks(g1 - g0, 16, kernel_threads(), [&](int64_t a, int64_t b) {
    for (int64_t g = g0 + a; g < g0 + b; ++g) {
      const int nvalid = static_cast<int>(std::min<int64_t>(8, n1 - 8 * g));
      r8_dequant_group(qtype, w + g * gbytes, nb, nvalid, out + (8 * g - n0) * K, K);
    }
  });
}

// x (M, K) float32 contiguous -> y (M, N)
torch::Tensor linear_2d(const torch::Tensor& x, const uint8_t* wp, int64_t qtype, int64_t N, int64_t K,
                        const c10::optional<torch::Tensor>& bias, int64_t dequant_min_batch, int64_t tile_rows,
                        int64_t min_units) {
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (M >= dequant_min_batch) {
    tile_rows = std::max<int64_t>(8, tile_rows / 8 * 8);
    const int64_t rows = std::min(N, tile_rows);
    auto wt = torch::empty({rows, K}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n1 = std::min(N, n0 + rows);
      auto wtile = wt.narrow(0, 0, n1 - n0);
      dequant_rows_into(wp, qtype, N, K, n0, n1, wtile.data_ptr<float>());
      auto ys = rows == N ? y : y.narrow(1, n0, n1 - n0);
      if (bias.has_value())
        at::addmm_out(ys, bias->narrow(0, n0, n1 - n0), x, wtile.t());
      else
        at::mm_out(ys, x, wtile.t());
    }
    return y;
  }
  r8_gemm_into(x.data_ptr<float>(), M, wp, qtype, N, K, bp, y.data_ptr<float>(), N, min_units);
  return y;
}

// (..., K) any float dtype / layout -> (M, K) float32 contiguous
torch::Tensor as_rows(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "expected input (..., ", K, "), got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "input must be on the CPU");
  torch::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
  if (x2.scalar_type() != torch::kFloat32) x2 = x2.to(torch::kFloat32);
  if (!x2.is_contiguous()) x2 = x2.contiguous();
  return x2;
}

torch::Tensor restore(torch::Tensor y, const torch::Tensor& x, int64_t N) {
  if (x.scalar_type() != torch::kFloat32) y = y.to(x.scalar_type());
  if (x.dim() != 2) {
    auto sizes = x.sizes().vec();
    sizes.back() = N;
    y = y.view(sizes);
  }
  return y;
}

// Calls of at least this many multiply-adds (a few ms: prefill, big output layers) let other Python threads run;
// shorter ones keep the GIL, since taking it back can wait out another thread's switch interval.
constexpr int64_t kReleaseGilMacs = int64_t{1} << 26;

// A packed weight and its forward; held by lmgen.model.quant.QuantizedLinear.
struct PackedLinear {
  torch::Tensor w;
  int64_t qtype, N, K;
  c10::optional<torch::Tensor> bias;
  bool batch_invariant;  // never the dequantize + at::mm path, whose summation order depends on the batch size

  PackedLinear(torch::Tensor w_, int64_t qtype_, int64_t N_, int64_t K_, c10::optional<torch::Tensor> bias_,
               bool batch_invariant_)
      : w(std::move(w_)), qtype(qtype_), N(N_), K(K_), bias(std::move(bias_)), batch_invariant(batch_invariant_) {
    check_qtype_shape(qtype, N, K);
    check_w(w, packed_bytes(qtype, N, K));
    if (bias.has_value()) {
      TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                            bias->numel() == N,
                        "bias must be a contiguous CPU float32 tensor of ", N, " values");
    }
  }

  int64_t min_batch() const { return batch_invariant ? INT64_MAX : g_r8_dequant_min_batch; }

  torch::Tensor forward(const torch::Tensor& x) const {
    const torch::Tensor x2 = as_rows(x, K);
    std::optional<pybind11::gil_scoped_release> nogil;
    if (x2.size(0) * N * K >= kReleaseGilMacs) nogil.emplace();
    torch::Tensor y = linear_2d(x2, w.data_ptr<uint8_t>(), qtype, N, K, bias, min_batch(), g_tile_rows, g_min_units);
    nogil.reset();
    return restore(std::move(y), x, N);
  }

  // explicit path choice, for benchmarks: path 0 = as tuned, 1 = integer/fused kernels, 2 = dequantize + at::mm
  torch::Tensor forward_path(const torch::Tensor& x, int64_t path, int64_t min_units) const {
    const torch::Tensor x2 = as_rows(x, K);
    const int64_t mb = path == 1 ? INT64_MAX : path == 2 ? 0 : min_batch();
    return restore(linear_2d(x2, w.data_ptr<uint8_t>(), qtype, N, K, bias, mb, g_tile_rows,
                             min_units > 0 ? min_units : g_min_units),
                   x, N);
  }

  torch::Tensor dequantize() const {
    auto out = torch::empty({N, K}, torch::kFloat32);
    dequant_rows_into(w.data_ptr<uint8_t>(), qtype, N, K, 0, N, out.data_ptr<float>());
    return out;
  }

  // ids (T,) int64 -> those rows of the weight as fp32 (T, K): the packed matrix doubles as an embedding table
  // (a tied output layer and the token embedding share one packed copy; only looked-up rows are dequantized)
  torch::Tensor rows(const torch::Tensor& ids) const {
    TORCH_CHECK_VALUE(ids.dim() == 1 && ids.scalar_type() == torch::kLong && ids.device().is_cpu(),
                      "ids must be a 1-D int64 CPU tensor");
    const torch::Tensor idc = ids.contiguous();
    const int64_t T = idc.size(0);
    const int64_t* id = idc.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK_INDEX(id[t] >= 0 && id[t] < N, "token id ", id[t], " is out of range [0, ", N, ")");
    auto out = torch::empty({T, K}, torch::kFloat32);
    float* o = out.data_ptr<float>();
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const int64_t nb = K / QK, gbytes = nb * r8_block_bytes(qtype);
    for (int64_t t = 0; t < T; ++t)
      r8_dequant_row(qtype, wp + id[t] / 8 * gbytes, nb, static_cast<int>(id[t] % 8), o + t * K);
    return out;
  }
};

}  // namespace

// x (M, K) -> (q int8 (M, K), d (M, K/32), s (M, K/32)); exposed for tests
std::vector<torch::Tensor> quantize_activations(const torch::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) % QK == 0, "x must be (M, K) with K % 32 == 0");
  const torch::Tensor x2 = as_rows(x, x.size(1));
  const int64_t M = x2.size(0), K = x2.size(1), nb = K / QK;
  auto q = torch::empty({M, K}, torch::kInt8);
  auto d = torch::empty({M, nb}, torch::kFloat32), s = torch::empty({M, nb}, torch::kFloat32);
  for (int64_t m = 0; m < M; ++m)
    quantize_act_row(x2.data_ptr<float>() + m * K, K, q.data_ptr<int8_t>() + m * K, d.data_ptr<float>() + m * nb,
                     s.data_ptr<float>() + m * nb);
  return {q, d, s};
}

// benchmark baseline: llama.cpp-style dot products on the raw GGUF layout (Q4_1 / Q8_0), x (1, K)
torch::Tensor raw_gemv(const torch::Tensor& x, const torch::Tensor& raw, int64_t qtype, int64_t N, int64_t K,
                       int64_t min_units) {
  TORCH_CHECK_VALUE(qtype == T_Q4_1 || qtype == T_Q8_0, "raw_gemv: Q4_1 or Q8_0 only");
  const torch::Tensor x2 = as_rows(x, K);
  TORCH_CHECK_VALUE(x2.size(0) == 1, "raw_gemv: batch 1 only");
  const int64_t nb = K / QK, bpr = nb * (qtype == T_Q4_1 ? 20 : 34);
  check_w(raw, N * bpr);
  Scratch& sc = t_scratch;
  if (static_cast<int64_t>(sc.q.size()) < K) sc.q.resize(K);
  if (static_cast<int64_t>(sc.ds.size()) < 2 * nb) sc.ds.resize(2 * nb);
  quantize_act_row(x2.data_ptr<float>(), K, sc.q.data(), sc.ds.data(), sc.ds.data() + nb);
  const ActQ8 a{sc.q.data(), sc.ds.data(), sc.ds.data() + nb};
  auto y = torch::empty({1, N}, x2.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = raw.data_ptr<uint8_t>();
  auto work = [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      yp[n] = qtype == T_Q4_1 ? raw_dot_q4_1(wp + n * bpr, nb, a) : raw_dot_q8_0(wp + n * bpr, nb, a);
  };
  parallel_chunks(N, grain_for(nb, min_units * 8), kernel_threads(N * nb / 8), work);
  return y;
}

// dense_gemm.h's fixed-order matmul; long calls (prefill) let other Python threads run
torch::Tensor dense_linear_nogil(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                                 int64_t threads) {
  std::optional<pybind11::gil_scoped_release> nogil;
  if (x.numel() * w.size(0) >= kReleaseGilMacs) nogil.emplace();
  return lmgen_dense::dense_linear(x, w, bias, threads);
}

// attention.h's paged attention; long calls (prefill) let other Python threads run
torch::Tensor paged_attention_nogil(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                    torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                    const torch::Tensor& kv_index, const torch::Tensor& token_seq,
                                    const torch::Tensor& token_kv_start, const torch::Tensor& token_kv_len, int64_t heads,
                                    int64_t kv_heads, double scale) {
  std::optional<pybind11::gil_scoped_release> nogil;
  if (qkv.size(0) * kv_index.size(1) * qkv.size(1) >= kReleaseGilMacs) nogil.emplace();
  return lmgen_attn::paged_attention(qkv, cos, sin, k_cache, v_cache, slots, kv_index, token_seq, token_kv_start,
                                     token_kv_len, heads, kv_heads, scale);
}

void set_tuning(int64_t r8_dequant_min_batch, int64_t tile_rows, int64_t min_units, int64_t parallel_min_units,
                int64_t threads, int64_t spin_us, int64_t isa) {
  g_parallel_min_units = std::max<int64_t>(0, parallel_min_units);
  g_isa = isa;
  g_r8_dequant_min_batch = r8_dequant_min_batch > 0 ? r8_dequant_min_batch : INT64_MAX;
  g_tile_rows = std::max<int64_t>(8, tile_rows);
  g_min_units = std::max<int64_t>(1, min_units);
  SharePool::instance().set_threads(threads);
  g_spin_us = std::max<int64_t>(0, spin_us);
  SharePool::instance().set_spin_us(g_spin_us);
}

std::vector<int64_t> get_tuning() {
  return {g_r8_dequant_min_batch, g_tile_rows, g_min_units, g_parallel_min_units, SharePool::instance().threads(),
          g_spin_us, g_isa};
}

std::string kernel_isa() { return use_amx() ? "amx-int8" : use_vnni() ? "avx512vnni" : "avx2"; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<PackedLinear>(m, "PackedLinear")
      .def(pybind11::init<torch::Tensor, int64_t, int64_t, int64_t, c10::optional<torch::Tensor>, bool>(),
           "packed weight (flat uint8), qtype (GGML id), out_features, in_features, bias or None, batch_invariant")
      .def("__call__", &PackedLinear::forward, "x (..., in) -> (..., out)")
      .def("forward_path", &PackedLinear::forward_path, "x, path (0 tuned, 1 integer kernels, 2 dequant+mm), min_units")
      .def("dequantize", &PackedLinear::dequantize, "the weight as fp32 (out, in)")
      .def("rows", &PackedLinear::rows, "ids (T,) int64 -> those rows of the weight as fp32 (T, in)");
  m.def("packed_bytes", &packed_bytes, "bytes of a packed (N, K) weight of a qtype");
  m.def("quantize_activations", &quantize_activations, "x (M, K) -> int8 blocks of 32, scales, scaled sums");
  m.def("raw_gemv", &raw_gemv, "benchmark baseline: llama.cpp-style dot products on raw GGUF rows");
  m.def("set_tuning", &set_tuning,
        "r8_dequant_min_batch (0: never), tile_rows, min_units, parallel_min_units, "
        "threads (0: torch's), spin_us, isa (0 auto, 1 avx2, 2 avx512vnni without AMX)");
  m.def("get_tuning", &get_tuning, "the values set_tuning takes, in order (INT64_MAX for never)");
  m.def("kernel_isa", &kernel_isa, "instruction set the integer kernels use now");
  // fused float32 decode-step ops (fused_ops.h), used by lmgen.model.transformer on CPU
  m.def("rms_norm", &lmgen_fused::rms_norm, "x (M, H), weight (H,), eps -> RMSNorm(x) (M, H)");
  m.def("qk_rms_norm", &lmgen_fused::qk_rms_norm,
        "qkv (T, (H + 2 KVH) D), q_w, k_w (D,), heads, kv_heads, eps -> q and k heads RMS-normed, v copied");
  m.def("add_rms_norm", &lmgen_fused::add_rms_norm, "x, delta (M, H), weight, eps -> (x + delta, RMSNorm(x + delta))");
  m.def("silu_mul", &lmgen_fused::silu_mul, "gate_up (M, 2I), I -> silu(gate) * up (M, I)");
  m.def("argmax_rows", &lmgen_fused::argmax_rows, "logits (M, V) float32 -> (M,) int64: torch.argmax's index per row");
  m.def("gelu_tanh_mul", &lmgen_fused::gelu_tanh_mul, "gate_up (M, 2I), I -> gelu_tanh(gate) * up (M, I)");
  m.def("paged_attention", &paged_attention_nogil,
        "qkv (T, (H+2KVH)D), cos, sin (T, D), k_cache, v_cache (blocks, KVH, block_size, D) float32/float16/bfloat16 "
        "or int8 rows (D + D/16 bytes), "
        "slots (T,), kv_index (B, max_kv), "
        "token_seq, token_kv_start, token_kv_len (T,), heads, kv_heads, scale -> (T, H D); writes K/V at slots, "
        "then each token attends over kv_index[token_seq, start:start+len] (attention.h)");
  m.def("dense_linear", &dense_linear_nogil,
        "x (..., K) float32, weight (N, K) float32, bias (N,) or None, threads (0: torch's) -> x W^T + b in a "
        "fixed summation order (dense_gemm.h)");
}
