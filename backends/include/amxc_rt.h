// amxc native runtime: the step ABI and the ISA-independent kernels (plain C++ that the compiler
// vectorizes for each tier's flags).  Generated model code (backends/templates/model.cpp.j2)
// includes this header; the heavy kernels (GEMV/GEMM/attention) come from per-tier templates.
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <algorithm>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// One call computes one step (prefill chunk or decode step) of every layer.
struct StepArgs {
  int64_t b, s;                  // batch rows, tokens per row
  const int64_t* ids;            // [b, s]
  const int64_t* pos;            // [b, s] absolute positions
  float* kcache;                 // [layers, blocks, kv_heads, block_size, head_dim]
  float* vcache;
  const int32_t* block_tables;   // [b, max_blocks]
  int64_t max_blocks, block_size, num_blocks;
  float* out;                    // the function's result (logits)
  uint8_t* ws;                   // workspace, amxc_workspace_bytes() long, 64-byte aligned
  const void* const* W;          // parameters, in the order of the generated table
  int nthreads;
  int last_only;                 // prefill: out holds only each row's last token's logits, [b, vocab]
  void* comm;                    // tensor parallelism: the rank's AmxcComm (amxc_comm.h), else null
};

#define AMXC_RESTRICT __restrict__

#include <time.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace amxc {

static inline double now() {                    // seconds, for AMXC_PROFILE builds
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static inline int threads_for(int64_t work, int nt) { return work < 2 ? 1 : nt; }

// ---- elementwise -------------------------------------------------------------------------
struct Add { static inline float f(float a, float b) { return a + b; } };
struct Sub { static inline float f(float a, float b) { return a - b; } };
struct Mul { static inline float f(float a, float b) { return a * b; } };
struct Div { static inline float f(float a, float b) { return a / b; } };
struct Cos { static inline float f(float a) { return cosf(a); } };
struct Sin { static inline float f(float a) { return sinf(a); } };
struct Neg { static inline float f(float a) { return -a; } };
// The vector exp (amxc_avx2.h exp_x8, amxc_avx512.h exp_x16) of the silu(gate) * up epilogues:
// e^x in every lane without a libm call per lane (~10 cycles an expf per output and row, against
// ~18 cycles of vpdpbusd for a gate/up pair at SmolLM2's K = 576).  Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two parts, e^r by its degree-7 polynomial, then
// two exact power-of-two scalings so results down to the subnormals and up to overflow (inf)
// come out right.  Within 2 ulp of e^x (tests/backends/test_vector_exp.py).  The avx2 and
// avx512 headers run the same operations on the same constants, so they give the same bits.
// Its constants, one copy for both:
namespace expc {
constexpr float lo = -104.0f, hi = 89.0f, log2e = 1.44269504088896341f, ln2_hi = 0.693359375f,
                ln2_lo = -2.12194440e-4f, p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f,
                p3 = 4.1665795894e-2f, p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f;
}  // namespace expc

struct Exp { static inline float f(float a) { return expf(a); } };
struct Silu { static inline float f(float a) { return a / (1.0f + expf(-a)); } };

// out[i] = Op(a[ia], b[ib]) over a row-major `shape` of rank <= 6; sa/sb are element strides
// of the broadcast operands (0 along broadcast dims).
template <class Op>
static void binary(const float* a, const float* b, float* out, int rank, const int64_t* shape,
                   const int64_t* sa, const int64_t* sb) {
  int64_t n = 1;
  for (int d = 0; d < rank; ++d) n *= shape[d];
  const int64_t inner = rank ? shape[rank - 1] : 1;
  const int64_t ia1 = rank ? sa[rank - 1] : 0, ib1 = rank ? sb[rank - 1] : 0;
  int64_t idx[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t base = 0; base < n; base += inner) {
    int64_t oa = 0, ob = 0;
    for (int d = 0; d < rank - 1; ++d) { oa += idx[d] * sa[d]; ob += idx[d] * sb[d]; }
    for (int64_t i = 0; i < inner; ++i) out[base + i] = Op::f(a[oa + i * ia1], b[ob + i * ib1]);
    for (int d = rank - 2; d >= 0; --d) { if (++idx[d] < shape[d]) break; idx[d] = 0; }
  }
}

template <class Op>
static void unary(const float* a, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = Op::f(a[i]);
}

static void cast_i64_f32(const int64_t* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = (float)x[i];
}

// out = in transposed by perm (out dim d is in dim perm[d]); element size esize bytes.  When the
// last dim stays last, each output row of it is one contiguous run in the input too, copied
// whole ([b, s, heads, d] <-> [b, heads, s, d]: runs of d; element by element took 6.5 % of a
// SmolLM2 prefill)
static void permute(const uint8_t* in, uint8_t* out, int esize, int rank, const int64_t* shape,
                    const int* perm) {
  int64_t in_stride[6], out_shape[6], n = 1;
  int64_t st = 1;
  for (int d = rank - 1; d >= 0; --d) { in_stride[d] = st; st *= shape[d]; }
  for (int d = 0; d < rank; ++d) { out_shape[d] = shape[perm[d]]; n *= out_shape[d]; }
  if (n == 0) return;
  const bool whole_rows = rank > 0 && perm[rank - 1] == rank - 1;
  const int outer = whole_rows ? rank - 1 : rank;
  const int64_t run = whole_rows ? out_shape[rank - 1] : 1, bytes = run * esize;
  int64_t idx[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t o = 0; o < n / run; ++o) {
    int64_t src = 0;
    for (int d = 0; d < outer; ++d) src += idx[d] * in_stride[perm[d]];
    memcpy(out + o * bytes, in + src * esize, bytes);
    for (int d = outer - 1; d >= 0; --d) { if (++idx[d] < out_shape[d]) break; idx[d] = 0; }
  }
}

// concatenation along an axis: `outer` rows, input i contributes width[i] contiguous floats
static void concat(const float* const* ins, const int64_t* width, int nin, int64_t outer, float* out) {
  int64_t total = 0;
  for (int i = 0; i < nin; ++i) total += width[i];
  for (int64_t r = 0; r < outer; ++r) {
    float* o = out + r * total;
    for (int i = 0; i < nin; ++i) { memcpy(o, ins[i] + r * width[i], width[i] * sizeof(float)); o += width[i]; }
  }
}

// one piece of a split: columns [start, start+width) of `outer` rows of `total`
static void slice_cols(const float* in, int64_t outer, int64_t total, int64_t start, int64_t width, float* out) {
  for (int64_t r = 0; r < outer; ++r) memcpy(out + r * width, in + r * total + start, width * sizeof(float));
}

// the last of each row's s token vectors: x [b, s, k] -> out [b, k]
static void last_rows(const float* x, int64_t b, int64_t s, int64_t k, float* out) {
  for (int64_t r = 0; r < b; ++r) memcpy(out + r * k, x + (r * s + s - 1) * k, k * sizeof(float));
}

static void embedding(const float* table, const int64_t* ids, int64_t n, int64_t dim, float* out) {
  for (int64_t i = 0; i < n; ++i) memcpy(out + i * dim, table + ids[i] * dim, dim * sizeof(float));
}
// a vocab-split table's rows first .. first + rows - 1 (tensor parallelism): zeros for other ids
static void embedding_part(const float* table, const int64_t* ids, int64_t n, int64_t dim, int64_t rows,
                           int64_t first, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = ids[i] - first;
    if (r >= 0 && r < rows) memcpy(out + i * dim, table + r * dim, dim * sizeof(float));
    else memset(out + i * dim, 0, dim * sizeof(float));
  }
}

// ---- normalization ----------------------------------------------------------------------
// The sum of x (SQ: of (x - mean)^2) in float64: 8 lanes (lane l takes i = l mod 8), folded
// 4-2-1, then the tail in order.  Independent chains the compiler vectorizes, where one serial
// float64 chain cost 4 cycles an element (SmolLM2 prefill: rms_norm 76 us a 128 x 576 call,
// 2.6 % of the chunk).
template <bool SQ>
static inline double lane_sum64(const float* x, int64_t n, double mean = 0.0) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t n8 = n / 8 * 8;
  for (int64_t i = 0; i < n8; i += 8)
    for (int l = 0; l < 8; ++l) {
      const double v = (double)x[i + l] - mean;
      lane[l] += SQ ? v * v : v;
    }
  for (int h = 4; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) lane[l] += lane[l + h];
  double s = lane[0];
  for (int64_t i = n8; i < n; ++i) {
    const double v = (double)x[i] - mean;
    s += SQ ? v * v : v;
  }
  return s;
}

static inline void rms_norm_row(const float* xr, const float* w, int64_t dim, float eps, float* o) {
  const double ss = lane_sum64<true>(xr, dim);
  const float inv = (float)(1.0 / sqrt(ss / dim + eps));
  for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (xr[i] * inv);
}

// Rows split over the threads from 32 rows on (a prefill chunk); a decode step's few rows run
// on the calling thread without entering a parallel region.
static void rms_norm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* out,
                     int nt = 1) {
  if (rows >= 32 && nt > 1) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * dim, w, dim, eps, out + r * dim);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * dim, w, dim, eps, out + r * dim);
}

static inline void layer_norm_row(const float* xr, const float* w, const float* bias, int64_t dim, float eps,
                                  float* o) {
  const double mean = lane_sum64<false>(xr, dim) / dim;
  const double var = lane_sum64<true>(xr, dim, mean);
  const float inv = (float)(1.0 / sqrt(var / dim + eps)), m = (float)mean;
  for (int64_t i = 0; i < dim; ++i) o[i] = (xr[i] - m) * inv * w[i] + (bias ? bias[i] : 0.0f);
}

// rows as rms_norm's: over the threads from 32 rows on
static void layer_norm(const float* x, const float* w, const float* bias, int64_t rows, int64_t dim,
                       float eps, float* out, int nt = 1) {
  if (rows >= 32 && nt > 1) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; ++r) layer_norm_row(x + r * dim, w, bias, dim, eps, out + r * dim);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) layer_norm_row(x + r * dim, w, bias, dim, eps, out + r * dim);
}

// ---- rotary embedding -------------------------------------------------------------------
// x: rows of `dim` floats over `rank` leading dims `lead`; the cos/sin row of x's leading index
// is sum(idx[d] * cs_stride[d]) (stride 0 where the tables broadcast, e.g. over heads)
static void rope(const float* x, const float* cs, const float* sn, float* out, int rank, const int64_t* lead,
                 const int64_t* cs_stride, int64_t dim, bool interleaved) {
  const int64_t half = dim / 2;
  int64_t rows = 1;
  for (int d = 0; d < rank; ++d) rows *= lead[d];
  int64_t idx[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t r = 0; r < rows; ++r) {
    int64_t tr = 0;
    for (int d = 0; d < rank; ++d) tr += idx[d] * cs_stride[d];
    const float* xr = x + r * dim;
    const float* c = cs + tr * dim;
    const float* s = sn + tr * dim;
    float* o = out + r * dim;
    if (interleaved) {
      for (int64_t i = 0; i < dim; i += 2) {
        o[i] = xr[i] * c[i] + (-xr[i + 1]) * s[i];
        o[i + 1] = xr[i + 1] * c[i + 1] + xr[i] * s[i + 1];
      }
    } else {
      for (int64_t i = 0; i < half; ++i) o[i] = xr[i] * c[i] + (-xr[i + half]) * s[i];
      for (int64_t i = half; i < dim; ++i) o[i] = xr[i] * c[i] + xr[i - half] * s[i];
    }
    for (int d = rank - 1; d >= 0; --d) { if (++idx[d] < lead[d]) break; idx[d] = 0; }
  }
}

// ---- activations (epilogues of unfused paths) -------------------------------------------
static inline float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
static inline float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
static void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
static void gelu(const float* x, float* out, int64_t n, bool tanh_approx) {
  for (int64_t i = 0; i < n; ++i) out[i] = tanh_approx ? gelu_tanh(x[i]) : gelu_erf(x[i]);
}

// ---- cache-aware attention --------------------------------------------------------------
// exp for x <= 0 (softmax after subtracting the max), written so loops over it vectorize:
// 2^(x log2 e) split into 2^n (exponent bits) and 2^f, f in [-0.5, 0.5], by a degree-6
// polynomial; relative error < 2e-7 over the range, 0 below -87.
static inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.4426950408889634f;
  const float n = nearbyintf(t);
  const float f = t - n;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6180642e-3f;
  p = p * f + 5.5503340e-2f;
  p = p * f + 2.4022650e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

static constexpr float MASKED = -1e30f;          // a score that is not there (exp gives 0)

// the inner loops of attention, each over one contiguous run so the compiler vectorizes it
static inline void axpy(float* AMXC_RESTRICT y, float w, const float* AMXC_RESTRICT x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}
// The one summation order every tier uses for a dot product, so tiers agree to the bit: 16
// partial sums (lane l takes k = l mod 16, fma in order), folded 8-4-2-1 (lane l += lane l+h),
// then the n mod 16 tail in order.  AVX-512 is one 16-lane register, AVX2 two 8-lane ones.
// dot_rows<R> computes R such dot products (R rows of x, one y) at once: R independent fma
// chains instead of one latency-bound chain, each row with exactly dot()'s operations.
#if defined(__AVX512F__)
static inline float fold16(__m512 acc) {
  __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  h4 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h4, _mm_movehdup_ps(h4)));
}
#elif defined(__AVX2__)
static inline float fold16(__m256 a0, __m256 a1) {
  __m256 h8 = _mm256_add_ps(a0, a1);
  __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  h4 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h4, _mm_movehdup_ps(h4)));
}
#endif

template <int R>
static inline void dot_rows(const float* AMXC_RESTRICT x, int64_t sx, const float* AMXC_RESTRICT y, int64_t n,
                            float* out) {
  const int64_t n16 = n / 16 * 16;
#if defined(__AVX512F__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n16; i += 16) {
    const __m512 yv = _mm512_loadu_ps(y + i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * sx + i), yv, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = fold16(acc[r]);
#elif defined(__AVX2__)
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) { a0[r] = _mm256_setzero_ps(); a1[r] = _mm256_setzero_ps(); }
  for (int64_t i = 0; i < n16; i += 16) {
    const __m256 y0 = _mm256_loadu_ps(y + i), y1 = _mm256_loadu_ps(y + i + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * sx + i), y0, a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * sx + i + 8), y1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = fold16(a0[r], a1[r]);
#else
  for (int r = 0; r < R; ++r) {
    float l[16] = {0};
    for (int64_t i = 0; i < n16; i += 16)
      for (int j = 0; j < 16; ++j) l[j] = fmaf(x[r * sx + i + j], y[i + j], l[j]);
    for (int h = 8; h >= 1; h /= 2)
      for (int j = 0; j < h; ++j) l[j] = l[j] + l[j + h];
    out[r] = l[0];
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int64_t i = n16; i < n; ++i) out[r] = fmaf(x[r * sx + i], y[i], out[r]);
}

// A float64 dot product of float32 vectors (each product exact in float64): 8 lane sums (lane l
// takes k = l mod 8, fma in order), folded 4-2-1, then the n mod 8 tail in order; every tier the
// same bits.  The row-parallel products of quantized models sum this way so that cutting K
// across ranks cannot move their rounded float (backends/plan.py).
static inline double dot64(const float* AMXC_RESTRICT x, const float* AMXC_RESTRICT y, int64_t n) {
  const int64_t n8 = n / 8 * 8;
  double l[8];
#if defined(__AVX512F__)
  __m512d acc = _mm512_setzero_pd();
  for (int64_t i = 0; i < n8; i += 8)
    acc = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i)), _mm512_cvtps_pd(_mm256_loadu_ps(y + i)), acc);
  _mm512_storeu_pd(l, acc);
#elif defined(__AVX2__)
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (int64_t i = 0; i < n8; i += 8) {
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), _mm256_cvtps_pd(_mm_loadu_ps(y + i)), a0);
    a1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)), _mm256_cvtps_pd(_mm_loadu_ps(y + i + 4)), a1);
  }
  _mm256_storeu_pd(l, a0);
  _mm256_storeu_pd(l + 4, a1);
#else
  for (int j = 0; j < 8; ++j) l[j] = 0.0;
  for (int64_t i = 0; i < n8; i += 8)
    for (int j = 0; j < 8; ++j) l[j] = fma((double)x[i + j], (double)y[i + j], l[j]);
#endif
  for (int h = 4; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) l[j] = l[j] + l[j + h];
  double s = l[0];
  for (int64_t i = n8; i < n; ++i) s = fma((double)x[i], (double)y[i], s);
  return s;
}

// dot_tile<R, C>: the R x C dot products of R rows of x with C rows of y (out[r * so + c]), each
// with exactly dot()'s operations.  Every y chunk loaded serves R rows and every x chunk C: at
// 4 x 4 a step is 8 loads for 16 fmas where dot_rows<8> needs 9 for 8, which made a batched
// f32 GEMV (a 16-row decode step's logits head) load-bound.
template <int R, int C>
static inline void dot_tile(const float* AMXC_RESTRICT x, int64_t sx, const float* AMXC_RESTRICT y, int64_t sy,
                            int64_t n, float* out, int64_t so) {
#if defined(__AVX512F__)
  const int64_t n16 = n / 16 * 16;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n16; i += 16) {
    __m512 yv[C];
    for (int c = 0; c < C; ++c) yv[c] = _mm512_loadu_ps(y + c * sy + i);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * sx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, yv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = fold16(acc[r][c]);
      for (int64_t i = n16; i < n; ++i) s = fmaf(x[r * sx + i], y[c * sy + i], s);
      out[r * so + c] = s;
    }
#else
  float col[R];
  for (int c = 0; c < C; ++c) {
    dot_rows<R>(x, sx, y + c * sy, n, col);
    for (int r = 0; r < R; ++r) out[r * so + c] = col[r];
  }
#endif
}

static inline float dot(const float* AMXC_RESTRICT x, const float* AMXC_RESTRICT y, int64_t n) {
  float s;
  dot_rows<1>(x, 0, y, n, &s);
  return s;
}

// x[0] + ... + x[n-1] in dot()'s order (16 lane sums, folded 8-4-2-1, then the tail in order),
// so every tier gets the same bits: a softmax's sum of weights, which added one key at a time was
// a 4-cycle dependency chain per key and head (a sixth of decode attention's arithmetic)
static inline float sum16(const float* AMXC_RESTRICT x, int64_t n) {
  const int64_t n16 = n / 16 * 16;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n16; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + i));
  float s = fold16(acc);
#elif defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < n16; i += 16) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
  }
  float s = fold16(a0, a1);
#else
  float l[16] = {0};
  for (int64_t i = 0; i < n16; i += 16)
    for (int j = 0; j < 16; ++j) l[j] = l[j] + x[i + j];
  for (int h = 8; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) l[j] = l[j] + l[j + h];
  float s = l[0];
#endif
  for (int64_t i = n16; i < n; ++i) s = s + x[i];
  return s;
}
// exp(x) for a score x minus its row max.  Below e^-69 ~ 1e-30 a weight cannot move an fp32
// sum whose largest term is 1, and keeping it would make denormal products in P.V (microcode
// assists, 100x slower).
static inline float softmax_weight(float x) { return x < -69.0f ? 0.0f : exp_neg(x); }

// max(MASKED, s[0..n)); every score is finite, so the order of the comparisons cannot matter
static inline float max_of(const float* s, int64_t n) {
  float m = MASKED;
  int64_t j = 0;
#if defined(__AVX2__)
  __m256 mv = _mm256_set1_ps(MASKED);
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; j < n; ++j) m = m > s[j] ? m : s[j];
  return m;
}

// s[j] = softmax_weight(s[j] - m), eight at a time: exp_neg's operations in its order, each
// multiply and add rounded apart as the scalar code's are (-ffp-contract=off), so the bits are
// the scalar function's; the scalar loop the compiler left alone was a fifth of decode attention
static inline void softmax_weights(float* s, int64_t n, float m) {
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256 mv = _mm256_set1_ps(m), lo = _mm256_set1_ps(-87.0f), cut = _mm256_set1_ps(-69.0f);
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + j), mv);
    const __m256 xc = _mm256_blendv_ps(x, lo, _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
    const __m256 t = _mm256_mul_ps(xc, _mm256_set1_ps(1.4426950408889634f));
    const __m256 r = _mm256_round_ps(t, _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, r);
    __m256 p = _mm256_set1_ps(1.5353362e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.3398874e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(9.6180642e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(5.5503340e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(2.4022650e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(r), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    _mm256_storeu_ps(s + j, _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(x, cut, _CMP_LT_OQ)));
  }
#endif
  for (; j < n; ++j) s[j] = softmax_weight(s[j] - m);
}

// Attention over the cache, one algorithm for every query whether it comes in a decode step or
// a prefill chunk, so a sequence's results do not depend on how its tokens were batched or
// chunked (batch invariance; a preempted request recomputes the same bits):
//   * the keys 0..p a query at position p sees are cut into fixed chunks of ATTN_CHUNK
//     positions (0-63, 64-127, ...: they depend on positions only, never on the step);
//   * chunk_partial: per chunk and query head, the chunk's max m, sum of exp l and
//     unnormalized P.V, from amxc::dot scores;
//   * merge_chunks: the partials combined in chunk order (flash-decoding).
// Decode spreads the (row, chunk) partials of every kv head over threads (the (row, kv head,
// chunk) ones while there are fewer (row, chunk) pairs than threads), prefill the (row, query,
// kv head) triples; either way each partial and each merge is the same function of the same
// inputs, so neither the thread count nor the grouping of kv heads matters.  The
// query heads sharing a kv head (GQA) read each cached key and value once.
static constexpr int64_t ATTN_CHUNK = 64;

// Where position p of row r, kv head h lies in a layer's K or V cache:
// [block, kv_heads, block_size, d], blocks through the row's block table.  The one definition on
// the native side; backends/step.py kv_slots is the same map for the reference interpreter.
static inline int64_t kv_slot(const StepArgs* a, int64_t r, int64_t p, int64_t h, int64_t kv_heads,
                              int64_t d) {
  const int64_t bs = a->block_size;
  return ((a->block_tables[r * a->max_blocks + p / bs] * kv_heads + h) * bs + p % bs) * d;
}

// per-thread scratch that persists across calls: fresh multi-100-KB mallocs are mmaps whose page
// faults cost more than the attention itself
static inline float* scratch(int slot, int64_t n) {
  static thread_local float* buf[4] = {nullptr, nullptr, nullptr, nullptr};
  static thread_local int64_t cap[4] = {0, 0, 0, 0};
  if (n > cap[slot]) { free(buf[slot]); cap[slot] = n; buf[slot] = (float*)malloc(n * sizeof(float)); }
  return buf[slot];
}

// a per-thread, 64-byte aligned int8 buffer of at least n bytes (kernels' lookup panels)
static inline int8_t* scratch_i8(int64_t n) {
  static thread_local int8_t* buf = nullptr;
  static thread_local int64_t cap = 0;
  if (n > cap) { free(buf); cap = (n + 63) / 64 * 64; buf = (int8_t*)aligned_alloc(64, cap); }
  return buf;
}

// Cached rows are prefetched in software one block ahead: a sequence's KV blocks (a page each at
// block_size 16, head_dim 64) lie anywhere in the pool, and the hardware prefetcher stops at every
// page boundary (measured: 16 rows x 150 cached tokens, SmolLM2 shapes, 12.1 -> 9.7 ms a step).
static inline void prefetch_rows(const float* p, int64_t n) {
  for (int64_t e = 0; e < n; e += 16) __builtin_prefetch(p + e, 0, 3);
}

// An int8 cache row (KVCacheType storage=i8, ir/ops/cache.py kv_quantize is the reference): d
// codes rint(x / scale), scale = absmax / 127, in the first d/4 float words, the scale in word d/4.
static inline void kv8_store(const float* x, int64_t d, float* dst) {
  float amax = 0.0f;
  for (int64_t e = 0; e < d; ++e) amax = std::max(amax, std::fabs(x[e]));
  const float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  int8_t* codes = reinterpret_cast<int8_t*>(dst);
  for (int64_t e = 0; e < d; ++e) codes[e] = (int8_t)nearbyintf(x[e] * inv);
  dst[d / 4] = scale;
}
// n stored rows (dr words apart) as float rows (d apart): code * scale
static inline void kv8_load(const float* src, int64_t n, int64_t d, int64_t dr, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* codes = reinterpret_cast<const int8_t*>(src + j * dr);
    const float scale = src[j * dr + d / 4];
    for (int64_t e = 0; e < d; ++e) out[j * d + e] = (float)codes[e] * scale;
  }
}

// A half-precision cache row (storage=f16, kv_quantize the reference): d IEEE binary16 values,
// rounded to nearest even after saturating to +-65504 (an overflowing key would otherwise turn
// every score of its head to NaN; NaN stays NaN), two to a float word.  F16C converts where the
// tier has it (avx2 and up), _Float16 (the same rounding) on the scalar tier.
static constexpr float HALF_MAX = 65504.0f;
static inline void kv16_store(const float* x, int64_t d, float* dst) {
  uint16_t* h = reinterpret_cast<uint16_t*>(dst);
  int64_t e = 0;
#if defined(__F16C__)
  const __m256 lo = _mm256_set1_ps(-HALF_MAX), hi = _mm256_set1_ps(HALF_MAX);
  for (; e + 8 <= d; e += 8) {                    // max/min return their second operand on NaN
    const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(x + e)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + e), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; e < d; ++e) {
    const float v = x[e] < -HALF_MAX ? -HALF_MAX : (x[e] > HALF_MAX ? HALF_MAX : x[e]);
    h[e] = __builtin_bit_cast(uint16_t, (_Float16)v);
  }
}
static inline void kv16_load(const float* src, int64_t n, int64_t d, int64_t dr, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(src + j * dr);
    int64_t e = 0;
#if defined(__F16C__)
    for (; e + 8 <= d; e += 8)
      _mm256_storeu_ps(out + j * d + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + e))));
#endif
    for (; e < d; ++e) out[j * d + e] = (float)__builtin_bit_cast(_Float16, h[e]);
  }
}

// How the cache arrays hold a (position, head) row: KVCacheType.storage, as codegen passes it;
// kv_row_words is ir/types.py row_words, the words a row takes (the same map on each side).
enum KVStorage : int { KV_F32 = 0, KV_I8 = 1, KV_F16 = 2 };
static inline int64_t kv_row_words(int storage, int64_t d) {
  return storage == KV_I8 ? d / 4 + 1 : storage == KV_F16 ? d / 2 : d;
}
static inline void kv_store(int storage, const float* x, int64_t d, float* dst) {
  if (storage == KV_I8) kv8_store(x, d, dst);
  else if (storage == KV_F16) kv16_store(x, d, dst);
  else memcpy(dst, x, d * sizeof(float));
}
// n stored rows as float rows (d apart); only for the packed storages
static inline void kv_load(int storage, const float* src, int64_t n, int64_t d, int64_t dr, float* out) {
  if (storage == KV_I8) kv8_load(src, n, d, dr, out);
  else kv16_load(src, n, d, dr, out);
}

// sc[j] = dot(q, k[j]) for n keys stored contiguously d apart, R independent chains at a time
// (dot(x, y) == dot(y, x) bit for bit: the same fmas in the same order).  AVX2 keeps a dot in
// two registers, and 8 of them spilled: 4 measured 5-7 % faster on the whole decode attention.
static inline void score_run(const float* q, const float* k, int64_t n, int64_t d, float* sc) {
#if defined(__AVX512F__)
  constexpr int R = 8;
#else
  constexpr int R = 4;
#endif
  int64_t j = 0;
  for (; j + R <= n; j += R) dot_rows<R>(k + j * d, d, q, d, sc + j);
  for (; j < n; ++j) sc[j] = dot(q, k + j * d, d);
}

// o[0..D) = sum over the run's keys, in order, of w[j] * v[j] (the unnormalized P.V of one query
// head), accumulated in registers when the head size D is a compile-time constant
template <int D>
static inline void pv_run(const float* w, const float* v, int64_t n, int64_t d_rt, float* o) {
  const int64_t d = D ? D : d_rt;
#if defined(__AVX2__)
  if constexpr (D > 0 && D % 64 == 0) {             // 8 accumulators a pass: the loop below spilled
    for (int64_t e0 = 0; e0 < D; e0 += 64) {        // its 64-float array to the stack
      __m256 acc[8];
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_loadu_ps(o + e0 + 8 * k);
      for (int64_t j = 0; j < n; ++j) {
        const __m256 wj = _mm256_set1_ps(w[j]);
        for (int k = 0; k < 8; ++k)                 // w * v + acc rounded twice, as below
          acc[k] = _mm256_add_ps(acc[k], _mm256_mul_ps(wj, _mm256_loadu_ps(v + j * D + e0 + 8 * k)));
      }
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(o + e0 + 8 * k, acc[k]);
    }
    return;
  }
#endif
  if constexpr (D > 0) {
    float acc[D];
    for (int64_t e = 0; e < D; ++e) acc[e] = o[e];
    for (int64_t j = 0; j < n; ++j)
      for (int64_t e = 0; e < D; ++e) acc[e] += w[j] * v[j * D + e];
    for (int64_t e = 0; e < D; ++e) o[e] = acc[e];
  } else {
    for (int64_t j = 0; j < n; ++j) axpy(o, w[j], v + j * d, d);
  }
}

// qs: the query heads of one query for kv heads h0 .. h0 + nh - 1, pre-scaled, [nh][group][d].
// Writes, for kv head h0 + i, [group][m, l, o[d]] at mine + i * head_stride for the keys
// j0..j1-1 (none: m = MASKED, l = 0, o = 0).  Keys are taken in runs that are contiguous in the
// cache (the positions of one block); every score is amxc::dot's, and every P.V sum adds w * v
// key by key in position order, so the bits depend neither on the runs nor on how many kv heads
// one call takes.  Taking them all reads each block's K (then V) rows of every head as one
// contiguous stretch ([block, kv_heads, block_size, row]) instead of one 4 KB run per head.
// With packed rows (int8: dr = d/4 + 1 words a row; f16: d/2) each run is first decoded into
// float rows, which then take exactly the float path: the reference dequantizes and attends the
// same way.
template <int D>
static inline void chunk_partial_d(const float* qs, const float* kc, const float* vc, const StepArgs* a,
                                   int64_t r, int64_t h0, int64_t nh, int64_t kv_heads, int64_t d, int storage,
                                   int64_t group, int64_t j0, int64_t j1, float* mine, int64_t head_stride) {
  const bool packed = storage != KV_F32;
  const int64_t dr = kv_row_words(storage, d);
  for (int64_t i = 0; i < nh; ++i)
    for (int64_t g = 0; g < group; ++g) {
      float* pg = mine + i * head_stride + g * (d + 2);
      pg[0] = MASKED;
      std::fill(pg + 1, pg + d + 2, 0.0f);
    }
  if (j0 >= j1) return;                             // a chunk outside the query's keys
  float* sc = scratch(2, nh * group * ATTN_CHUNK);  // [nh][group][ATTN_CHUNK]
  const int64_t n = j1 - j0, bs = a->block_size;
  // the runs: [j0, next block start), then whole blocks, then the tail
  auto run_end = [&](int64_t p) { return std::min(j1, (p / bs + 1) * bs); };
  auto prefetch_run = [&](const float* arr, int64_t p) {   // run p's rows of every head taken
    const int64_t len = run_end(p) - p;
    for (int64_t i = 0; i < nh; ++i) prefetch_rows(arr + kv_slot(a, r, p, h0 + i, kv_heads, dr), len * dr);
  };
  float* rows = packed ? scratch(3, bs * d) : nullptr;
  for (int64_t p = j0; p < j1; p = run_end(p)) {
    prefetch_run(run_end(p) < j1 ? kc : vc, run_end(p) < j1 ? run_end(p) : j0);
    for (int64_t i = 0; i < nh; ++i) {
      const float* keys = kc + kv_slot(a, r, p, h0 + i, kv_heads, dr);
      if (packed) { kv_load(storage, keys, run_end(p) - p, d, dr, rows); keys = rows; }
      for (int64_t g = 0; g < group; ++g)
        score_run(qs + (i * group + g) * d, keys, run_end(p) - p, d, sc + (i * group + g) * ATTN_CHUNK + (p - j0));
    }
  }
  for (int64_t i = 0; i < nh; ++i)
    for (int64_t g = 0; g < group; ++g) {
      float* s = sc + (i * group + g) * ATTN_CHUNK;
      const float m = max_of(s, n);
      softmax_weights(s, n, m);
      mine[i * head_stride + g * (d + 2)] = m;
      mine[i * head_stride + g * (d + 2) + 1] = sum16(s, n);
    }
  for (int64_t p = j0; p < j1; p = run_end(p)) {
    if (run_end(p) < j1) prefetch_run(vc, run_end(p));
    for (int64_t i = 0; i < nh; ++i) {
      const float* values = vc + kv_slot(a, r, p, h0 + i, kv_heads, dr);
      if (packed) { kv_load(storage, values, run_end(p) - p, d, dr, rows); values = rows; }
      for (int64_t g = 0; g < group; ++g)
        pv_run<D>(sc + (i * group + g) * ATTN_CHUNK + (p - j0), values, run_end(p) - p, d,
                  mine + i * head_stride + g * (d + 2) + 2);
    }
  }
}

static inline void chunk_partial(const float* qs, const float* kc, const float* vc, const StepArgs* a,
                                 int64_t r, int64_t h0, int64_t nh, int64_t kv_heads, int64_t d, int storage,
                                 int64_t group, int64_t j0, int64_t j1, float* mine, int64_t head_stride) {
  switch (d) {                                      // the head sizes of the families we compile
    case 64: chunk_partial_d<64>(qs, kc, vc, a, r, h0, nh, kv_heads, d, storage, group, j0, j1, mine, head_stride); break;
    case 128: chunk_partial_d<128>(qs, kc, vc, a, r, h0, nh, kv_heads, d, storage, group, j0, j1, mine, head_stride); break;
    default: chunk_partial_d<0>(qs, kc, vc, a, r, h0, nh, kv_heads, d, storage, group, j0, j1, mine, head_stride);
  }
}

// one query head's output from its chunk partials (`chunks` of them, `stride` floats apart)
static inline void merge_chunks(const float* first, int64_t chunks, int64_t stride, int64_t d, float* o) {
  float M = MASKED;
  for (int64_t c = 0; c < chunks; ++c) M = std::max(M, first[c * stride]);
  for (int64_t e = 0; e < d; ++e) o[e] = 0.0f;
  float L = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* pc = first + c * stride;
    if (pc[1] == 0.0f) continue;                    // no key in this chunk
    const float f = exp_neg(pc[0] - M);
    L += pc[1] * f;
    axpy(o, f, pc + 2, d);
  }
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;     // no key: zeros
  for (int64_t e = 0; e < d; ++e) o[e] *= inv;
}

// the keys a query at position p sees in chunk c: [j0, j1)
static inline void chunk_range(int64_t p, int64_t window, int64_t c, int64_t* j0, int64_t* j1) {
  const int64_t first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
  *j0 = std::max(first, c * ATTN_CHUNK);
  *j1 = std::min(p + 1, (c + 1) * ATTN_CHUNK);
}

// the query heads of kv head hk's group, query i of row r (q: [b, heads, s, d]), times scale
static inline void scaled_queries(const float* q, int64_t r, int64_t i, int64_t s, int64_t heads, int64_t hk,
                                  int64_t group, int64_t d, float scale, float* qs) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qr = q + ((r * heads + hk * group + g) * s + i) * d;
    for (int64_t e = 0; e < d; ++e) qs[g * d + e] = qr[e] * scale;
  }
}

// Decode: one query per row; threads take (row, chunk) tasks over every kv head (or, with fewer
// (row, chunk) pairs than threads, one kv head a task), then the merge.
static void attention_decode(const float* q, const float* kc, const float* vc, const int64_t* pos,
                             const StepArgs* a, int64_t heads, int64_t kv_heads, int64_t d, int storage,
                             float scale, int64_t window, float* out) {
  const int64_t b = a->b, group = heads / kv_heads;
  int64_t chunks = 1;
  for (int64_t r = 0; r < b; ++r) chunks = std::max(chunks, pos[r] / ATTN_CHUNK + 1);
  const int64_t part = group * (d + 2);           // per (row, kv head, chunk): [g][m, l, o[d]]
  float* P = scratch(0, b * kv_heads * chunks * part);
  // A task takes every kv head of its (row, chunk): each block's K and V rows of all heads are one
  // contiguous read.  Cold cache, SmolLM2 heads, 2 threads, Zen 4: 10.3 -> 5.9 ns a head and key
  // at 1032 keys, 9.3-10.4 -> 6.7-7.1 at 160 keys (3 tasks for 2 threads, and still faster than 9
  // one-head tasks).  Below one chunk per thread it takes one kv head, so both threads work.
  const int64_t nh = b * chunks >= a->nthreads ? kv_heads : 1, tasks = b * (kv_heads / nh) * chunks;
  #pragma omp parallel for schedule(dynamic) num_threads(threads_for(tasks, a->nthreads))
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t r = t / ((kv_heads / nh) * chunks), h0 = (t / chunks) % (kv_heads / nh) * nh, c = t % chunks;
    int64_t j0, j1;
    chunk_range(pos[r], window, c, &j0, &j1);
    float* qs = scratch(1, nh * group * d);
    for (int64_t i = 0; i < nh; ++i) scaled_queries(q, r, 0, 1, heads, h0 + i, group, d, scale, qs + i * group * d);
    chunk_partial(qs, kc, vc, a, r, h0, nh, kv_heads, d, storage, group, j0, j1,
                  P + ((r * kv_heads + h0) * chunks + c) * part, chunks * part);
  }
  for (int64_t r = 0; r < b; ++r)                   // merge the chunks, in order
    for (int64_t hk = 0; hk < kv_heads; ++hk)
      for (int64_t g = 0; g < group; ++g)
        merge_chunks(P + ((r * kv_heads + hk) * chunks) * part + g * (d + 2), chunks, part, d,
                     out + (r * heads + hk * group + g) * d);
}

// q, k, v: [b, heads, s, d] (k, v with kv_heads).  Stores k, v at their positions through the
// block tables, then every query attends, causally and within `window` (0 = unbounded), over
// its row's cached positions.
// Yuan 2.0 Localized Filtering over the cache (ir/ops/filter.py): this step's LF inputs are
// stored in the cache's state slots (slot 2i in K, 2i+1 in V of layer `layers + i`) at their
// positions, and returned after the two inputs before the chunk (zeros before position 0).
static void lf_state(const float* x, const int64_t* pos, const StepArgs* a, int64_t layers, int64_t slot,
                     int64_t slots, int64_t kv_heads, int64_t d, float* out) {
  const int64_t b = a->b, s = a->s, w = kv_heads * d, h = slots * w;
  const int64_t layer_stride = a->num_blocks * kv_heads * a->block_size * d;
  for (int64_t r = 0; r < b; ++r) {
    const int64_t p0 = pos[r * s];
    for (int64_t j = 0; j < 2; ++j) {
      const int64_t p = p0 - 2 + j;
      float* dst = out + (r * (s + 2) + j) * h;
      if (p < 0) { memset(dst, 0, h * sizeof(float)); continue; }
      for (int64_t i = 0; i < slots; ++i) {
        const float* arr = ((slot + i) % 2 ? a->vcache : a->kcache) + (layers + (slot + i) / 2) * layer_stride;
        for (int64_t hh = 0; hh < kv_heads; ++hh)
          memcpy(dst + i * w + hh * d, arr + kv_slot(a, r, p, hh, kv_heads, d), d * sizeof(float));
      }
    }
    for (int64_t t = 0; t < s; ++t) {
      const float* src = x + (r * s + t) * h;
      memcpy(out + (r * (s + 2) + 2 + t) * h, src, h * sizeof(float));
      for (int64_t i = 0; i < slots; ++i) {
        float* arr = ((slot + i) % 2 ? a->vcache : a->kcache) + (layers + (slot + i) / 2) * layer_stride;
        for (int64_t hh = 0; hh < kv_heads; ++hh)
          memcpy(arr + kv_slot(a, r, pos[r * s + t], hh, kv_heads, d), src + i * w + hh * d, d * sizeof(float));
      }
    }
  }
}

// row i of out = [x[i] ; x[i+1]] per sequence row, where x's row j holds position p0 - offset + j
// and counts as zero below position 0 (the convolutions' zero padding)
static void lf_pairs(const float* x, const int64_t* pos, int64_t b, int64_t n, int64_t c, int64_t s,
                     int64_t offset, float* out) {
  for (int64_t r = 0; r < b; ++r)
    for (int64_t i = 0; i + 1 < n; ++i)
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t j = i + half;
        float* dst = out + ((r * (n - 1) + i) * 2 + half) * c;
        if (pos[r * s] - offset + j < 0) memset(dst, 0, c * sizeof(float));
        else memcpy(dst, x + (r * n + j) * c, c * sizeof(float));
      }
}

// `storage`: how the cache holds a row (KVStorage: f32 as it is, int8 or f16 packed).
static void attention_cached(const float* q, const float* k, const float* v, const int64_t* pos,
                             const StepArgs* a, int layer, int64_t heads, int64_t kv_heads,
                             int64_t d, float scale, int64_t window, float* out, int storage = KV_F32) {
  const int64_t b = a->b, s = a->s, bs = a->block_size, dr = kv_row_words(storage, d);
  const int64_t layer_stride = a->num_blocks * kv_heads * bs * dr;
  float* kc = a->kcache + layer * layer_stride;
  float* vc = a->vcache + layer * layer_stride;
  for (int64_t r = 0; r < b; ++r)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t i = 0; i < s; ++i) {
        const int64_t p = pos[r * s + i];
        const int64_t slot = kv_slot(a, r, p, h, kv_heads, dr);
        const float* kr = k + ((r * kv_heads + h) * s + i) * d;
        const float* vr = v + ((r * kv_heads + h) * s + i) * d;
        kv_store(storage, kr, d, kc + slot);
        kv_store(storage, vr, d, vc + slot);
      }
  if (s == 1) {
    attention_decode(q, kc, vc, pos, a, heads, kv_heads, d, storage, scale, window, out);
    return;
  }
  const int64_t group = heads / kv_heads, tasks = b * s * kv_heads, part = group * (d + 2);
  #pragma omp parallel for schedule(dynamic) num_threads(threads_for(tasks, a->nthreads))
  for (int64_t t = 0; t < tasks; ++t) {             // (row, query, kv head): its chunks, merged
    const int64_t r = t / (s * kv_heads), i = (t / kv_heads) % s, hk = t % kv_heads;
    const int64_t p = pos[r * s + i], chunks = p / ATTN_CHUNK + 1;
    float* qs = scratch(1, group * d);
    scaled_queries(q, r, i, s, heads, hk, group, d, scale, qs);
    float* P = scratch(0, chunks * part);
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t j0, j1;
      chunk_range(p, window, c, &j0, &j1);
      chunk_partial(qs, kc, vc, a, r, hk, 1, kv_heads, d, storage, group, j0, j1, P + c * part, 0);
    }
    for (int64_t g = 0; g < group; ++g)
      merge_chunks(P + g * (d + 2), chunks, part, d, out + ((r * heads + hk * group + g) * s + i) * d);
  }
}

}  // namespace amxc
