// amxc tensor parallelism: what the generated code of a sharded module (the shard-tp pass) calls
// around the communicator (amxc_comm.h).  Included after amxc_rt.h when the module has tp > 1.
#pragma once
#include "amxc_comm.h"

// a collective failed: the step returns this status and the runtime reads AmxcComm::error
#define AMXC_COMM_FAILED 90

namespace amxc {

// The vocab-split head's logits: x is this rank's [rows, width] slice; out [rows, ranks * width]
// gets every rank's slice side by side (rank r's at columns r * width).  The communicator
// gathers rank-major, [ranks][rows * width]; the copy below interleaves it.
static inline int gather_cols(AmxcComm* c, const float* x, int64_t rows, int64_t width, float* out) {
  if (rows == 1) return all_gather(c, x, width, out);
  static thread_local float* tmp = nullptr;
  static thread_local int64_t cap = 0;
  const int64_t need = (int64_t)c->ranks * rows * width;
  if (need > cap) { free(tmp); cap = need; tmp = (float*)malloc(need * sizeof(float)); }
  const int rc = all_gather(c, x, rows * width, tmp);
  if (rc != 0) return rc;
  for (int r = 0; r < c->ranks; ++r)
    for (int64_t i = 0; i < rows; ++i)
      memcpy(out + (i * c->ranks + r) * width, tmp + (r * rows + i) * width, width * sizeof(float));
  return 0;
}

// The all-reduce of a row-parallel product's float64 partial sums (the acc64 GEMVs): every
// rank's partials gathered bit for bit, added in rank order in float64 and rounded once into
// out, so the float is the unsplit product's (backends/plan.py).  Gathering sends ranks x the
// bytes of a reduce-scatter, which at a decode step's few KiB is latency either way.
static inline int all_reduce_sum_f64(AmxcComm* c, const double* x, int64_t n, float* out) {
  static thread_local double* tmp = nullptr;
  static thread_local int64_t cap = 0;
  const int64_t need = (int64_t)c->ranks * n;
  if (need > cap) { free(tmp); cap = need; tmp = (double*)malloc(need * sizeof(double)); }
  const int rc = all_gather(c, (const float*)x, 2 * n, (float*)tmp);
  if (rc != 0) return rc;
  for (int64_t i = 0; i < n; ++i) {
    double s = tmp[i];
    for (int r = 1; r < c->ranks; ++r) s += tmp[(int64_t)r * n + i];
    out[i] = (float)s;
  }
  return 0;
}

}  // namespace amxc
