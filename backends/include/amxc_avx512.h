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

// e^x in 16 lanes: the vector exp of amxc_rt.h (namespace expc), whose operations the
// avx2 header's copy repeats one for one at its own width (the same bits)
static inline __m512 exp_x16(__m512 x) {
  using namespace expc;
  x = _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), x));     // NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-ln2_hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-ln2_lo), r);
  __m512 y = _mm512_set1_ps(p0);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p1));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p2));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p3));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p4));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p5));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  // 2^n as 2^a 2^b, a = n >> 1: each factor a normal float for n in [-150, 128]
  const __m512i ni = _mm512_cvtps_epi32(n), a = _mm512_srai_epi32(ni, 1), b = _mm512_sub_epi32(ni, a);
  const __m512i bias = _mm512_set1_epi32(127);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(a, bias), 23)));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(b, bias), 23)));
}

// silu(g) * u
static inline __m512 silu_mul_x16(__m512 g, __m512 u) {
  const __m512 e = exp_x16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

}  // namespace amxc
