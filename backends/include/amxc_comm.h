// amxc collectives: the communicator a tensor-parallel step calls between layers, inside the
// native code (no Python in between).  Header-only; every tier (-march=x86-64 .. x86-64-v4).
// runtime/comm.py builds the AmxcComm (ctypes mirror CComm) and owns the shared segments.
//
// Shared memory (transport 0).  Each rank owns one segment: a 4 KiB header, then two message
// slots.  Only the owner writes its segment; peers map it read-only.  Header words, each on its
// own 64-byte line:  pid (rendezvous), state (0 running, 1 closing, 2 failed + message),
// arrive (the last round whose input this rank published in its slot), done (the last
// reduce-scatter round whose reduced slice it published).  A message larger than a slot goes
// in pieces; every piece is one round r, using slot r%2.
//   one-shot (piece < rs_min_bytes): wait until every peer's arrive >= r-1 (they finished round
//     r-2, so slot r%2 is free -- having finished round r-1 ourselves implies it, so this is
//     one load per peer, kept as the stated invariant), copy in, publish arrive=r (release),
//     wait for every peer's arrive >= r (acquire), sum all slots in rank order.  One slot
//     would need a second wait per round: peers may still be summing round r-1's.
//   reduce-scatter + all-gather: same start, but a rank copies in only the slices its peers
//     sum; then each rank sums its 1/N slice of every rank's input in rank order into that
//     slice of its own slot, publishes done=r, waits for every peer's done >= r and copies
//     the reduced slices out.  Each element is ((x0 + x1) + x2) + .. of the same inputs
//     either way, so both give identical bits.
// Waits spin `spin` pauses, then sched_yield (oversubscribed ranks still progress).  A waiter
// reads the watched peer's state word each round and, every 50 ms, checks every lagging peer's
// liveness (kill(pid, 0), a zombie in /proc/<pid>/stat): a dead, closing or failed peer is an
// error at once; a peer whose word does not move for timeout_s is a timeout.  A failing call
// marks the communicator broken (every later call fails) and publishes state=failed with its
// message, so peers waiting on it fail fast and report the root cause.
//
// MPI (transport 1): MPI_Allreduce(MPI_IN_PLACE) / MPI_Allgather through the function pointers
// (MPICH ABI: handles are ints, MPI_IN_PLACE is (void*)-1); a nonzero return is an error.
// Its summation order is MPI's own: bit-identical to the shm transport only at 2 ranks.
#pragma once
#include <stdint.h>
#include <stdarg.h>
#include <string.h>
#include <stdio.h>
#include <errno.h>
#include <signal.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#ifdef _OPENMP
#include <omp.h>
#endif

struct AmxcComm {            // filled by runtime/comm.py (ctypes mirror: CComm)
  int32_t rank, ranks;       // 1 < ranks <= 8
  int32_t transport;         // 0 = shared memory, 1 = MPI
  int32_t spin;              // pause-spins before each sched_yield() while waiting
  double timeout_s;          // a peer that makes no progress this long: error
  int64_t slot_bytes;        // capacity of one message slot (larger messages go in pieces)
  uint8_t* seg[8];           // every rank's shared segment, mapped in this process (transport 0)
  int64_t pid[8];            // each rank's pid (liveness)
  uint64_t seq;              // collectives completed so far by this rank (advanced here)
  int64_t step;              // set by the runtime before each step: named in error messages
  void* mpi_allreduce;       // &MPI_Allreduce of the loaded MPI library (transport 1)
  void* mpi_allgather;       // &MPI_Allgather
  int64_t mpi_comm, mpi_float, mpi_sum;   // MPICH handle values
  char error[256];           // set when a call fails: peer rank, its pid, the step, the collective
  // -- fields after `error`: this header's own state --
  int64_t rs_min_bytes;      // shm: pieces of at least this many bytes use reduce-scatter + all-gather
  int32_t threads;           // OpenMP threads for summing large pieces (<= 1: the calling thread)
  int32_t broken;            // a call failed: the group's state is unknown, every later call fails
  uint64_t round;            // shm rounds (message pieces) completed; the slot protocol's counter
  void* mpi_error_string;    // &MPI_Error_string (transport 1; may be null)
};

namespace amxc {
namespace comm {

// segment layout (runtime/comm.py writes the same offsets)
enum : int64_t {
  HDR_PID = 64, HDR_STATE = 128, HDR_ARRIVE = 192, HDR_DONE = 256, HDR_MESSAGE = 512,
  HEADER_BYTES = 4096,
};
enum : uint64_t { RUNNING = 0, CLOSING = 1, FAILED = 2 };
static const int64_t MESSAGE_BYTES = 256;
static const double CHECK_INTERVAL_S = 0.05;
static const int64_t BLOCK = 256;                 // floats summed per stack block
static const int64_t PARALLEL_MIN = 1 << 16;      // floats: below this, summing stays serial

static inline double clock_s() {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static inline uint64_t load(const uint8_t* seg, int64_t off) {
  return __atomic_load_n(reinterpret_cast<const uint64_t*>(seg + off), __ATOMIC_ACQUIRE);
}

static inline void publish(uint8_t* seg, int64_t off, uint64_t v) {
  __atomic_store_n(reinterpret_cast<uint64_t*>(seg + off), v, __ATOMIC_RELEASE);
}

static inline float* slot(const AmxcComm* c, int k, uint64_t round) {
  return reinterpret_cast<float*>(c->seg[k] + HEADER_BYTES + (int64_t)(round & 1) * c->slot_bytes);
}

// true if `pid` has exited (gone, or a zombie its parent has not reaped yet)
static inline bool process_gone(int64_t pid) {
  if (pid <= 0) return false;
  const int saved = errno;
  bool gone = kill((pid_t)pid, 0) == -1 && errno == ESRCH;
  if (!gone) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      gone = errno == ENOENT;
    } else {
      const ssize_t r = read(fd, buf, sizeof buf - 1);
      close(fd);
      if (r > 0) {
        buf[r] = 0;
        const char* p = strrchr(buf, ')');        // the name may hold spaces and parentheses
        gone = p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
      }
    }
  }
  errno = saved;
  return gone;
}

// "step 57 (all-reduce #912)": #k counts this communicator's collectives from 1 (c->seq + 1)
static inline void where(const AmxcComm* c, const char* op, char* buf, size_t size) {
  snprintf(buf, size, "step %lld (%s #%llu)", (long long)c->step, op, (unsigned long long)(c->seq + 1));
}

// Sets c->error, marks the communicator broken and (shm) tells the peers, so they stop waiting.
__attribute__((format(printf, 2, 3)))
static int fail(AmxcComm* c, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->error, sizeof c->error, fmt, ap);
  va_end(ap);
  c->broken = 1;
  if (c->transport == 0 && c->rank >= 0 && c->rank < 8 && c->seg[c->rank]) {
    uint8_t* own = c->seg[c->rank];
    if (load(own, HDR_STATE) != FAILED) {
      memcpy(own + HDR_MESSAGE, c->error, MESSAGE_BYTES);
      publish(own, HDR_STATE, FAILED);
    }
  }
  return 1;
}

// Why lagging peer k will not come (failed, closing, or -- when check_process -- exited), into
// why[]; false if it still may.
static bool peer_lost(const AmxcComm* c, int k, const char* op, bool check_process, char* why, size_t size) {
  char at[96];
  const uint64_t state = load(c->seg[k], HDR_STATE);
  if (state == FAILED) {
    char msg[MESSAGE_BYTES];
    memcpy(msg, c->seg[k] + HDR_MESSAGE, MESSAGE_BYTES);
    msg[MESSAGE_BYTES - 1] = 0;
    snprintf(why, size, "%s (reported by rank %d)", msg, k);
    return true;
  }
  const char* what = state == CLOSING ? "closed its communicator"
                   : check_process && process_gone(c->pid[k]) ? "exited" : nullptr;
  if (!what) return false;
  where(c, op, at, sizeof at);
  snprintf(why, size, "rank %d (pid %lld) %s during %s", k, (long long)c->pid[k], what, at);
  return true;
}

// Waits until every peer's word at `off` is >= target.  A peer's word is published before its
// state changes or it exits, so a word re-read after seeing either is final: a peer that
// finished its part first is no error.
static int wait_peers(AmxcComm* c, int64_t off, uint64_t target, const char* op) {
  const int me = c->rank, n = c->ranks;
  const int spin = c->spin > 0 ? c->spin : 0;
  double checked = -1;                            // set on the first slow round: checks start 50 ms in
  char why[2 * MESSAGE_BYTES];
  for (int k = 0; k < n; ++k) {
    if (k == me) continue;
    const uint8_t* s = c->seg[k];
    uint64_t seen = load(s, off);
    if (seen >= target) continue;
    double since = clock_s();                     // each peer gets its own timeout
    for (;;) {
      bool ready = false;
      for (int i = 0; i < spin && !ready; ++i) {
        relax();
        ready = load(s, off) >= target;
      }
      if (ready) break;
      sched_yield();
      const uint64_t word = load(s, off);
      if (word >= target) break;
      const double t = clock_s();
      if (word != seen) { since = t; seen = word; }
      if (checked < 0) checked = t;
      const bool periodic = t - checked >= CHECK_INTERVAL_S;
      if (periodic) checked = t;
      // the watched peer's state every round, lagging peers' processes every CHECK_INTERVAL_S
      bool lost = peer_lost(c, k, op, periodic, why, sizeof why);
      for (int j = 0; periodic && !lost && j < n; ++j)
        if (j != me && j != k && load(c->seg[j], off) < target)
          lost = peer_lost(c, j, op, true, why, sizeof why) && load(c->seg[j], off) < target;
      if (lost) {
        if (load(s, off) >= target) break;
        return fail(c, "%s", why);
      }
      if (t - since > c->timeout_s) {
        char at[96];
        where(c, op, at, sizeof at);
        return fail(c, "rank %d (pid %lld) made no progress for %.1f s during %s", k,
                    (long long)c->pid[k], c->timeout_s, at);
      }
    }
  }
  return 0;
}

// dst[i] (and dst2[i]) = ((src0[i] + src1[i]) + src2[i]) + .. for i in [lo, hi).  dst may be one of the
// sources (the one-shot sums into x, which is this rank's source): each block is read whole
// before it is written.
static void sum_ranks(const float* const* src, int n, float* dst, int64_t lo, int64_t hi, int threads,
                      float* dst2 = nullptr) {
  const int64_t blocks = (hi - lo + BLOCK - 1) / BLOCK;
#ifdef _OPENMP
  #pragma omp parallel for schedule(static) num_threads(threads > 1 ? threads : 1) \
      if (threads > 1 && hi - lo >= PARALLEL_MIN)
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = lo + b * BLOCK, len = hi - i0 < BLOCK ? hi - i0 : BLOCK;
    float t[BLOCK];
    const float* a0 = src[0] + i0;
    const float* a1 = src[1] + i0;
    for (int64_t j = 0; j < len; ++j) t[j] = a0[j] + a1[j];
    for (int k = 2; k < n; ++k) {
      const float* ak = src[k] + i0;
      for (int64_t j = 0; j < len; ++j) t[j] += ak[j];
    }
    memcpy(dst + i0, t, len * sizeof(float));
    if (dst2) memcpy(dst2 + i0, t, len * sizeof(float));
  }
  (void)threads;
}

static int check(AmxcComm* c, const char* op, int64_t n) {
  if (c->broken) return 1;                        // c->error still says why
  char at[96];
  if (c->ranks < 2 || c->ranks > 8 || c->rank < 0 || c->rank >= c->ranks) {
    c->broken = 1;
    snprintf(c->error, sizeof c->error, "bad communicator: rank %d of %d ranks (2..8 ranks)", c->rank, c->ranks);
    return 1;
  }
  where(c, op, at, sizeof at);
  if (n < 0) return fail(c, "negative length %lld in %s", (long long)n, at);
  if (c->transport == 0) {
    if (c->slot_bytes < 4096 || c->slot_bytes % 64)
      return fail(c, "bad communicator: slot of %lld bytes (at least 4096, a multiple of 64) in %s",
                  (long long)c->slot_bytes, at);
    for (int k = 0; k < c->ranks; ++k)
      if (!c->seg[k]) return fail(c, "bad communicator: rank %d's segment is not mapped in %s", k, at);
  } else if (c->transport == 1) {
    if (!c->mpi_allreduce || !c->mpi_allgather)
      return fail(c, "bad communicator: MPI functions missing in %s", at);
  } else {
    return fail(c, "bad communicator: unknown transport %d in %s", c->transport, at);
  }
  return 0;
}

static int shm_all_reduce(AmxcComm* c, float* x, int64_t n) {
  static const char* op = "all-reduce";
  const int me = c->rank, N = c->ranks;
  const int64_t cap = c->slot_bytes / (int64_t)sizeof(float);
  for (int64_t o = 0; o < n; o += cap) {
    const int64_t m = n - o < cap ? n - o : cap;
    const uint64_t r = c->round + 1;
    float* mine = slot(c, me, r);
    const float* src[8];
    for (int k = 0; k < N; ++k) src[k] = k == me ? x + o : slot(c, k, r);   // own input: the same values
    if (wait_peers(c, HDR_ARRIVE, r - 1, op)) return 1;   // slot r%2 is free
    if (m * (int64_t)sizeof(float) < c->rs_min_bytes) {
      memcpy(mine, x + o, m * sizeof(float));
      publish(c->seg[me], HDR_ARRIVE, r);
      if (wait_peers(c, HDR_ARRIVE, r, op)) return 1;
      sum_ranks(src, N, x + o, 0, m, c->threads);
    } else {
      // slices of whole cache lines (16 floats), so no two ranks write one line; peers read
      // every slice of this slot but ours, so only theirs are copied in
      const int64_t chunk = ((m + N - 1) / N + 15) / 16 * 16;
      const int64_t lo = me * chunk < m ? me * chunk : m, hi = lo + chunk < m ? lo + chunk : m;
      memcpy(mine, x + o, lo * sizeof(float));
      memcpy(mine + hi, x + o + hi, (m - hi) * sizeof(float));
      publish(c->seg[me], HDR_ARRIVE, r);
      if (wait_peers(c, HDR_ARRIVE, r, op)) return 1;
      sum_ranks(src, N, mine, lo, hi, c->threads, x + o);   // for the peers, and our own result
      publish(c->seg[me], HDR_DONE, r);
      if (wait_peers(c, HDR_DONE, r, op)) return 1;
      for (int k = 0; k < N; ++k) {
        if (k == me) continue;
        const int64_t a = k * chunk < m ? k * chunk : m, b = a + chunk < m ? a + chunk : m;
        if (b > a) memcpy(x + o + a, slot(c, k, r) + a, (b - a) * sizeof(float));
      }
    }
    c->round = r;
  }
  return 0;
}

static int shm_all_gather(AmxcComm* c, const float* x, int64_t n, float* out) {
  static const char* op = "all-gather";
  const int me = c->rank, N = c->ranks;
  const int64_t cap = c->slot_bytes / (int64_t)sizeof(float);
  for (int64_t o = 0; o < n; o += cap) {
    const int64_t m = n - o < cap ? n - o : cap;
    const uint64_t r = c->round + 1;
    if (wait_peers(c, HDR_ARRIVE, r - 1, op)) return 1;
    memcpy(slot(c, me, r), x + o, m * sizeof(float));
    publish(c->seg[me], HDR_ARRIVE, r);
    if (wait_peers(c, HDR_ARRIVE, r, op)) return 1;
    for (int k = 0; k < N; ++k)                   // own part from the slot too: x may be out + rank*n
      memcpy(out + k * n + o, slot(c, k, r), m * sizeof(float));
    c->round = r;
  }
  return 0;
}

typedef int (*MpiAllreduce)(const void*, void*, int, int, int, int);
typedef int (*MpiAllgather)(const void*, int, int, void*, int, int, int);
typedef int (*MpiErrorString)(int, char*, int*);

static int mpi_failed(AmxcComm* c, const char* fn, int rc, const char* op) {
  char at[96], text[1024] = "";                   // MPI_MAX_ERROR_STRING is 1024 in MPICH
  int len = 0;
  if (c->mpi_error_string && ((MpiErrorString)c->mpi_error_string)(rc, text, &len) != 0) text[0] = 0;
  text[sizeof text - 1] = 0;
  char* stack = strstr(text, ", error stack");    // MPICH appends a multi-line call stack
  if (stack) *stack = 0;
  for (char* p = text; *p; ++p)
    if (*p == '\n') *p = ' ';
  where(c, op, at, sizeof at);
  return fail(c, "%s returned %d (%.120s) during %s", fn, rc, text[0] ? text : "no message", at);
}

static const int64_t MPI_COUNT_MAX = 0x7fffffff;

}  // namespace comm

// x[0..n) <- the sum over ranks of x, added in rank order (((x0 + x1) + x2) + x3) on every
// rank, so all ranks get identical bits.  Returns 0, or nonzero with c->error set.
static inline int all_reduce_sum(AmxcComm* c, float* x, int64_t n) {
  using namespace comm;
  if (check(c, "all-reduce", n)) return 1;
  if (c->transport == 0) {
    if (shm_all_reduce(c, x, n)) return 1;
  } else {
    for (int64_t o = 0; o < n; o += MPI_COUNT_MAX) {    // elementwise: pieces change nothing
      const int m = (int)(n - o < MPI_COUNT_MAX ? n - o : MPI_COUNT_MAX);
      const int rc = ((MpiAllreduce)c->mpi_allreduce)((const void*)(intptr_t)-1, x + o, m,
                                                      (int)c->mpi_float, (int)c->mpi_sum, (int)c->mpi_comm);
      if (rc != 0) return mpi_failed(c, "MPI_Allreduce", rc, "all-reduce");
    }
  }
  c->seq += 1;
  return 0;
}

// out[r*n .. (r+1)*n) <- rank r's x, on every rank.  x may be out + rank*n.
static inline int all_gather(AmxcComm* c, const float* x, int64_t n, float* out) {
  using namespace comm;
  if (check(c, "all-gather", n)) return 1;
  if (c->transport == 0) {
    if (shm_all_gather(c, x, n, out)) return 1;
  } else if (n > 0) {
    if (n > MPI_COUNT_MAX) {
      char at[96];
      where(c, "all-gather", at, sizeof at);
      return fail(c, "all-gather of %lld floats per rank is too large for the MPI transport (at most %lld) in %s",
                  (long long)n, (long long)MPI_COUNT_MAX, at);
    }
    const bool in_place = x == out + c->rank * n;
    const void* send = in_place ? (const void*)(intptr_t)-1 : (const void*)x;
    const int rc = ((MpiAllgather)c->mpi_allgather)(send, (int)n, (int)c->mpi_float, out, (int)n,
                                                    (int)c->mpi_float, (int)c->mpi_comm);
    if (rc != 0) return mpi_failed(c, "MPI_Allgather", rc, "all-gather");
  }
  c->seq += 1;
  return 0;
}

}  // namespace amxc
