"""The tensor-parallel communicator: the groups whose AmxcComm the native step's collectives use
(backends/include/amxc_comm.h, where the wait loop and the summation live).

One process per rank.  `ShmGroup` (one host, transport 0): every rank owns a segment in
/dev/shm -- a 4 KiB header and two message slots -- that only it writes and the others map
read-only.  Header words, each on its own 64-byte line: pid, state (running / closing / failed
with a message), arrive (the last round whose input is in the rank's slot) and done (the last
reduce-scatter round whose reduced slice is).  A message piece is one round r in slot r%2; a
rank refills slot r%2 only after every peer's arrive reached r-1, i.e. it finished round r-2
(which finishing round r-1 already implies), so back-to-back collectives need no barrier.  Words are published with release stores and read
with acquire loads.  Small pieces are one-shot (copy in, publish, wait, sum every slot in rank
order); pieces of rs_min_bytes and more are reduce-scatter + all-gather (each rank sums its
slice of every slot in rank order, publishes it, copies the others'); the bits are the same.

Lifecycle: rank 0 `create`s the segments (O_EXCL, 0600, named amxc-<pid>-<random>-r<k>) and
hands the group name to the others, which `attach`; every rank then `join`s: writes its pid and
waits (bounded) until all have, and the files are unlinked at once, so nothing stays in
/dev/shm whatever happens to the processes later.  A rank that dies, closes, fails or stalls
is detected by its waiting peers (amxc_comm.h): the native call returns an error naming the
peer, its pid, the step and the collective.

`MpiGroup` (transport 1): the same struct over mpi4py's communicator, with the MPI library's
own MPI_Allreduce / MPI_Allgather (MPICH ABI) called from the native step.

`all_reduce_sum` / `all_gather` call the native functions from Python: for tests, benchmarks
and the reference path.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import os
import re
import secrets
import stat
import struct
import time
import weakref
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
MAX_RANKS = 8
HEADER_BYTES = 4096
HDR_PID, HDR_STATE, HDR_ARRIVE, HDR_DONE, HDR_MESSAGE = 64, 128, 192, 256, 512
RUNNING, CLOSING, FAILED = 0, 1, 2
MAGIC, VERSION = b"AMXCCOMM", 1
IDENT = struct.Struct("<8sIiiiqqq")   # magic version ranks rank pad slot_bytes rs_min_bytes creator_pid

MIN_SLOT_BYTES, MAX_SLOT_BYTES = 4096, 1 << 30
DEFAULT_SLOT_BYTES = 4 << 20          # a 4 MiB message in one piece; larger ones go in pieces
DEFAULT_RS_MIN_BYTES = 256 << 10      # below: one-shot; from here: reduce-scatter + all-gather
DEFAULT_SPIN = 64                     # pauses between sched_yield()s while waiting
DEFAULT_TIMEOUT_S = 60.0
NAME_RE = re.compile(r"amxc-[1-9][0-9]{0,9}-[0-9a-f]{16}\Z")


class CommError(RuntimeError):
    """A group cannot be made or joined, or a collective failed; the message names the rank."""


class CComm(ctypes.Structure):
    """The mirror of struct AmxcComm (amxc_comm.h); _native() checks the layout against g++'s."""
    _fields_ = [
        ("rank", ctypes.c_int32), ("ranks", ctypes.c_int32),
        ("transport", ctypes.c_int32), ("spin", ctypes.c_int32),
        ("timeout_s", ctypes.c_double),
        ("slot_bytes", ctypes.c_int64),
        ("seg", ctypes.c_void_p * MAX_RANKS),
        ("pid", ctypes.c_int64 * MAX_RANKS),
        ("seq", ctypes.c_uint64),
        ("step", ctypes.c_int64),
        ("mpi_allreduce", ctypes.c_void_p), ("mpi_allgather", ctypes.c_void_p),
        ("mpi_comm", ctypes.c_int64), ("mpi_float", ctypes.c_int64), ("mpi_sum", ctypes.c_int64),
        ("error", ctypes.c_char * 256),
        ("rs_min_bytes", ctypes.c_int64),
        ("threads", ctypes.c_int32),
        ("broken", ctypes.c_int32),
        ("round", ctypes.c_uint64),
        ("mpi_error_string", ctypes.c_void_p),
    ]


# ---- the native entry points, for Python callers -------------------------------------------

_SOURCE = r"""
#include <stddef.h>
#include "amxc_comm.h"
extern "C" {
int amxc_comm_all_reduce_sum(AmxcComm* c, float* x, int64_t n) { return amxc::all_reduce_sum(c, x, n); }
int amxc_comm_all_gather(AmxcComm* c, const float* x, int64_t n, float* out) {
  return amxc::all_gather(c, x, n, out);
}
// sizeof, then each field's offset in declaration order: checked against CComm
int amxc_comm_layout(int64_t* out) {
  int i = 0;
  out[i++] = sizeof(AmxcComm);
#define F(f) out[i++] = offsetof(AmxcComm, f);
  F(rank) F(ranks) F(transport) F(spin) F(timeout_s) F(slot_bytes) F(seg) F(pid) F(seq) F(step)
  F(mpi_allreduce) F(mpi_allgather) F(mpi_comm) F(mpi_float) F(mpi_sum) F(error)
  F(rs_min_bytes) F(threads) F(broken) F(round) F(mpi_error_string)
#undef F
  return i;
}
}
"""


@functools.lru_cache(maxsize=None)
def _native(tier: str | None = None) -> ctypes.CDLL:
    """The collectives as a small library built with amxc's toolchain (cached), layout-checked."""
    from amxc.backends import isa, toolchain
    lib = toolchain.load(toolchain.build(_SOURCE, tier or isa.best_tier(), "comm"))
    lib.amxc_comm_all_reduce_sum.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.amxc_comm_all_gather.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.amxc_comm_layout.argtypes = [ctypes.c_void_p]
    out = (ctypes.c_int64 * 64)()
    count = lib.amxc_comm_layout(out)
    native = list(out[:count])
    mirror = [ctypes.sizeof(CComm)] + [getattr(CComm, name).offset for name, _ in CComm._fields_]
    if native != mirror:
        raise CommError(f"CComm does not mirror struct AmxcComm (sizeof and offsets: native {native}, "
                        f"ctypes {mirror}); update runtime/comm.py with amxc_comm.h")
    return lib


def _array(group, array) -> np.ndarray:
    if not isinstance(group, _Group):
        raise TypeError(f"expected a ShmGroup or MpiGroup, got {type(group).__name__}")
    return np.array(array, dtype=np.float32, order="C", copy=True)


def _check(group: "_Group", rc: int) -> None:
    if rc != 0:
        raise CommError(group.comm.error.decode(errors="replace") or "collective failed")


def all_reduce_sum(group: "_Group", array) -> np.ndarray:
    """The rank-order sum of `array` over the group's ranks (a new float32 array, same shape)."""
    x = _array(group, array)
    _check(group, _native().amxc_comm_all_reduce_sum(group.address, x.ctypes.data, x.size))
    return x


def all_gather(group: "_Group", array) -> np.ndarray:
    """Every rank's `array`, stacked: shape (ranks, *array.shape), float32."""
    x = _array(group, array)
    out = np.empty((group.ranks, *x.shape), np.float32)
    _check(group, _native().amxc_comm_all_gather(group.address, x.ctypes.data, x.size, out.ctypes.data))
    return out


# ---- groups ---------------------------------------------------------------------------------

_live: "weakref.WeakSet[_Group]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A process that ends with groups open (an uncaught exception) closes them first -- before
    mpi4py's MPI_Finalize, registered earlier, can block -- so waiting peers fail at once."""
    for g in list(_live):
        try:
            g.close()
        except Exception:
            pass


class _Group:
    """What both transports share: the CComm (kept alive here) and its settings."""

    def __init__(self, rank: int, ranks: int, transport: int, *, spin: int, timeout_s: float, threads: int):
        if not isinstance(ranks, int) or not 2 <= ranks <= MAX_RANKS:
            raise CommError(f"a group has 2 to {MAX_RANKS} ranks, not {ranks!r}")
        if not isinstance(rank, int) or not 0 <= rank < ranks:
            raise CommError(f"rank {rank!r} is out of range for {ranks} ranks (0..{ranks - 1})")
        if not (isinstance(spin, int) and 0 <= spin <= 1 << 24):
            raise CommError(f"spin must be an int in 0..{1 << 24}, not {spin!r}")
        if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s <= 1e6):
            raise CommError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        if not (isinstance(threads, int) and 1 <= threads <= 1024):
            raise CommError(f"threads must be an int in 1..1024, not {threads!r}")
        self.rank, self.ranks = rank, ranks
        _live.add(self)
        self._c = CComm(rank=rank, ranks=ranks, transport=transport, spin=spin, timeout_s=float(timeout_s),
                        threads=threads)
        self._closed = False

    @property
    def comm(self) -> CComm:
        return self._c

    @property
    def address(self) -> int:
        """The struct's address, for the native step's arguments (valid while the group lives)."""
        return ctypes.addressof(self._c)

    @property
    def step(self) -> int:
        return self._c.step

    @step.setter
    def step(self, value: int) -> None:
        self._c.step = value

    @property
    def seq(self) -> int:
        """Collectives this rank has completed."""
        return self._c.seq

    def _mark_closed(self) -> None:
        self._closed = True
        self._c.broken = 1
        self._c.error = b"the communicator was closed"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_READ, PROT_WRITE, MAP_SHARED, MAP_POPULATE = 1, 2, 1, 0x8000
MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(fd: int, size: int, writable: bool, what: str) -> int:
    prot = PROT_READ | (PROT_WRITE if writable else 0)
    # the owner faults its pages in now: first touch puts them on its own NUMA node
    addr = _libc.mmap(None, size, prot, MAP_SHARED | (MAP_POPULATE if writable else 0), fd, 0)
    if addr in (None, MAP_FAILED):
        e = ctypes.get_errno()
        raise CommError(f"cannot map {what} ({size} bytes): {os.strerror(e)}")
    return addr


def _word(addr: int, off: int) -> ctypes.c_uint64:
    """An aligned 64-bit header word (one plain load or store on x86-64: the native side's
    acquire/release pairs with it under x86's store order)."""
    return ctypes.c_uint64.from_address(addr + off)


def process_gone(pid: int) -> bool:
    """True if `pid` has exited (or is a zombie not yet reaped), as the native check decides."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return text[text.rfind(")") + 2:][:1] in ("Z", "X")


class ShmGroup(_Group):
    """One rank's end of a shared-memory group on one host.

        g = ShmGroup.create(4)                    # rank 0: makes the segments
        send_to_the_others(g.name)
        g.join()                                  # waits until all 4 ranks have joined
        ...                                       # on rank k: ShmGroup.attach(name, k, 4).join()
        step_args.comm = g.address                # the native step's collectives use it
        g.close()

    slot_bytes and rs_min_bytes are the group's (rank 0 chooses them); spin, timeout_s and
    threads are each rank's own."""

    def __init__(self, name: str, rank: int, ranks: int, *, spin: int, timeout_s: float, threads: int):
        super().__init__(rank, ranks, 0, spin=spin, timeout_s=timeout_s, threads=threads)
        self.name = name
        self.creator_pid = int(name.split("-")[1])
        self._maps: list[tuple[int, int]] = []   # (address, size) to unmap
        self._unlinked = False
        self._joined = False

    # -- making and attaching --

    @classmethod
    def new_name(cls) -> str:
        return f"amxc-{os.getpid()}-{secrets.token_hex(8)}"

    @classmethod
    def create(cls, ranks: int, *, slot_bytes: int = DEFAULT_SLOT_BYTES, rs_min_bytes: int = DEFAULT_RS_MIN_BYTES,
               spin: int = DEFAULT_SPIN, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 1) -> "ShmGroup":
        """Rank 0: creates every rank's segment.  Hand `name` to the others, then join()."""
        if not (isinstance(slot_bytes, int) and MIN_SLOT_BYTES <= slot_bytes <= MAX_SLOT_BYTES
                and slot_bytes % 4096 == 0):
            raise CommError(f"slot_bytes must be a multiple of 4096 in {MIN_SLOT_BYTES}..{MAX_SLOT_BYTES}, "
                            f"not {slot_bytes!r}")
        if not (isinstance(rs_min_bytes, int) and rs_min_bytes >= 0):
            raise CommError(f"rs_min_bytes must be a non-negative int, not {rs_min_bytes!r}")
        g = cls(cls.new_name(), 0, ranks, spin=spin, timeout_s=timeout_s, threads=threads)
        size = HEADER_BYTES + 2 * slot_bytes
        fds = []
        try:
            for k in range(ranks):
                path = g._path(k)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                fds.append(fd)
                os.fchmod(fd, 0o600)                 # whatever the umask
                os.ftruncate(fd, size)
                os.pwrite(fd, IDENT.pack(MAGIC, VERSION, ranks, k, 0, slot_bytes, rs_min_bytes, os.getpid()), 0)
            g._map_all(fds, size, slot_bytes, rs_min_bytes)
        except BaseException:
            g._unlink(len(fds))                      # only what this call created
            g._unmap()
            g._closed = True
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return g

    @classmethod
    def attach(cls, name: str, rank: int, ranks: int, *, spin: int = DEFAULT_SPIN,
               timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 1) -> "ShmGroup":
        """Rank `rank` (1..ranks-1) of the group rank 0 created as `name`; then join()."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise CommError(f"{name!r} is not an amxc group name (amxc-<pid>-<16 hex digits>)")
        if isinstance(rank, int) and rank == 0:
            raise CommError("rank 0 creates the group (ShmGroup.create); attach is for ranks 1..ranks-1")
        g = cls(name, rank, ranks, spin=spin, timeout_s=timeout_s, threads=threads)
        fds = []
        try:
            size = None
            for k in range(ranks):
                try:
                    fd = os.open(g._path(k), (os.O_RDWR if k == rank else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise CommError(f"no shared-memory group {name} (rank {k}'s segment {g._path(k)} does not "
                                    f"exist): it was never created, its ranks already joined, or it was "
                                    f"closed") from None
                except OSError as e:
                    raise CommError(f"cannot open {g._path(k)}: {e.strerror}") from None
                fds.append(fd)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                    raise CommError(f"refusing {g._path(k)}: not a private file of this user (uid {st.st_uid}, "
                                    f"mode {st.st_mode & 0o777:o})")
                ident = IDENT.unpack(os.pread(fd, IDENT.size, 0))
                magic, version, n, kk, _, slot_bytes, rs_min_bytes, _ = ident
                if magic != MAGIC or version != VERSION or kk != k:
                    raise CommError(f"{g._path(k)} is not an amxc communicator segment (version {VERSION})")
                if n != ranks:
                    raise CommError(f"group {name} has {n} ranks, not {ranks}")
                if size is None:
                    size = HEADER_BYTES + 2 * slot_bytes
                    group_slot, group_rs = slot_bytes, rs_min_bytes
                if st.st_size != size or slot_bytes != group_slot:
                    raise CommError(f"{g._path(k)} has {st.st_size} bytes, expected {size}")
            g._map_all(fds, size, group_slot, group_rs)
            pid = _word(g._c.seg[rank], HDR_PID).value
            if pid:
                raise CommError(f"rank {rank} of group {name} is already taken by pid {pid}")
        except BaseException:
            g._unmap()
            g._closed = True                        # a failed attach leaves the group alone
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return g

    def _path(self, k: int) -> Path:
        return SHM_DIR / f"{self.name}-r{k}"

    def _map_all(self, fds: list[int], size: int, slot_bytes: int, rs_min_bytes: int) -> None:
        try:                                         # a full /dev/shm: an error now, not SIGBUS later
            os.posix_fallocate(fds[self.rank], 0, size)
        except OSError as e:
            raise CommError(f"cannot allocate {size} bytes in {SHM_DIR} for rank {self.rank}'s segment "
                            f"({e.strerror}); free space there or use a smaller slot_bytes") from None
        own = _mmap(fds[self.rank], size, True, self._path(self.rank))
        self._maps.append((own, size))
        self._c.seg[self.rank] = own
        for k, fd in enumerate(fds):
            if k != self.rank:
                self._c.seg[k] = _mmap(fd, size, False, self._path(k))
                self._maps.append((self._c.seg[k], size))
        self._c.slot_bytes, self._c.rs_min_bytes = slot_bytes, rs_min_bytes

    # -- the rendezvous --

    def join(self, timeout_s: float | None = None) -> "ShmGroup":
        """Publish this rank's pid and wait until every rank has (at most timeout_s, the group's
        timeout by default); then remove the files: every rank has them mapped."""
        if self._closed:
            raise CommError(f"group {self.name} was closed")
        if self._joined:
            return self
        limit = self._c.timeout_s if timeout_s is None else timeout_s
        _word(self._c.seg[self.rank], HDR_PID).value = os.getpid()
        deadline = time.monotonic() + limit
        try:
            while True:
                pids = [_word(self._c.seg[k], HDR_PID).value for k in range(self.ranks)]
                missing = [k for k, pid in enumerate(pids) if not pid]
                if not missing:                     # complete (whatever the ranks did since)
                    break
                for k, pid in enumerate(pids):
                    state = _word(self._c.seg[k], HDR_STATE).value
                    if state != RUNNING:
                        raise CommError(f"rank {k} (pid {pid}) {'closed' if state == CLOSING else 'failed'} "
                                        f"before group {self.name} was complete")
                    if pid and process_gone(pid):
                        raise CommError(f"rank {k} (pid {pid}) exited before group {self.name} was complete")
                if not pids[0] and process_gone(self.creator_pid):
                    raise CommError(f"rank 0 (pid {self.creator_pid}) exited before group {self.name} was complete")
                if time.monotonic() > deadline:
                    who = ", ".join(map(str, missing))
                    raise CommError(f"rank{'s' if len(missing) > 1 else ''} {who} of {self.ranks} did not join "
                                    f"group {self.name} within {limit:.1f} s")
                time.sleep(0.001)
        except BaseException:
            self.close()                            # the group can never complete: remove it
            raise
        self._unlink()
        for k, pid in enumerate(pids):
            self._c.pid[k] = pid
        self._joined = True
        return self

    @property
    def joined(self) -> bool:
        return self._joined

    @property
    def address(self) -> int:
        if not self._joined:
            raise CommError(f"rank {self.rank} has not joined group {self.name} (call join())")
        return super().address

    # -- the end --

    def close(self) -> None:
        """Leave the group (idempotent): peers waiting on this rank fail at once instead of
        timing out; an incomplete group's files are removed."""
        if self._closed:
            return
        self._mark_closed()
        own = self._c.seg[self.rank]
        if own and _word(own, HDR_STATE).value == RUNNING:
            _word(own, HDR_STATE).value = CLOSING
        if not self._unlinked:
            self._unlink()
        self._unmap()

    def _unlink(self, count: int | None = None) -> None:
        for k in range(self.ranks if count is None else count):
            try:
                os.unlink(self._path(k))
            except FileNotFoundError:
                pass
        self._unlinked = True

    def _unmap(self) -> None:
        for addr, size in self._maps:
            _libc.munmap(addr, size)
        self._maps.clear()
        for k in range(MAX_RANKS):
            self._c.seg[k] = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"ShmGroup({self.name!r}, rank={self.rank}, ranks={self.ranks})"


class MpiGroup(_Group):
    """The MPI transport over an mpi4py communicator (COMM_WORLD by default): the native step
    calls the loaded MPI library's MPI_Allreduce / MPI_Allgather.  MPICH ABI only (MPICH, Intel
    MPI): handles are ints and MPI_IN_PLACE is (void*)-1; anything else is refused."""

    def __init__(self, comm=None, *, threads: int = 1):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise CommError(f"the MPI transport needs mpi4py and an MPI library "
                            f"(pip install mpi4py mpich): {e}") from None
        comm = MPI.COMM_WORLD if comm is None else comm
        super().__init__(comm.Get_rank(), comm.Get_size(), 1, spin=0, timeout_s=DEFAULT_TIMEOUT_S, threads=threads)
        if MPI._sizeof(MPI.Comm) != 4 or int(MPI.IN_PLACE) != -1:
            raise CommError(f"the MPI library is not MPICH-ABI ({MPI.Get_library_version().splitlines()[0]}); "
                            f"the MPI transport supports MPICH and Intel MPI")
        lib = _libmpi()
        c = self._c
        c.mpi_allreduce = ctypes.cast(lib.MPI_Allreduce, ctypes.c_void_p).value
        c.mpi_allgather = ctypes.cast(lib.MPI_Allgather, ctypes.c_void_p).value
        c.mpi_error_string = ctypes.cast(lib.MPI_Error_string, ctypes.c_void_p).value
        c.mpi_comm, c.mpi_float, c.mpi_sum = MPI._handleof(comm), MPI._handleof(MPI.FLOAT), MPI._handleof(MPI.SUM)
        for k, pid in enumerate(comm.allgather(os.getpid())):
            c.pid[k] = pid
        self.mpi_comm = comm

    def close(self) -> None:
        """Stop using the communicator (MPI itself stays initialized; mpi4py finalizes it)."""
        if not self._closed:
            self._mark_closed()


def _libmpi() -> ctypes.CDLL:
    """The MPI library mpi4py loaded (searched among this process's mappings, not loaded anew)."""
    candidates = [None]
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libmpi") and path not in candidates:
                    candidates.append(path)
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY) if path else ctypes.CDLL(None)
            lib.MPI_Allreduce, lib.MPI_Allgather, lib.MPI_Error_string
        except (OSError, AttributeError):
            continue
        return lib
    raise CommError("mpi4py is loaded but its MPI library (libmpi*) was not found among this process's "
                    "mappings; is mpi4py built against a static MPI?")
