// AMX (Advanced Matrix Extensions) tiles for batches of 16+ activation rows over r8 weights.
//
// One TDPBSUD multiplies a 16 x 32 tile of int8 activations (16 rows, one block of 32 features) by a 32 x 16
// tile of unsigned weight values (16 weight rows: a pair of r8 groups) into 16 x 16 exact int32 sums, the same
// integers the VNNI kernels' vpdpbusd chains produce for that block.  The float epilogue is the VNNI kernels'
// own, element for element: scale term fma(d_w d_x, sum, acc) over the blocks in order, then the min / offset
// term's chain, then their sum; so a row's result is bit-identical whether it went through a tile or alone
// (batch invariance across the AMX, VNNI-tile and single-row paths).
//
// The B tile wants 4 consecutive features of one weight row per 32-bit lane, 16 rows per 64-byte tile row: the
// r8 layout already is that, per group (chunk c of a group: 4 bytes of each of its 8 rows).  A pair of groups is
// unpacked once into a panel (nibbles -> bytes, Q8_0 biased to unsigned) and reused by every 16-row tile of the
// batch.  Linux hands out AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM), done once per process.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "quant_kernels.h"

namespace lmgen_q {

#define LMGEN_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

inline bool cpu_has_amx() {
  static const bool ok = [] {
    if (!cpu_has_vnni() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;  // <asm/prctl.h>, the tile data state component
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

constexpr int AMX_ROWS = 16;              // activation rows per tile (M)
constexpr int64_t AMX_PANEL_BYTES = 512;  // one block of a panel: 8 tile rows x 64 bytes
constexpr int64_t AMX_RING = 8;           // blocks of int32 sums in flight (16 x 16 each: 8 KB, stays in L1)

// A (16 rows x 32 int8) in tiles 1, 2; B (8 rows x 64 bytes) in 3, 0; C (16 x 16 int32) in 4 .. 7
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 32, 32, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {8, 16, 16, 8, 16, 16, 16, 16};
};

// a pair of r8 groups (weight rows 8g0 .. 8g0+15) -> panel bytes (nb x 512), their scales dw and min terms mw
// (nb x 16 floats each: what the VNNI kernels compute from the same block)
template <int64_t QT>
LMGEN_AMX inline void amx_unpack_panel(const uint8_t* wg0, int64_t gbytes, int64_t nb, uint8_t* panel, float* dw,
                                       float* mw) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* pb = panel + b * AMX_PANEL_BYTES;
    for (int g = 0; g < 2; ++g) {
      if constexpr (QT == T_Q8_0) {
        const uint8_t* blk = wg0 + g * gbytes + b * 272;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
        _mm256_storeu_ps(dw + 16 * b + 8 * g, d);
        _mm256_storeu_ps(mw + 16 * b + 8 * g, _mm256_mul_ps(d, _mm256_set1_ps(-128.0f)));
        const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
        for (int c = 0; c < 8; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + 64 * c + 32 * g),
                              _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c)), bias));
      } else {
        using L = NibbleLayout<QT>;
        const uint8_t* blk = wg0 + g * gbytes + b * L::bb;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
        _mm256_storeu_ps(dw + 16 * b + 8 * g, d);
        _mm256_storeu_ps(mw + 16 * b + 8 * g, nibble_min_term<QT>(blk, d));
        const __m256i hb = L::five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + L::hoff)) : _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          __m256i lo, hi;
          nibble_chunk<L::five>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + L::qoff + 32 * c)), hb, c, &lo, &hi);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + 64 * c + 32 * g), lo);         // features 4c .. 4c+3
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + 64 * (4 + c) + 32 * g), hi);   // 16+4c .. 16+4c+3
        }
      }
    }
  }
}

// acc[r] += the scale term of blocks [b0, b1) of activation row r, whose int32 sums are in the ring
LMGEN_AMX inline void amx_scale_blocks(const int32_t* sums, const float* dw, const float* d, int64_t nb, int64_t b0,
                                       int64_t b1, __m512* acc) {
  for (int64_t b = b0; b < b1; ++b) {
    const int32_t* cb = sums + (b & (AMX_RING - 1)) * AMX_ROWS * 16;
    const __m512 vdw = _mm512_loadu_ps(dw + 16 * b);
    for (int r = 0; r < AMX_ROWS; ++r) {
      const __m512 p = _mm512_cvtepi32_ps(_mm512_load_si512(cb + 16 * r));
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(vdw, _mm512_set1_ps(d[r * nb + b])), p, acc[r]);
    }
  }
}

// 16 activation rows (int8 q at stride K, block scales d / scaled sums s at stride nb) x one panel -> out[r]
// (16 floats: weight rows 8g0 .. 8g0+15), summed in the VNNI kernels' order (see the top of this file).
// Tile stores are the slow step (~1 KB of int32 sums per block): four blocks' products are in flight in turn
// (A in tiles 1 / 2, B in 3 / 0, C in 4 .. 7) while the previous four blocks' sums are scaled from memory.
LMGEN_AMX inline void amx_panel_tile(const uint8_t* panel, const float* dw, const float* mw, int64_t nb, int64_t K,
                                     const int8_t* q, const float* d, const float* s, int32_t* sums, float* out,
                                     int64_t ldo) {
  __m512 acc[AMX_ROWS];
  for (int r = 0; r < AMX_ROWS; ++r) acc[r] = _mm512_setzero_ps();
  // GCC's tile intrinsics paste the tile number into the instruction: it must be a literal, hence the macro
#define LMGEN_AMX_PRODUCT(A, B, C, blk)                \
  _tile_loadd(A, q + (blk) * QK, K);                   \
  _tile_loadd(B, panel + (blk) * AMX_PANEL_BYTES, 64); \
  _tile_zero(C);                                       \
  _tile_dpbsud(C, A, B);                               \
  _tile_stored(C, sums + ((blk) & (AMX_RING - 1)) * AMX_ROWS * 16, 64)
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    LMGEN_AMX_PRODUCT(1, 3, 4, b);
    LMGEN_AMX_PRODUCT(2, 0, 5, b + 1);
    LMGEN_AMX_PRODUCT(1, 3, 6, b + 2);
    LMGEN_AMX_PRODUCT(2, 0, 7, b + 3);
    if (b > 0) amx_scale_blocks(sums, dw, d, nb, b - 4, b, acc);
  }
  const int64_t tail = b;
  for (; b < nb; ++b) {
    LMGEN_AMX_PRODUCT(1, 3, 4, b);
  }
#undef LMGEN_AMX_PRODUCT
  amx_scale_blocks(sums, dw, d, nb, tail >= 4 ? tail - 4 : 0, nb, acc);
  // the min / offset term's chain, after (as in the VNNI kernels' second pass), then the sum of the two
  __m512 accm[AMX_ROWS];
  for (int r = 0; r < AMX_ROWS; ++r) accm[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 vmw = _mm512_loadu_ps(mw + 16 * b);
    for (int r = 0; r < AMX_ROWS; ++r) accm[r] = _mm512_fmadd_ps(vmw, _mm512_set1_ps(s[r * nb + b]), accm[r]);
  }
  for (int r = 0; r < AMX_ROWS; ++r) _mm512_storeu_ps(out + r * ldo, _mm512_add_ps(acc[r], accm[r]));
}

// weight rows [16 p0, 16 p1) (pairs of r8 groups) x activation rows [0, M16), M16 a multiple of 16 -> y
// (row stride ldy), without bias; the caller adds it as the other paths do
LMGEN_AMX inline void amx_gemm_panels(int64_t qtype, const uint8_t* w, int64_t gbytes, int64_t nb, int64_t K,
                                      const int8_t* q, const float* d, const float* s, int64_t M16, int64_t p0,
                                      int64_t p1, float* y, int64_t ldy) {
  thread_local std::vector<uint8_t> panel;
  thread_local std::vector<float> scales;
  if (static_cast<int64_t>(panel.size()) < nb * AMX_PANEL_BYTES) panel.resize(nb * AMX_PANEL_BYTES);
  alignas(64) int32_t sums[AMX_RING * AMX_ROWS * 16];
  if (static_cast<int64_t>(scales.size()) < 32 * nb) scales.resize(32 * nb);
  float* dw = scales.data();
  float* mw = dw + 16 * nb;
  const TileConfig cfg;
  _tile_loadconfig(&cfg);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* wg0 = w + 2 * p * gbytes;
    switch (qtype) {
      case T_Q8_0: amx_unpack_panel<T_Q8_0>(wg0, gbytes, nb, panel.data(), dw, mw); break;
      case T_Q4_1: amx_unpack_panel<T_Q4_1>(wg0, gbytes, nb, panel.data(), dw, mw); break;
      case T_Q5_0: amx_unpack_panel<T_Q5_0>(wg0, gbytes, nb, panel.data(), dw, mw); break;
      case T_Q5_1: amx_unpack_panel<T_Q5_1>(wg0, gbytes, nb, panel.data(), dw, mw); break;
      default: amx_unpack_panel<T_Q4_0>(wg0, gbytes, nb, panel.data(), dw, mw);
    }
    for (int64_t m = 0; m < M16; m += AMX_ROWS)
      amx_panel_tile(panel.data(), dw, mw, nb, K, q + m * K, d + m * nb, s + m * nb, sums, y + m * ldy + 16 * p,
                     ldy);
  }
  _tile_release();
}

}  // namespace lmgen_q
