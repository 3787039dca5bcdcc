// AVX-512 helpers of the avx512 and amx tiers.
#pragma once
#include <immintrin.h>
#include "amxc_nf4.h"

namespace amxc {

struct GroupScales : GroupScales16 {
  __m512 v;
  GroupScales(const float* s2_, int64_t g_, int64_t n_, int64_t nb_, int64_t sb_)
      : GroupScales16(s2_, g_, n_, nb_, sb_) { v = _mm512_loadu_ps(lane); }
  inline void at(int64_t b) { if (advance(b)) v = _mm512_loadu_ps(lane); }
};

// 16 E4M3 codes -> 16 floats (see decode_e4m3)
static inline __m512 decode_e4m3_x16(const uint8_t* p) {
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  const __m512i bits = _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(0x7F)), 20);
  return _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0x1p120f));
}

static inline __m512 exp_x16(__m512 x) {       // expf to ~1 ulp-ish, for silu epilogues
  alignas(64) float t[16];
  _mm512_store_ps(t, x);
  for (int i = 0; i < 16; ++i) t[i] = expf(t[i]);
  return _mm512_load_ps(t);
}

// silu(g) * u, with the same expf as the scalar kernels
static inline __m512 silu_mul_x16(__m512 g, __m512 u) {
  const __m512 e = exp_x16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

}  // namespace amxc
