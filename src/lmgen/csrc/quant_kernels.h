// lmgen packed-weight kernels: per-group dot products, activation quantization, dequantization.
// Plain C++ + x86 intrinsics (no torch), so benchmarks can drive it standalone; see quant_kernels.cpp.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lmgen_q {

constexpr int64_t QK = 32;     // elements per Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 block

// GGML type ids (gguf.GGMLQuantizationType values)
enum : int64_t { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8 };

inline int64_t r8_block_bytes(int64_t qtype) {
  switch (qtype) {
    case T_Q4_0: return 144;
    case T_Q4_1: return 160;
    case T_Q5_0: return 176;
    case T_Q5_1: return 192;
    case T_Q8_0: return 272;
    default: return 0;
  }
}

inline bool is_r8(int64_t qtype) { return r8_block_bytes(qtype) != 0; }

inline float fp16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Software prefetch of the weight stream, kPrefetchBytes ahead of the block being multiplied (into L1), for the
// one-group kernels below: a decode step streams every weight once from DRAM, and the hardware prefetchers alone
// left the read at ~17 GB/s where these prefetches reach ~27 GB/s (Gemma 3's 178 MB Q8_0 output layer, one token:
// 10.4 -> 6.3 ms on 2 threads; 1, 8 and 16 KB ahead measured 10.2, 8.1 and 7.9 ms).  A prefetch past the end
// of the weight is harmless (prefetches do not fault).
constexpr int64_t kPrefetchBytes = 4096;

// the cache lines of [p, p + bytes) into L1 (software prefetches: no fault, no effect on values)
inline void prefetch_lines(const void* p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) _mm_prefetch(static_cast<const char*>(p) + c, _MM_HINT_T0);
}

template <int64_t BYTES>
inline void prefetch_block(const uint8_t* blk) { prefetch_lines(blk + kPrefetchBytes, BYTES); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum8_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// ---------------------------------------------------------------------------------------------------------
// Activation quantization: one row of K floats -> K int8 (blocks of 32, symmetric, scale = amax / 127),
// d[b] = block scale, s[b] = d[b] * sum(q in block) (used by the Q4_0 offset and the Q4_1 min term).
// Rounding is to nearest (even); |q| <= 127, which keeps every int16 partial sum below in range.
// ---------------------------------------------------------------------------------------------------------
inline void quantize_act_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_mask, v0), _mm256_andnot_ps(sign_mask, v1)),
                                _mm256_max_ps(_mm256_andnot_ps(sign_mask, v2), _mm256_andnot_ps(sign_mask, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float am = _mm_cvtss_f32(m4);
    const float dd = am / 127.0f;
    const float id = am > 0.0f ? 127.0f / am : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), R));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), R));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), R));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), R));
    const int32_t isum = hsum8_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), p);
    d[b] = dd;
    s[b] = dd * static_cast<float>(isum);
  }
}

struct ActQ8 {
  const int8_t* q;
  const float* d;
  const float* s;
};

// ---------------------------------------------------------------------------------------------------------
// r8 kernels: one group of 8 weight rows x MR activation rows; acc[r] lane i = output (act row r, weight row i)
// ---------------------------------------------------------------------------------------------------------
// Byte layout of one r8 block (8 rows x 32 values) of the nibble types (see quant.py's _pack_r8):
//   d[8] fp16 | m[8] fp16 (Q4_1, Q5_1) | hb[8] u32 (Q5_0, Q5_1) | q[4][8][4] nibbles
// Q5 values are nibble | (high bit << 4), 0..31; the high bits of row r sit in hb[r] so that byte j of the
// word has, at bit c, the high bit of value 4c+j (low nibble of q[c][r][j]) and, at bit 4+c, that of value
// 16+4c+j (its high nibble): one shift and mask per chunk move them to bit 4 of each byte.
template <int64_t QT>
struct NibbleLayout {
  static constexpr bool has_min = QT == T_Q4_1 || QT == T_Q5_1;
  static constexpr bool five = QT == T_Q5_0 || QT == T_Q5_1;
  static constexpr int64_t hoff = has_min ? 32 : 16;          // high-bit words (Q5)
  static constexpr int64_t qoff = hoff + (five ? 32 : 0);     // nibbles
  static constexpr int64_t bb = qoff + 128;                   // bytes per block of the 8-row group
  static constexpr float offset = five ? -16.0f : -8.0f;      // Q4_0 / Q5_0: value = d (q - offset)
};

// chunk c of the nibbles v (32 bytes: 4 of each row) -> 5-bit (Q5) or 4-bit values, low and high halves
template <bool FIVE>
inline void nibble_chunk(__m256i v, __m256i hb, int c, __m256i* lo, __m256i* hi) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  *lo = _mm256_and_si256(v, m4);
  *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  if (FIVE) {
    const __m256i b4 = _mm256_set1_epi8(0x10);
    *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_sll_epi16(hb, _mm_cvtsi32_si128(4 - c)), b4));
    *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(c)), b4));
  }
}

// a nibble block's per-row min / offset term (8 lanes): its stored mins (Q4_1, Q5_1) or offset x d (Q4_0, Q5_0)
template <int64_t QT>
inline __m256 nibble_min_term(const uint8_t* blk, __m256 dw) {
  using L = NibbleLayout<QT>;
  return L::has_min ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))
                    : _mm256_mul_ps(dw, _mm256_set1_ps(L::offset));
}

template <int MR, int64_t QT>
inline void r8_q4_group(const uint8_t* wg, int64_t nb, const ActQ8* act, __m256* acc) {
  using L = NibbleLayout<QT>;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 accm[MR];  // min / offset term, kept apart to shorten the loop-carried FMA chain
  for (int r = 0; r < MR; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wg + b * L::bb;
    prefetch_block<L::bb>(blk);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 mw = nibble_min_term<QT>(blk, dw);
    const __m256i hb = L::five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + L::hoff)) : _mm256_setzero_si256();
    const uint8_t* q = blk + L::qoff;
    __m256i lo[4], hi[4];
    for (int c = 0; c < 4; ++c)
      nibble_chunk<L::five>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c)), hb, c, lo + c, hi + c);
    for (int r = 0; r < MR; ++r) {
      const int8_t* xa = act[r].q + b * QK;
      // value (0..15 or 0..31) x int8 (|q| <= 127) pairs: |4 maddubs lanes| <= 4 * 2 * 31 * 127 = 31496, fits int16
      // (4-bit: sa + sb <= 30480 fits too; 5-bit: widened apart)
      __m256i sa = _mm256_maddubs_epi16(lo[0], _mm256_set1_epi32(load_i32(xa)));
      __m256i sb = _mm256_maddubs_epi16(hi[0], _mm256_set1_epi32(load_i32(xa + 16)));
      for (int c = 1; c < 4; ++c) {
        sa = _mm256_add_epi16(sa, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(load_i32(xa + 4 * c))));
        sb = _mm256_add_epi16(sb, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(load_i32(xa + 16 + 4 * c))));
      }
      const __m256i s32 = L::five ? _mm256_add_epi32(_mm256_madd_epi16(sa, ones), _mm256_madd_epi16(sb, ones))
                                  : _mm256_madd_epi16(_mm256_add_epi16(sa, sb), ones);
      const __m256 p = _mm256_cvtepi32_ps(s32);
      // with min: sum_j (d q_j + m) x_j ~= d dx sum(q qx) + m sx;  without: d dx sum(q qx) + offset d sx
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(act[r].d[b])), p, acc[r]);
      accm[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(act[r].s[b]), accm[r]);
    }
  }
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(acc[r], accm[r]);
}

template <int MR>
inline void r8_q8_group(const uint8_t* wg, int64_t nb, const ActQ8* act, __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wg + b * 272;
    prefetch_block<272>(blk);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const uint8_t* q = blk + 16;
    __m256i s32[MR];
    for (int r = 0; r < MR; ++r) s32[r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c));
      const __m256i aw = _mm256_sign_epi8(w, w);  // |w| (as unsigned: -128 -> 128)
      for (int r = 0; r < MR; ++r) {
        const __m256i xa = _mm256_set1_epi32(load_i32(act[r].q + b * QK + 4 * c));
        // |pair sum| <= 2 * 128 * 127 = 32512: fits int16; widen right away
        const __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xa, w));
        s32[r] = _mm256_add_epi32(s32[r], _mm256_madd_epi16(p16, ones));
      }
    }
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(act[r].d[b])), _mm256_cvtepi32_ps(s32[r]), acc[r]);
  }
}

template <int MR>
inline void r8_group(int64_t qtype, const uint8_t* wg, int64_t nb, const ActQ8* act, __m256* acc) {
  switch (qtype) {
    case T_Q8_0: r8_q8_group<MR>(wg, nb, act, acc); break;
    case T_Q4_1: r8_q4_group<MR, T_Q4_1>(wg, nb, act, acc); break;
    case T_Q5_0: r8_q4_group<MR, T_Q5_0>(wg, nb, act, acc); break;
    case T_Q5_1: r8_q4_group<MR, T_Q5_1>(wg, nb, act, acc); break;
    default: r8_q4_group<MR, T_Q4_0>(wg, nb, act, acc);
  }
}

// AVX-512 VNNI variants (256-bit vpdpbusd: u8 x s8, 4 products summed into each int32 lane, no int16
// saturation), compiled for that target only and chosen at run time (cpu_has_vnni()).
#define LMGEN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

inline bool cpu_has_vnni() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

template <int MR, int64_t QT>
LMGEN_VNNI inline void r8_q4_group_vnni(const uint8_t* wg, int64_t nb, const ActQ8* act, __m256* acc) {
  using L = NibbleLayout<QT>;
  __m256 accm[MR];
  for (int r = 0; r < MR; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wg + b * L::bb;
    prefetch_block<L::bb>(blk);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 mw = nibble_min_term<QT>(blk, dw);
    const __m256i hb = L::five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + L::hoff)) : _mm256_setzero_si256();
    const uint8_t* q = blk + L::qoff;
    __m256i lo[4], hi[4];
    for (int c = 0; c < 4; ++c)
      nibble_chunk<L::five>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c)), hb, c, lo + c, hi + c);
    for (int r = 0; r < MR; ++r) {
      const int8_t* xa = act[r].q + b * QK;
      __m256i sa = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo[0], _mm256_set1_epi32(load_i32(xa)));
      __m256i sb = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi[0], _mm256_set1_epi32(load_i32(xa + 16)));
      for (int c = 1; c < 4; ++c) {
        sa = _mm256_dpbusd_epi32(sa, lo[c], _mm256_set1_epi32(load_i32(xa + 4 * c)));
        sb = _mm256_dpbusd_epi32(sb, hi[c], _mm256_set1_epi32(load_i32(xa + 16 + 4 * c)));
      }
      const __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(sa, sb));
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(act[r].d[b])), p, acc[r]);
      accm[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(act[r].s[b]), accm[r]);
    }
  }
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(acc[r], accm[r]);
}

template <int MR>
LMGEN_VNNI inline void r8_q8_group_vnni(const uint8_t* wg, int64_t nb, const ActQ8* act, __m256* acc) {
  // vpdpbusd wants unsigned weights: sum (w + 128) x = sum w x + 128 sum x, and 128 dx sum(qx) = 128 sx
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 accm[MR];
  for (int r = 0; r < MR; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wg + b * 272;
    prefetch_block<272>(blk);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 mw = _mm256_mul_ps(dw, _mm256_set1_ps(-128.0f));
    const uint8_t* q = blk + 16;
    __m256i s32[MR];
    for (int r = 0; r < MR; ++r) s32[r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c)), bias);
      for (int r = 0; r < MR; ++r)
        s32[r] = _mm256_dpbusd_epi32(s32[r], u, _mm256_set1_epi32(load_i32(act[r].q + b * QK + 4 * c)));
    }
    for (int r = 0; r < MR; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(act[r].d[b])), _mm256_cvtepi32_ps(s32[r]), acc[r]);
      accm[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(act[r].s[b]), accm[r]);
    }
  }
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(acc[r], accm[r]);
}

template <int MR>
LMGEN_VNNI void r8_group_vnni(int64_t qtype, const uint8_t* wg, int64_t nb, const ActQ8* act, __m256* acc) {
  switch (qtype) {
    case T_Q8_0: r8_q8_group_vnni<MR>(wg, nb, act, acc); break;
    case T_Q4_1: r8_q4_group_vnni<MR, T_Q4_1>(wg, nb, act, acc); break;
    case T_Q5_0: r8_q4_group_vnni<MR, T_Q5_0>(wg, nb, act, acc); break;
    case T_Q5_1: r8_q4_group_vnni<MR, T_Q5_1>(wg, nb, act, acc); break;
    default: r8_q4_group_vnni<MR, T_Q4_0>(wg, nb, act, acc);
  }
}

// GEMM micro-kernels for batches (prefill), VNNI only: NG consecutive 8-row groups x MR activation rows.
// Each activation broadcast feeds NG groups and each unpacked weight register feeds MR rows; with AVX-512VL's
// 32 vector registers NG = 2, MR = 6 keeps all accumulators in registers (~1.5x the MR-only kernel).
// out[g * MR + r] lane i = output (activation row r, weight row 8 (g0 + g) + i).
//
// Batch invariance: every output element is summed in exactly the order of the single-row kernels above
// (r8_q4_group_vnni / r8_q8_group_vnni): the scale term d_w d_x sum(q_w q_x) in one FMA chain over the blocks,
// the min / offset term m_w s_x in a second chain, the two added at the end; the integer sums are exact.  So a
// row's result does not depend on whether it went through a tile, a group kernel of MR rows, or alone.  The
// min chain runs as a second pass over the blocks (its scales are in L1 by then): keeping 12 more
// accumulators live in the first pass would spill registers.
template <int NG, int MR>
LMGEN_VNNI inline void gemm_min_pass(const uint8_t* wg0, int64_t gbytes, int64_t nb, int64_t bb, bool has_min,
                                     float offset, const ActQ8* act, __m256* out) {
  __m256 accm[NG][MR];
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < MR; ++r) accm[g][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int g = 0; g < NG; ++g) {
      const uint8_t* blk = wg0 + g * gbytes + b * bb;
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      const __m256 mw = has_min ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)))
                                : _mm256_mul_ps(dw, _mm256_set1_ps(offset));
      for (int r = 0; r < MR; ++r) accm[g][r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(act[r].s[b]), accm[g][r]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < MR; ++r) out[g * MR + r] = _mm256_add_ps(out[g * MR + r], accm[g][r]);
}

template <int NG, int MR, int64_t QT>
LMGEN_VNNI inline void gemm_q4_vnni(const uint8_t* wg0, int64_t gbytes, int64_t nb, const ActQ8* act, __m256* out) {
  using L = NibbleLayout<QT>;
  __m256 acc[NG][MR];
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < MR; ++r) acc[g][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk0 = wg0 + b * L::bb;
    __m256i s[NG][MR];
    for (int g = 0; g < NG; ++g)
      for (int r = 0; r < MR; ++r) s[g][r] = _mm256_setzero_si256();
    __m256i hb[NG];
    for (int g = 0; g < NG; ++g)
      hb[g] = L::five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk0 + g * gbytes + L::hoff))
                      : _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      __m256i lo[NG], hi[NG];
      for (int g = 0; g < NG; ++g)
        nibble_chunk<L::five>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk0 + g * gbytes + L::qoff + 32 * c)),
                              hb[g], c, lo + g, hi + g);
      for (int r = 0; r < MR; ++r) {
        const int8_t* xa = act[r].q + b * QK;
        const __m256i xl = _mm256_set1_epi32(load_i32(xa + 4 * c)), xh = _mm256_set1_epi32(load_i32(xa + 16 + 4 * c));
        for (int g = 0; g < NG; ++g) {
          s[g][r] = _mm256_dpbusd_epi32(s[g][r], lo[g], xl);
          s[g][r] = _mm256_dpbusd_epi32(s[g][r], hi[g], xh);
        }
      }
    }
    for (int g = 0; g < NG; ++g) {
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk0 + g * gbytes)));
      for (int r = 0; r < MR; ++r)
        acc[g][r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(act[r].d[b])), _mm256_cvtepi32_ps(s[g][r]), acc[g][r]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < MR; ++r) out[g * MR + r] = acc[g][r];
  gemm_min_pass<NG, MR>(wg0, gbytes, nb, L::bb, L::has_min, L::offset, act, out);
}

template <int NG, int MR>
LMGEN_VNNI inline void gemm_q8_vnni(const uint8_t* wg0, int64_t gbytes, int64_t nb, const ActQ8* act, __m256* out) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[NG][MR];
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < MR; ++r) acc[g][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk0 = wg0 + b * 272;
    __m256i s[NG][MR];
    for (int g = 0; g < NG; ++g)
      for (int r = 0; r < MR; ++r) s[g][r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      __m256i u[NG];
      for (int g = 0; g < NG; ++g)
        u[g] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk0 + g * gbytes + 16 + 32 * c)), bias);
      for (int r = 0; r < MR; ++r) {
        const __m256i xv = _mm256_set1_epi32(load_i32(act[r].q + b * QK + 4 * c));
        for (int g = 0; g < NG; ++g) s[g][r] = _mm256_dpbusd_epi32(s[g][r], u[g], xv);
      }
    }
    for (int g = 0; g < NG; ++g) {
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk0 + g * gbytes)));
      for (int r = 0; r < MR; ++r)
        acc[g][r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(act[r].d[b])), _mm256_cvtepi32_ps(s[g][r]), acc[g][r]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < MR; ++r) out[g * MR + r] = acc[g][r];
  gemm_min_pass<NG, MR>(wg0, gbytes, nb, 272, false, -128.0f, act, out);
}

constexpr int GEMM_NG = 2, GEMM_MR = 6;

LMGEN_VNNI inline void gemm_tile_vnni(int64_t qtype, const uint8_t* wg0, int64_t gbytes, int64_t nb, const ActQ8* act,
                                      __m256* out) {
  switch (qtype) {
    case T_Q8_0: gemm_q8_vnni<GEMM_NG, GEMM_MR>(wg0, gbytes, nb, act, out); break;
    case T_Q4_1: gemm_q4_vnni<GEMM_NG, GEMM_MR, T_Q4_1>(wg0, gbytes, nb, act, out); break;
    case T_Q5_0: gemm_q4_vnni<GEMM_NG, GEMM_MR, T_Q5_0>(wg0, gbytes, nb, act, out); break;
    case T_Q5_1: gemm_q4_vnni<GEMM_NG, GEMM_MR, T_Q5_1>(wg0, gbytes, nb, act, out); break;
    default: gemm_q4_vnni<GEMM_NG, GEMM_MR, T_Q4_0>(wg0, gbytes, nb, act, out);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Dequantization of r8 groups to fp32 rows (prefill path, tests)
// ---------------------------------------------------------------------------------------------------------
// 16 bytes of nibbles (GGUF block order) -> 32 floats v*scale + bias
inline void nibbles_to_f32(const uint8_t* qs16, float scale, float bias, float* out) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs16));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, m4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
  const __m256 vs = _mm256_set1_ps(scale), vb = _mm256_set1_ps(bias);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int k = 0; k < 4; ++k) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k]));
    _mm256_storeu_ps(out + 8 * k, _mm256_fmadd_ps(f, vs, vb));
  }
}

inline void int8_to_f32(const int8_t* q32, float scale, float* out) {
  const __m256 vs = _mm256_set1_ps(scale);
  for (int k = 0; k < 4; ++k) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q32 + 8 * k));
    _mm256_storeu_ps(out + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), vs));
  }
}

// row r (< 8) of an r8 group of 8 rows -> out[0, 32 nb)
inline void r8_dequant_row(int64_t qtype, const uint8_t* wg, int64_t nb, int r, float* out) {
  const int64_t bb = r8_block_bytes(qtype);
  alignas(32) uint8_t tmp[32];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wg + b * bb;
    float* o = out + b * QK;
    const float d = fp16_to_f32(blk + 2 * r);
    if (qtype == T_Q8_0) {
      for (int c = 0; c < 8; ++c) std::memcpy(tmp + 4 * c, blk + 16 + 32 * c + 4 * r, 4);
      int8_to_f32(reinterpret_cast<const int8_t*>(tmp), d, o);
    } else if (qtype == T_Q5_0 || qtype == T_Q5_1) {
      const bool has_min = qtype == T_Q5_1;
      const int64_t hoff = has_min ? 32 : 16, qoff = hoff + 32;
      const float bias = has_min ? fp16_to_f32(blk + 16 + 2 * r) : -16.0f * d;
      const uint8_t* hb = blk + hoff + 4 * r;  // byte j: bit c -> value 4c+j, bit 4+c -> value 16+4c+j
      for (int c = 0; c < 4; ++c)
        for (int j = 0; j < 4; ++j) {
          const uint8_t v = blk[qoff + 32 * c + 4 * r + j];
          o[4 * c + j] = static_cast<float>((v & 0x0F) | (((hb[j] >> c) & 1) << 4)) * d + bias;
          o[16 + 4 * c + j] = static_cast<float>((v >> 4) | (((hb[j] >> (4 + c)) & 1) << 4)) * d + bias;
        }
    } else {
      const int64_t qoff = qtype == T_Q4_1 ? 32 : 16;
      for (int c = 0; c < 4; ++c) std::memcpy(tmp + 4 * c, blk + qoff + 32 * c + 4 * r, 4);
      const float bias = qtype == T_Q4_1 ? fp16_to_f32(blk + 16 + 2 * r) : -8.0f * d;
      nibbles_to_f32(tmp, d, bias, o);
    }
  }
}

// rows [8g, 8g+nvalid) of an r8 weight -> out (row stride ld)
inline void r8_dequant_group(int64_t qtype, const uint8_t* wg, int64_t nb, int nvalid, float* out, int64_t ld) {
  for (int r = 0; r < nvalid; ++r) r8_dequant_row(qtype, wg, nb, r, out + r * ld);
}

// ---------------------------------------------------------------------------------------------------------
// llama.cpp-style kernel on the raw GGUF layout (one row at a time, horizontal sum per row).  Kept only as a
// benchmark baseline for the r8 repacking (benchmarks/matmul_candidates.py); M = 1, Q4_1 and Q8_0.
// ---------------------------------------------------------------------------------------------------------
inline float raw_dot_q4_1(const uint8_t* row, int64_t nb, const ActQ8& a) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  float summ = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 20;
    const float d = fp16_to_f32(blk), m = fp16_to_f32(blk + 2);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
    const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + b * QK));
    const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[b]), p, acc);
    summ += m * a.s[b];
  }
  return hsum8(acc) + summ;
}

inline float raw_dot_q8_0(const uint8_t* row, int64_t nb, const ActQ8& a) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 34;
    const float d = fp16_to_f32(blk);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + b * QK));
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[b]), _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones)), acc);
  }
  return hsum8(acc);
}

}  // namespace lmgen_q
