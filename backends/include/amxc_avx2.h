// AVX2 helpers of the avx2 tier (x86-64-v3: avx2, fma, f16c, bmi2).
#pragma once
#include <immintrin.h>
#include "amxc_nf4.h"

namespace amxc {

struct GroupScales : GroupScales16 {
  __m256 v0, v1;                                  // rows 0-7, 8-15
  GroupScales(const float* s2_, int64_t g_, int64_t n_, int64_t nb_, int64_t sb_)
      : GroupScales16(s2_, g_, n_, nb_, sb_) { reload(); }
  inline void reload() { v0 = _mm256_loadu_ps(lane); v1 = _mm256_loadu_ps(lane + 8); }
  inline void at(int64_t b) { if (advance(b)) reload(); }
};

// 8 E4M3 codes -> 8 floats (see decode_e4m3)
static inline __m256 decode_e4m3_x8(const uint8_t* p) {
  const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  const __m256i bits = _mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(0x7F)), 20);
  return _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f));
}

// e^x in 8 lanes: the vector exp of amxc_rt.h (namespace expc), whose operations the
// avx512 header's copy repeats one for one at its own width (the same bits)
static inline __m256 exp_x8(__m256 x) {
  using namespace expc;
  x = _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x));     // NaN stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-ln2_hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-ln2_lo), r);
  __m256 y = _mm256_set1_ps(p0);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p1));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p2));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p3));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p4));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n as 2^a 2^b, a = n >> 1: each factor a normal float for n in [-150, 128]
  const __m256i ni = _mm256_cvtps_epi32(n), a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
  const __m256i bias = _mm256_set1_epi32(127);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23)));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23)));
}

static inline __m256 silu_mul_x8(__m256 g, __m256 u) {
  const __m256 e = exp_x8(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

// acc + the u8 x s8 products of each 4 bytes summed into their int32 lane, without saturation:
// AVX-VNNI's vpdpbusd where the tier is built for it (-mavxvnni: hosts whose cpuinfo has
// avx_vnni), else an exact software twin, so the kernels' VNNI variant (template parameter vnni)
// runs, and is tested, on any AVX2 host: bytes widened to int16 (u zero-, s sign-extended) in
// even and odd halves, products paired by madd (|u s| <= 255 * 128, exact in int32)
static inline __m256i dpbusd_x8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  const __m256i low = _mm256_set1_epi16(0x00FF);
  const __m256i even = _mm256_madd_epi16(_mm256_and_si256(u, low), _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8));
  const __m256i odd = _mm256_madd_epi16(_mm256_srli_epi16(u, 8), _mm256_srai_epi16(s, 8));
  return _mm256_add_epi32(acc, _mm256_add_epi32(even, odd));
#endif
}

static inline __m256i mask_first(int64_t n) {    // lanes [0, n) set, n in 0..8
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx);
}

}  // namespace amxc
