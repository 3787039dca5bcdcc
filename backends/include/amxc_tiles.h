// The non-tile work of the AMX kernels (decoding NF4 into tile layouts, epilogues), with
// AVX-512 bodies for the amx tier and scalar bodies for the emulated tier, which must run on
// AVX2-only machines.  Both produce the same bits: fp32 products, RNE to bf16, fp32 fma.
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>
#include "amxc_nf4.h"
#ifdef __AVX512F__
#include "amxc_avx512.h"
#endif

namespace amxc {

static inline uint16_t bf16_rne(float f) {          // finite inputs (weights, activations)
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0) u &= 0x80000000u;    // like VCVTNEPS2BF16: denormals become zero
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// x [m, K] fp32 -> [mp, K] bf16, rows m..mp-1 zero
static void to_bf16_rows(const float* x, int64_t m, int64_t mp, int64_t K, uint16_t* out) {
  for (int64_t i = 0; i < mp; ++i) {
    int64_t k = 0;
#ifdef __AVX512F__
    for (; k + 16 <= K; k += 16) {
      const __m512 v = i < m ? _mm512_loadu_ps(x + i * K + k) : _mm512_setzero_ps();
      _mm256_storeu_si256((__m256i*)(out + i * K + k), (__m256i)_mm512_cvtneps_pbh(v));
    }
#endif
    for (; k < K; ++k) out[i * K + k] = i < m ? bf16_rne(x[i * K + k]) : 0;
  }
}

// Four VNNI2 B-tile rows (64 bytes each: 16 outputs x a bf16 pair) from one r16k4 chunk: the
// chunk's dword r holds row r's codes for k = k0 + t (low nibbles) and k0 + 32 + t (high);
// rows[0..1] get the low pairs (t = 0,1 and 2,3), rows[2..3] the high pairs.  sc: the 16 rows'
// fp32 scales.  `row_of(i)` gives where VNNI row i goes.
static inline void nf4_chunk_to_bf16_pairs(const uint8_t* chunk, const float* sc, uint32_t* const rows[4]) {
#ifdef __AVX512F__
  const __m512 lut = _mm512_loadu_ps((const float*)NF4_F32_BITS);
  const __m512i v = _mm512_loadu_si512(chunk);
  const __m512 s = _mm512_loadu_ps(sc);
  for (int i = 0; i < 4; ++i) {
    const int sh = 16 * (i & 1) + 4 * (i >> 1);
    const __m512i c0 = _mm512_and_si512(_mm512_srli_epi32(v, sh), _mm512_set1_epi32(15));
    const __m512i c1 = _mm512_and_si512(_mm512_srli_epi32(v, sh + 8), _mm512_set1_epi32(15));
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_permutexvar_ps(c0, lut), s)));
    const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_permutexvar_ps(c1, lut), s)));
    _mm512_storeu_si512(rows[i], _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
#else
  for (int i = 0; i < 4; ++i) {
    const int sh = 16 * (i & 1) + 4 * (i >> 1);
    for (int r = 0; r < 16; ++r) {
      uint32_t d;
      memcpy(&d, chunk + 4 * r, 4);
      const uint16_t lo = bf16_rne(nf4_value((d >> sh) & 15) * sc[r]);
      const uint16_t hi = bf16_rne(nf4_value((d >> (sh + 8)) & 15) * sc[r]);
      rows[i][r] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
  }
#endif
}

// Sixteen VNNI4 int8 B-tile rows (one 64-wide block of 16 outputs) from a block's 8 chunks:
// rows 0-7 are the low nibbles of chunks 0-7, rows 8-15 the high nibbles.
static inline void nf4_block_to_int8_tile(const uint8_t* block, int8_t* tile) {
#ifdef __AVX512F__
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)NF4_I8));
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 8; ++j) {
    const __m512i v = _mm512_loadu_si512(block + j * 64);
    _mm512_storeu_si512(tile + j * 64, _mm512_shuffle_epi8(table, _mm512_and_si512(v, m4)));
    _mm512_storeu_si512(tile + (j + 8) * 64, _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4)));
  }
#else
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 64; ++i) {
      tile[j * 64 + i] = NF4_I8[block[j * 64 + i] & 15];
      tile[(j + 8) * 64 + i] = NF4_I8[block[j * 64 + i] >> 4];
    }
#endif
}

// A q8 weight block (16 rows x 64 K in r16k4 order, codes stored +128: ir/formats/q8.py) as the
// int8 VNNI4 B tile: tile row q holds k-quad q of the 16 rows, which r16k4 keeps at q*128 (q < 8)
// and (q-8)*128 + 64; stored code ^ 0x80 is the signed code TDPBSSD multiplies.
static inline void q8_block_to_int8_tile(const uint8_t* block, int8_t* tile) {
  for (int q = 0; q < 16; ++q) {
    const uint8_t* src = block + (q < 8 ? q * 128 : (q - 8) * 128 + 64);
    for (int i = 0; i < 64; ++i) tile[q * 64 + i] = (int8_t)(src[i] ^ 0x80);
  }
}

// acc[r][n] = fma(float(dot[r][n]), (sw[n] * qs[r]) * s2[n], acc[r][n]) for 16 rows: the int8
// GEMV's block step (s2 null: f32 scales)
static inline void scale_accumulate(float acc[16][16], const int32_t dot[16][16], const float* sw,
                                    const float* s2, const float* qs, int64_t qs_stride) {
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float sc = sw[n] * qs[r * qs_stride];
      if (s2) sc = sc * s2[n];
      acc[r][n] = fmaf((float)dot[r][n], sc, acc[r][n]);
    }
}

// out[row, n0 + n] = c[r][n] (+ bias) (+ resid) for the tile's valid rows and columns
static inline void store_tile(const float c[16][16], int64_t row0, int64_t m, int64_t n0, int64_t N,
                              const float* bias, const float* resid, float* out) {
  const int64_t cols = N - n0 < 16 ? N - n0 : 16;
  for (int r = 0; r < 16 && row0 + r < m; ++r)
    for (int64_t n = 0; n < cols; ++n) {
      float y = c[r][n];
      if (bias) y = y + bias[n0 + n];
      if (resid) y = y + resid[(row0 + r) * N + n0 + n];
      out[(row0 + r) * N + n0 + n] = y;
    }
}

}  // namespace amxc
