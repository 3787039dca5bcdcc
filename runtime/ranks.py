"""Tensor-parallel ranks on one host: a sharded artifact (shard-tp) runs as one process per rank.

Rank 0 is the process that holds the engine (scheduler, tokenizer, sampling).  `RankedProgram`
starts ranks 1..N-1 as worker processes (`python -m amxc.runtime.ranks`), each bound to its own
CPUs, mapping only its own weight file and holding its own slice of the KV cache.  Every step,
rank 0 sends the step batch (token ids, positions, block tables: a few hundred bytes) down a
socket to each worker, then all ranks run the same native step; the layers' collectives happen
inside it, over shared memory (runtime/comm.py, include/amxc_comm.h), with no Python between
layers.  Only rank 0's logits are used (the head's all_gather gives every rank all of them).

Faults: a worker that dies or hangs makes rank 0's next collective fail with the rank, its pid
and the step (the communicator watches its peers); a worker whose rank 0 is gone sees its socket
close, or its collective fail, and exits.  The shared segments are unlinked as soon as every rank
has mapped them, so a crash leaves nothing behind in /dev/shm.

Where ranks run (`Settings.bind`): "0-27|28-55|..." names each rank's CPUs; by default one NUMA
node per rank when the host has exactly N nodes, else the usable CPUs split evenly (on fewer CPUs
than ranks, ranks share them: a test setting, where the communicator's waits yield).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from amxc.backends.program import CommFailure, NativeError, NativeOptions, NativeProgram, Program
from amxc.backends.step import StepBatch

_ARRAYS = (("ids", np.int64), ("positions", np.int64), ("block_tables", np.int32), ("seq_ids", np.int64))
_MAX_HEADER = 1 << 16


class RankError(RuntimeError):
    """Starting or running the ranks of a sharded artifact failed."""


# -- where ranks run ---------------------------------------------------------------------------
def parse_cpus(text: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise RankError(f"--bind: {part!r} is not a CPU number or range like 0-27")
        lo_i, hi_i = int(lo), int(hi or lo)
        if hi_i < lo_i or hi_i > 4095:
            raise RankError(f"--bind: {part!r} is not a CPU range")
        out += range(lo_i, hi_i + 1)
    return out


def numa_nodes() -> list[list[int]]:
    nodes = []
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            nodes.append(parse_cpus((d / "cpulist").read_text().strip()))
        except (OSError, RankError):
            continue
    return [n for n in nodes if n]


def cpu_sets(ways: int, bind: str | None = None) -> list[list[int]]:
    """The CPUs of each rank (see the module docstring)."""
    usable = sorted(os.sched_getaffinity(0))
    if bind:
        groups = [parse_cpus(g) for g in bind.split("|")]
        if len(groups) != ways:
            raise RankError(f"--bind names {len(groups)} CPU sets and the artifact has {ways} ranks")
        for r, g in enumerate(groups):
            if not set(g) <= set(usable):
                raise RankError(f"--bind: rank {r}'s CPUs {sorted(set(g) - set(usable))} are not usable here "
                                f"(this process may use {usable[0]}-{usable[-1]})")
        return groups
    nodes = [[c for c in n if c in usable] for n in numa_nodes()]
    if len(nodes) == ways and all(nodes):
        return nodes
    if len(usable) < ways:
        return [[usable[r % len(usable)]] for r in range(ways)]
    per = len(usable) // ways
    return [usable[r * per:(r + 1) * per] for r in range(ways)]


# -- the control channel: one framed message per step ------------------------------------------
def send_frame(sock: socket.socket, header: dict, arrays: list[np.ndarray] = ()) -> None:
    head = json.dumps(header).encode()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    sock.sendall(struct.pack("<II", len(head), len(body)) + head + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict, bytes] | None:
    sizes = _recv_exact(sock, 8)
    if sizes is None:
        return None
    nhead, nbody = struct.unpack("<II", sizes)
    if nhead > _MAX_HEADER:
        raise RankError(f"control message header of {nhead} bytes")
    head, body = _recv_exact(sock, nhead), _recv_exact(sock, nbody)
    if head is None or body is None:
        return None
    return json.loads(head), body


def step_frame(n: int, batch: StepBatch, kv_shape) -> tuple[dict, list[np.ndarray]]:
    arrays = [getattr(batch, name) for name, _ in _ARRAYS]
    header = {"op": "step", "n": n, "function": batch.function, "logits": batch.logits,
              "shapes": [list(a.shape) for a in arrays], "kv": list(kv_shape)}
    return header, arrays


def batch_from(header: dict, body: bytes) -> StepBatch:
    arrays, offset = [], 0
    for (name, dtype), shape in zip(_ARRAYS, header["shapes"]):
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(body, dtype, count, offset).reshape(shape))
        offset += count * np.dtype(dtype).itemsize
    return StepBatch(header["function"], *arrays, logits=header["logits"])


# -- rank 0 ------------------------------------------------------------------------------------
class RankedProgram(Program):
    """Rank 0's program for a sharded artifact: starts the other ranks and runs its own slice."""

    def __init__(self, module, artifact: str | os.PathLike, settings, *, spawn_timeout: float = 120.0):
        super().__init__(module)
        from .comm import ShmGroup
        self.ways = module.attrs["tp"]
        self.artifact = str(Path(artifact).resolve())
        self.cpus = cpu_sets(self.ways, settings.bind)
        opts = settings.native
        self.threads = [min(opts.threads, len(c)) if opts.threads else len(c) for c in self.cpus]
        self.workers: list[subprocess.Popen] = []
        self.socks: list[socket.socket] = []
        self.steps = 0
        self.group = ShmGroup.create(self.ways, timeout_s=settings.comm_timeout, threads=self.threads[0])
        try:
            for r in range(1, self.ways):
                mine, theirs = socket.socketpair()
                cmd = [sys.executable, "-m", "amxc.runtime.ranks", "--artifact", self.artifact,
                       "--rank", str(r), "--ranks", str(self.ways), "--group", self.group.name,
                       "--fd", str(theirs.fileno()), "--threads", str(self.threads[r]),
                       "--cpus", ",".join(map(str, self.cpus[r])), "--tier", opts.tier, "--gemv", opts.gemv,
                       "--tiles", opts.tiles, "--timeout", str(settings.comm_timeout)]
                self.workers.append(subprocess.Popen(cmd, pass_fds=(theirs.fileno(),)))
                theirs.close()
                self.socks.append(mine)
            self.affinity = os.sched_getaffinity(0)    # put back by close(): the process outlives us
            _bind(self.cpus[0])
            self._join(spawn_timeout)
            self.local = NativeProgram(module, NativeOptions(**{**opts.__dict__, "threads": self.threads[0]}),
                                       rank=0, comm=self.group)
        except BaseException:
            self.close()
            raise
        self.name = f"{self.local.name} x{self.ways} ranks"
        self.tier = self.local.tier

    def _join(self, timeout: float) -> None:
        """The rendezvous, watching the workers: one that dies while starting (a bad artifact,
        no memory) fails it at once with its status, not after the timeout."""
        import threading
        failure: list[BaseException] = []

        def join():
            try:
                self.group.join(timeout_s=timeout)
            except BaseException as e:         # noqa: BLE001 - handed to the caller below
                failure.append(e)
        t = threading.Thread(target=join, daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            for r, w in enumerate(self.workers, start=1):
                if w.poll() is not None:
                    self.group.close()          # the join fails: the group can never complete
                    t.join()
                    raise RankError(f"rank {r} (pid {w.pid}) exited with status {w.returncode} while starting")
        if failure:
            time.sleep(0.2)                     # a worker that failed is exiting: name its status
            raise RankError(f"the ranks did not start: {failure[0]}{self._statuses()}")

    def _run(self, batch: StepBatch, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.steps += 1
        self.group.step = self.steps
        header, arrays = step_frame(self.steps, batch, k.shape)
        for r, sock in enumerate(self.socks, start=1):
            try:
                send_frame(sock, header, arrays)
            except OSError:
                raise RankError(self._dead(r, f"before step {self.steps}")) from None
        try:
            return self.local._run(batch, k, v)
        except CommFailure as e:
            raise RankError(f"{e}{self._statuses()}") from None

    def _dead(self, r: int, when: str) -> str:
        w = self.workers[r - 1]
        code = w.poll()
        state = f"exited with status {code}" if code is not None else "stopped answering"
        return f"rank {r} (pid {w.pid}) {state} {when}"

    def _statuses(self) -> str:
        gone = [f"rank {r} (pid {w.pid}) exited with status {w.poll()}"
                for r, w in enumerate(self.workers, start=1) if w.poll() is not None]
        return f" [{'; '.join(gone)}]" if gone else ""

    def close(self) -> None:
        """Stop the workers; each answers with its peak RSS (`peak_rss_mb`, rank -> MiB)."""
        self.peak_rss_mb = {0: peak_rss_mb()}
        for r, sock in enumerate(self.socks, start=1):
            try:
                send_frame(sock, {"op": "stop"})
                sock.settimeout(5.0)
                reply = recv_frame(sock)
                if reply is not None and reply[0].get("op") == "bye":
                    self.peak_rss_mb[r] = float(reply[0]["peak_rss_mb"])
            except (OSError, ValueError, KeyError):
                pass
            sock.close()
        self.socks = []
        deadline = time.monotonic() + 5.0
        for w in self.workers:
            try:
                w.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        self.workers = []
        if getattr(self, "group", None) is not None:
            self.group.close()
            self.group = None
        if getattr(self, "affinity", None):
            try:
                os.sched_setaffinity(0, self.affinity)
            except OSError:
                pass
            self.affinity = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, which Linux
    carries across execve, it starts afresh in a worker exec'd from a large rank 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bind(cpus: list[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        raise RankError(f"cannot bind to CPUs {cpus}: {e}") from None


# -- across hosts: the same ranks under mpiexec -------------------------------------------------
def mpi_program(module, settings) -> Program:
    """Under `mpiexec -n N amxc run ART --transport mpi`: every process runs the same command;
    MPI rank 0 gets the program (and runs the engine), the others serve steps right here and
    exit when rank 0 closes.  The collectives use the MPI library (runtime/comm.py MpiGroup);
    the step batch is broadcast with MPI_Bcast.  Binding is mpiexec's (its -bind-to options)."""
    from .comm import CommError, MpiGroup
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RankError(f"--transport mpi needs mpi4py and an MPI library (pip install mpi4py mpich): {e}") from None
    world, ways = MPI.COMM_WORLD, module.attrs["tp"]
    if world.Get_size() != ways:
        raise RankError(f"mpiexec started {world.Get_size()} process(es) and the artifact has {ways} ranks "
                        f"(mpiexec -n {ways} ...)")
    opts = settings.native
    try:
        group = MpiGroup(threads=opts.threads or len(os.sched_getaffinity(0)))
    except CommError as e:
        raise RankError(str(e)) from None
    program = NativeProgram(module, opts, rank=world.Get_rank(), comm=group)
    if world.Get_rank() == 0:
        return MpiRankedProgram(module, program, group, world)
    try:
        serve_steps(lambda: _bcast_frame(world), program, group)
    except NativeError as e:
        print(f"amxc rank {world.Get_rank()}: {e}", file=sys.stderr)
        world.Abort(3)
    group.close()
    sys.exit(0)


def serve_steps(next_frame, program: NativeProgram, group) -> None:
    """A worker rank's loop: run every step rank 0 sends (on this rank's own KV arrays, shaped
    like rank 0's), until next_frame() gives None."""
    k = v = None
    while (frame := next_frame()) is not None:
        header, body = frame
        shape = tuple(header["kv"])
        if k is None or k.shape != shape:
            k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        group.step = header["n"]
        program.run(batch_from(header, body), k, v)


def _bcast_frame(world, header: dict | None = None, arrays=()) -> tuple[dict, bytes] | None:
    """Rank 0 sends (header, arrays); the others receive.  A "stop" header ends the loop."""
    sizes = np.zeros(2, np.int64)
    if header is not None:
        head = json.dumps(header).encode()
        body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
        sizes[:] = len(head), len(body)
    world.Bcast(sizes, root=0)
    buf = np.frombuffer(head + body, np.uint8).copy() if header is not None else np.empty(int(sizes.sum()), np.uint8)
    world.Bcast(buf, root=0)
    if header is not None:
        return None
    nhead = int(sizes[0])
    if nhead > _MAX_HEADER:
        raise RankError(f"control message header of {nhead} bytes")
    got = json.loads(buf[:nhead].tobytes())
    return None if got.get("op") == "stop" else (got, buf[nhead:].tobytes())


class MpiRankedProgram(Program):
    """Rank 0's program under mpiexec: broadcasts each step batch, then runs its slice."""

    def __init__(self, module, local: NativeProgram, group, world):
        super().__init__(module)
        self.local, self.group, self.world, self.steps = local, group, world, 0
        self.ways = module.attrs["tp"]
        self.name = f"{local.name} x{self.ways} ranks (MPI)"
        self.tier = local.tier
        import atexit
        atexit.register(self.close)             # the other ranks wait in MPI_Bcast until told to stop

    def _run(self, batch: StepBatch, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.steps += 1
        self.group.step = self.steps
        _bcast_frame(self.world, *step_frame(self.steps, batch, k.shape))
        try:
            return self.local._run(batch, k, v)
        except CommFailure as e:
            raise RankError(str(e)) from None

    def close(self) -> None:
        if self.group is not None:
            _bcast_frame(self.world, {"op": "stop"})
            self.group.close()
            self.group = None


# -- ranks 1..N-1 ------------------------------------------------------------------------------
def worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="amxc-rank", description="one rank of a sharded artifact (started by rank 0)")
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--cpus", required=True)
    ap.add_argument("--tier", default="auto")
    ap.add_argument("--gemv", default="int8")
    ap.add_argument("--tiles", default="int8")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    tag = f"amxc rank {args.rank}"
    from .artifact import load_artifact
    from .comm import ShmGroup

    # Ctrl-C at a terminal reaches the whole process group: rank 0 decides, and stops us
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    _bind(parse_cpus(args.cpus))
    module, _ = load_artifact(args.artifact, rank=args.rank)
    group = ShmGroup.attach(args.group, args.rank, args.ranks, timeout_s=args.timeout, threads=args.threads)
    try:
        program = NativeProgram(module, NativeOptions(tier=args.tier, threads=args.threads, gemv=args.gemv,
                                                      tiles=args.tiles), rank=args.rank, comm=group)
        group.join(timeout_s=120.0)

        def next_frame():
            frame = recv_frame(sock)
            if frame is not None and frame[0].get("op") == "stop":
                send_frame(sock, {"op": "bye", "peak_rss_mb": peak_rss_mb()})
                return None
            return frame
        serve_steps(next_frame, program, group)
        return 0
    except (CommFailure, NativeError) as e:
        print(f"{tag}: {e}", file=sys.stderr)
        return 3
    finally:
        group.close()


if __name__ == "__main__":
    sys.exit(worker_main())
