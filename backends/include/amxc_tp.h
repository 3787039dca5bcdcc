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

}  // namespace amxc
