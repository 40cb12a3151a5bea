// Paged attention over the KV cache for any mix of prefill chunks and decode tokens (CPU), with RoPE and the K/V
// write: lmgen.layers.attention's fused backend for every step.
//
//   paged_attention(qkv, cos, sin, k_cache, v_cache, slots, kv_index, token_seq, token_kv_start, token_kv_len,
//                   heads, kv_heads, scale)
//     qkv (T, (heads + 2 kv_heads) D) float32, the step's projected tokens; cos/sin (T, D) their RoPE rows;
//     k_cache/v_cache (blocks, kv_heads, block_size, W) of float32, float16 or bfloat16 (W = D) or int8 rows with
//     their scales (W = D + D / 16, kv_tile.h): a cache slot s is
//     position s % block_size of block s / block_size, so one block's rows of one head are contiguous;
//     slots (T,) where each token's K/V goes; kv_index (B, max_kv) the cache slots of each sequence's context in
//     position order; token_seq (T,) each token's sequence; token_kv_start / token_kv_len (T,) the span of its
//     sequence's kv_index row the token sees (causal, and the sliding window when there is one)
//     -> out (T, heads D) float32
//
// How: flash-style (no score matrix): a token's span is cut into splits of kSplit positions, each split into
// tiles of kBlock positions; a tile's K/V rows of one KV head are converted to float32 once and serve every query
// head of the group (GQA) and, in a prefill, up to kTileQ consecutive tokens of the same sequence.  Each split
// runs the online softmax from a fresh state; the splits' states are then merged left to right.
//
// Batch invariance: the split and tile boundaries are fixed offsets from the token's span start, and every
// number a token's result depends on is computed by the same code in the same order whether the token is decoded
// alone, next to other sequences, or inside a prefill chunk of any size; threads only take whole (tile, KV head)
// or (tile, KV head, split) items.  One long sequence is spread over the threads by its splits.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fused_ops.h"
#include "kv_tile.h"
#include "share_pool.h"

namespace lmgen_attn {

constexpr int64_t kBlock = 32;   // positions per online-softmax step (one K/V tile), at most
constexpr int64_t kSplit = 512;  // positions per split of a span (a multiple of kBlock)
constexpr int64_t kTileQ = 16;   // prefill tokens of one sequence sharing each K/V tile

// positions per tile for a head of D values: 32, or 16 above D = 128 so that a tile's float32 K and V (2 x 16 x 256
// x 4 bytes) stay in a 48 KB L1 while every query row of the group and chunk reads them
inline int64_t tile_positions(int64_t D) { return D > 128 ? kBlock / 2 : kBlock; }

template <typename T>
struct Cache {
  const T *k, *v;
  int64_t kv_heads, bs, D;
  int shift;  // log2(bs) when bs is a power of two (shifts, not a 64-bit division per position read), else -1
  int64_t row;  // elements per cache row: D, or D + D / 16 for int8 rows with their scales
  int64_t off(int64_t slot, int64_t g) const {
    const int64_t b = shift >= 0 ? slot >> shift : slot / bs, r = shift >= 0 ? slot & (bs - 1) : slot % bs;
    return ((b * kv_heads + g) * bs + r) * row;
  }
};

struct Row {  // one query head of one token in tile_split: its rotated q, its state [m, l, acc(D)], positions seen
  const float* q;
  float* st;
  int64_t n;
};

// The tokens [t0, t0 + nt) (one sequence, one span start; idx: their kv_index row from that start, lens their span
// lengths) over split s of KV head g: each token whose span reaches the split gets, per query head of the group,
// the split's state [m, l, acc(D)] in dst[i] + head * (D + 2).
template <typename T>
void tile_split(const Cache<T>& c, const float* qr, int64_t heads, int64_t group, const int64_t* idx,
                const int64_t* lens, int64_t t0, int64_t nt, int64_t g, int64_t s, float sc, float* const* dst,
                float* kt, float* vt, float* scratch, std::vector<Row>& rows) {
  const int64_t D = c.D;
  int64_t jmax = 0;
  for (int64_t i = 0; i < nt; ++i) jmax = std::max(jmax, lens[i]);
  const int64_t jb = s * kSplit, je = std::min(jb + kSplit, jmax);
  for (int64_t i = 0; i < nt; ++i)
    if (lens[i] > jb)
      for (int64_t hl = 0; hl < group; ++hl) init_state(dst[i] + hl * (D + 2), D);
  const int64_t blk = tile_positions(D);
  for (int64_t j0 = jb; j0 < je; j0 += blk) {
    const int64_t n = std::min(blk, je - j0);
    for (int64_t j = 0; j < n; ++j) {
      if (j0 + blk + j < je) {  // the next tile's rows, while this one converts (a deep decode step is a stream)
        const int64_t po = c.off(idx[j0 + blk + j], g);
        lmgen_q::prefetch_lines(c.k + po, c.row * sizeof(T));
        lmgen_q::prefetch_lines(c.v + po, c.row * sizeof(T));
      }
      const int64_t o = c.off(idx[j0 + j], g);
      to_f32(c.k + o, D, kt + j * D);
      to_f32(c.v + o, D, vt + j * D);
    }
    // the (token, head) rows that see this tile, in order; two rows with the same number of visible positions
    // (the heads of a GQA group, tokens past the causal diagonal) share each K/V load
    rows.clear();
    for (int64_t i = 0; i < nt; ++i)
      if (lens[i] > j0)
        for (int64_t hl = 0; hl < group; ++hl)
          rows.push_back({qr + ((t0 + i) * heads + g * group + hl) * D, dst[i] + hl * (D + 2),
                          std::min(n, lens[i] - j0)});
    for (size_t r = 0; r < rows.size();) {
      const Row& a = rows[r];
      if (r + 1 < rows.size() && rows[r + 1].n == a.n) {
        block_update2(a.q, rows[r + 1].q, kt, vt, a.n, D, sc, a.st, rows[r + 1].st, scratch);
        r += 2;
      } else {
        block_update(a.q, kt, vt, a.n, D, sc, a.st, scratch);
        r += 1;
      }
    }
  }
}

template <typename T>
void attend_tokens(const Cache<T>& c, const float* qr, int64_t T_, int64_t heads, const int64_t* kvi, int64_t max_kv,
                   const int64_t* seq, const int64_t* kv0, const int64_t* kvn, float sc, float* op) {
  const int64_t D = c.D, kvh = c.kv_heads, group = heads / kvh, hs = D + 2;
  auto nsplit = [&](int64_t t) { return (kvn[t] + kSplit - 1) / kSplit; };
  // tiles: runs of consecutive tokens of one sequence with one span start (a prefill chunk), at most kTileQ
  std::vector<int64_t> tiles{0};
  for (int64_t t = 1; t < T_; ++t)
    if (seq[t] != seq[t - 1] || kv0[t] != kv0[t - 1] || t - tiles.back() >= kTileQ) tiles.push_back(t);
  tiles.push_back(T_);
  const int64_t ntiles = static_cast<int64_t>(tiles.size()) - 1;
  std::vector<int64_t> poff(T_ + 1, 0), tile_splits(ntiles, 0);  // token t's splits: parts rows poff[t]..poff[t+1)
  int64_t work = 0, most = 0;
  for (int64_t t = 0; t < T_; ++t) {
    poff[t + 1] = poff[t] + nsplit(t);
    work += kvn[t];
  }
  for (int64_t b = 0; b < ntiles; ++b) {
    for (int64_t t = tiles[b]; t < tiles[b + 1]; ++t) tile_splits[b] = std::max(tile_splits[b], nsplit(t));
    most = std::max(most, tile_splits[b]);
  }
  // by split (items (tile, KV head, split), states kept in `parts`, then merged) when some span has several splits
  // and the states are small; else items (tile, KV head), merging each split's state as it is done
  const bool by_split = most > 1 && poff[T_] * heads * hs <= (int64_t{1} << 21);
  std::vector<float> parts(by_split ? poff[T_] * heads * hs : 0);
  std::vector<int64_t> item_tile, item_split;
  for (int64_t b = 0; b < ntiles; ++b)
    for (int64_t s = 0; s < (by_split ? tile_splits[b] : 1); ++s) {
      item_tile.push_back(b);
      item_split.push_back(s);
    }
  const int64_t nitems = static_cast<int64_t>(item_tile.size()) * kvh;
  auto run = [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> kt, vt, scratch, local;  // per-thread scratch, kept between calls
    thread_local std::vector<Row> rows;
    kt.resize(kBlock * D);
    vt.resize(kBlock * D);
    scratch.resize(2 * kBlock);
    local.resize(2 * kTileQ * group * hs);
    float* dst[kTileQ];
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = item_tile[it / kvh], g = it % kvh, t0 = tiles[b], nt = tiles[b + 1] - t0;
      const int64_t* idx = kvi + seq[t0] * max_kv + kv0[t0];
      if (by_split) {
        const int64_t s = item_split[it / kvh];
        for (int64_t i = 0; i < nt; ++i) dst[i] = parts.data() + ((poff[t0 + i] + s) * heads + g * group) * hs;
        tile_split(c, qr, heads, group, idx, kvn + t0, t0, nt, g, s, sc, dst, kt.data(), vt.data(), scratch.data(),
                   rows);
        continue;
      }
      float *run_st = local.data(), *part = local.data() + kTileQ * group * hs;
      for (int64_t i = 0; i < nt * group; ++i) init_state(run_st + i * hs, D);
      for (int64_t i = 0; i < nt; ++i) dst[i] = part + i * group * hs;
      for (int64_t s = 0; s < tile_splits[b]; ++s) {
        tile_split(c, qr, heads, group, idx, kvn + t0, t0, nt, g, s, sc, dst, kt.data(), vt.data(), scratch.data(),
                   rows);
        for (int64_t i = 0; i < nt; ++i)
          if (kvn[t0 + i] > s * kSplit)
            for (int64_t hl = 0; hl < group; ++hl) merge_state(run_st + (i * group + hl) * hs, dst[i] + hl * hs, D);
      }
      for (int64_t i = 0; i < nt; ++i)
        for (int64_t hl = 0; hl < group; ++hl)
          finish_state(run_st + (i * group + hl) * hs, D, op + ((t0 + i) * heads + g * group + hl) * D);
    }
  };
  // decode-size steps stay on the calling thread (waking helpers costs more than a few microseconds of work);
  // larger ones share items through lmgen_q's pool (no OpenMP barrier: a helper descheduled on a busy machine
  // costs nothing, see share_pool.h)
  if (work * heads * D >= (int64_t{1} << 18)) lmgen_q::parallel_chunks(nitems, 1, lmgen_fused::kernel_threads(), run);
  else run(0, nitems);
  if (!by_split) return;
  std::vector<float> st(hs);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      init_state(st.data(), D);
      for (int64_t s = poff[t]; s < poff[t + 1]; ++s) merge_state(st.data(), parts.data() + (s * heads + h) * hs, D);
      finish_state(st.data(), D, op + (t * heads + h) * D);
    }
}

// RoPE on q (into qr) and k, K/V written to the cache at `slot` (before any token reads the cache)
template <typename T>
void write_kv(const float* qp, const float* cp, const float* sp, const int64_t* slot, int64_t T_, int64_t heads,
              T* kc, T* vc, const Cache<T>& c, float* qr) {
  const int64_t D = c.D, kvh = c.kv_heads, row = (heads + 2 * kvh) * D;
  std::vector<float> tmp(D);
  for (int64_t t = 0; t < T_; ++t) {
    const float *x = qp + t * row, *cs = cp + t * D, *sn = sp + t * D;
    for (int64_t h = 0; h < heads; ++h) lmgen_fused::rope_head(x + h * D, cs, sn, D, qr + (t * heads + h) * D);
    for (int64_t g = 0; g < kvh; ++g) {
      lmgen_fused::rope_head(x + (heads + g) * D, cs, sn, D, tmp.data());
      from_f32(tmp.data(), D, kc + c.off(slot[t], g));
      from_f32(x + (heads + kvh + g) * D, D, vc + c.off(slot[t], g));
    }
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
  const auto kind = k_cache.scalar_type();
  TORCH_CHECK_VALUE(kind == torch::kFloat32 || kind == torch::kFloat16 || kind == torch::kBFloat16 ||
                        kind == torch::kInt8,
                    "the KV cache must be float32, float16, bfloat16 or int8");
  for (const auto* t : {&k_cache, &v_cache})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == kind,
                      "k_cache and v_cache must be contiguous CPU tensors of one dtype");
  TORCH_CHECK_VALUE(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(1) % (heads + 2 * kv_heads) == 0, "qkv must be (T, (H + 2 KVH) D)");
  const int64_t T = qkv.size(0), D = qkv.size(1) / (heads + 2 * kv_heads), bs = k_cache.size(2);
  const int64_t S = k_cache.size(0) * bs, row = kind == torch::kInt8 ? D + D / 16 : D;
  TORCH_CHECK_VALUE(D % 2 == 0 && (kind != torch::kInt8 || D % 32 == 0),
                    "head_dim must be even (a multiple of 32 for the int8 cache)");
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(1) == kv_heads && k_cache.size(3) == row &&
                        v_cache.sizes() == k_cache.sizes(),
                    "caches must be (blocks, kv_heads, block_size, head_dim (+ head_dim / 16 for int8))");
  TORCH_CHECK_VALUE(cos.numel() == T * D && sin.numel() == T * D, "cos/sin must be (T, D)");
  for (const auto* t : {&slots, &kv_index, &token_seq, &token_kv_start, &token_kv_len})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                      "index tensors must be contiguous CPU int64");
  TORCH_CHECK_VALUE(slots.numel() == T && token_seq.numel() == T && token_kv_start.numel() == T &&
                        token_kv_len.numel() == T && kv_index.dim() == 2,
                    "slots, token_seq, token_kv_start, token_kv_len (T,); kv_index (B, max_kv)");
  const int64_t B = kv_index.size(0), max_kv = kv_index.size(1);
  const int64_t *slot = slots.data_ptr<int64_t>(), *kvi = kv_index.data_ptr<int64_t>();
  const int64_t *seq = token_seq.data_ptr<int64_t>(), *kv0 = token_kv_start.data_ptr<int64_t>(),
                *kvn = token_kv_len.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(slot[t] >= 0 && slot[t] < S, "slot ", slot[t], " out of range");
    TORCH_CHECK_VALUE(seq[t] >= 0 && seq[t] < B && kvn[t] >= 1 && kv0[t] >= 0 && kv0[t] + kvn[t] <= max_kv,
                      "token ", t, ": sequence / kv span out of range");
  }
  for (int64_t j = 0; j < B * max_kv; ++j) TORCH_CHECK_VALUE(kvi[j] >= 0 && kvi[j] < S, "kv_index out of range");
  auto q = torch::empty({T, heads * D}, qkv.options()), out = torch::empty({T, heads * D}, qkv.options());
  const float *qp = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float *qr = q.data_ptr<float>(), *op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  auto go = [&](auto* kc, auto* vc) {
    using E = std::remove_pointer_t<decltype(kc)>;
    int shift = -1;
    for (int i = 0; i < 62; ++i)
      if ((int64_t{1} << i) == bs) shift = i;
    const Cache<E> c{kc, vc, kv_heads, bs, D, shift, row};
    write_kv(qp, cp, sp, slot, T, heads, kc, vc, c, qr);
    attend_tokens(c, qr, T, heads, kvi, max_kv, seq, kv0, kvn, sc, op);
  };
  if (kind == torch::kFloat32) go(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else if (kind == torch::kFloat16) go(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else if (kind == torch::kBFloat16) go(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  else go(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
  return out;
}

}  // namespace lmgen_attn
