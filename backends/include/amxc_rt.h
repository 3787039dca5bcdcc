// amxc native runtime: the step ABI and the ISA-independent kernels (plain C++ that the compiler
// vectorizes for each tier's flags).  Generated model code (backends/templates/model.cpp.j2)
// includes this header; the heavy kernels (GEMV/GEMM/attention) come from per-tier templates.
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <algorithm>
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
};

#define AMXC_RESTRICT __restrict__

namespace amxc {

static inline int threads_for(int64_t work, int nt) { return work < 2 ? 1 : nt; }

// ---- elementwise -------------------------------------------------------------------------
struct Add { static inline float f(float a, float b) { return a + b; } };
struct Sub { static inline float f(float a, float b) { return a - b; } };
struct Mul { static inline float f(float a, float b) { return a * b; } };
struct Div { static inline float f(float a, float b) { return a / b; } };
struct Cos { static inline float f(float a) { return cosf(a); } };
struct Sin { static inline float f(float a) { return sinf(a); } };
struct Neg { static inline float f(float a) { return -a; } };
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

// out = in transposed by perm (out dim d is in dim perm[d]); element size esize bytes
static void permute(const uint8_t* in, uint8_t* out, int esize, int rank, const int64_t* shape,
                    const int* perm) {
  int64_t in_stride[6], out_shape[6], n = 1;
  int64_t st = 1;
  for (int d = rank - 1; d >= 0; --d) { in_stride[d] = st; st *= shape[d]; }
  for (int d = 0; d < rank; ++d) { out_shape[d] = shape[perm[d]]; n *= out_shape[d]; }
  int64_t idx[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t o = 0; o < n; ++o) {
    int64_t src = 0;
    for (int d = 0; d < rank; ++d) src += idx[d] * in_stride[perm[d]];
    memcpy(out + o * esize, in + src * esize, esize);
    for (int d = rank - 1; d >= 0; --d) { if (++idx[d] < out_shape[d]) break; idx[d] = 0; }
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

static void embedding(const float* table, const int64_t* ids, int64_t n, int64_t dim, float* out) {
  for (int64_t i = 0; i < n; ++i) memcpy(out + i * dim, table + ids[i] * dim, dim * sizeof(float));
}

// ---- normalization ----------------------------------------------------------------------
static void rms_norm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += (double)xr[i] * xr[i];
    const float inv = (float)(1.0 / sqrt(ss / dim + eps));
    for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

static void layer_norm(const float* x, const float* w, const float* bias, int64_t rows, int64_t dim,
                       float eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    double mean = 0, var = 0;
    for (int64_t i = 0; i < dim; ++i) mean += xr[i];
    mean /= dim;
    for (int64_t i = 0; i < dim; ++i) var += ((double)xr[i] - mean) * ((double)xr[i] - mean);
    const float inv = (float)(1.0 / sqrt(var / dim + eps)), m = (float)mean;
    for (int64_t i = 0; i < dim; ++i) o[i] = (xr[i] - m) * inv * w[i] + (bias ? bias[i] : 0.0f);
  }
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
// q, k, v: [b, heads, s, d] (k, v with kv_heads).  Stores k, v at their positions through the
// block tables, then each query attends, causally and within `window` (0 = unbounded), over its
// row's cached positions 0..pos.  Online softmax in fp32; one (row, head, query) per task.
static void attention_cached(const float* q, const float* k, const float* v, const int64_t* pos,
                             const StepArgs* a, int layer, int64_t heads, int64_t kv_heads,
                             int64_t d, float scale, int64_t window, float* out) {
  const int64_t b = a->b, s = a->s, bs = a->block_size;
  const int64_t layer_stride = a->num_blocks * kv_heads * bs * d;
  float* kc = a->kcache + layer * layer_stride;
  float* vc = a->vcache + layer * layer_stride;
  for (int64_t r = 0; r < b; ++r)
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t i = 0; i < s; ++i) {
        const int64_t p = pos[r * s + i];
        const int64_t blk = a->block_tables[r * a->max_blocks + p / bs];
        const int64_t slot = ((blk * kv_heads + h) * bs + p % bs) * d;
        memcpy(kc + slot, k + ((r * kv_heads + h) * s + i) * d, d * sizeof(float));
        memcpy(vc + slot, v + ((r * kv_heads + h) * s + i) * d, d * sizeof(float));
      }
  const int64_t group = heads / kv_heads, tasks = b * heads * s;
  #pragma omp parallel for num_threads(threads_for(tasks, a->nthreads)) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t r = t / (heads * s), h = (t / s) % heads, i = t % s, hk = h / group;
    const int64_t p = pos[r * s + i];
    const int64_t first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    const float* qr = q + ((r * heads + h) * s + i) * d;
    float acc[512];
    for (int64_t j = 0; j < d; ++j) acc[j] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int64_t kp = first; kp <= p; ++kp) {
      const int64_t blk = a->block_tables[r * a->max_blocks + kp / bs];
      const int64_t slot = ((blk * kv_heads + hk) * bs + kp % bs) * d;
      const float* kr = kc + slot;
      float sc = 0.0f;
      for (int64_t j = 0; j < d; ++j) sc += qr[j] * kr[j];
      sc *= scale;
      const float mn = std::max(m, sc);
      const float corr = expf(m - mn), e = expf(sc - mn);
      l = l * corr + e;
      const float* vr = vc + slot;
      for (int64_t j = 0; j < d; ++j) acc[j] = acc[j] * corr + e * vr[j];
      m = mn;
    }
    float* o = out + ((r * heads + h) * s + i) * d;
    const float inv = l > 0 ? 1.0f / l : 0.0f;
    for (int64_t j = 0; j < d; ++j) o[j] = acc[j] * inv;
  }
}

}  // namespace amxc
