"""A compiled program: what backends/ hands the runtime to execute a module's functions.

`build_program(module, options)` returns a Program: the native one (the library generated for
the chosen tier by codegen.py, built or taken from the cache by toolchain.py, its parameter
table of pointers into the weights — memory-mapped from weights.bin for an artifact — one entry
point per IR function and a preallocated workspace), or the reference interpreter when asked
for.  Both execute a StepBatch (step.py) over the paged KV arrays and return logits, so the
runtime schedules steps without knowing which one runs them.

Nothing here reads the environment: NativeOptions.from_env() is the one place the AMXC_*
variables are read (env.py checks them), and callers pass the options down.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import numpy as np

from amxc.ir import Module
from amxc.ir.interpreter import run as interpret
from amxc.ir.interpreter import run_ranks
from amxc.ir.types import KVCacheType

from . import env, isa, toolchain
from .codegen import generate
from .plan import Limits
from .resident import ResidentWeights
from .step import PagedView, StepBatch, StepError


class NativeError(RuntimeError):
    """A step the native code refused (bad token id, unreserved position, kernel error)."""


class ProgramError(ValueError):
    """A module the program cannot run as asked (not lowered, no cache-aware functions)."""


@dataclass(frozen=True)
class NativeOptions:
    """How to run a module.  executor: "native" or "interpreter"; tier: an ISA tier or "auto";
    threads: None for every CPU this process may use; gemv: "int8" (decode rows on int8
    activations) or "exact" (fp32 arithmetic everywhere, the same bits for a row whatever else
    is in its step); tiles: AMX tile mode ("int8": the int8 GEMV's bits, the default; "bf16": faster prefill,
    whose results depend on the chunk size; "off"); weights: "copy" (into anonymous huge pages,
    backends/resident.py) or "map" (read through the weight file's mapping)."""
    executor: str = "native"
    tier: str = "auto"
    threads: int | None = None
    gemv: str = "int8"
    tiles: str = "int8"
    profile: bool = False
    pin: bool = False             # bind OpenMP threads to cores (env.pin_openmp_threads: AMXC_PIN=1)
    weights: str = "copy"

    @classmethod
    def from_env(cls, **overrides) -> "NativeOptions":
        """AMXC_EXECUTOR, AMXC_ISA, AMXC_NUM_THREADS, AMXC_GEMV, AMXC_TILES, AMXC_PROFILE, AMXC_PIN,
        AMXC_WEIGHTS, each checked; keyword arguments that are not None win."""
        opts = cls(executor=env.choice("AMXC_EXECUTOR"), tier=env.isa_request(), threads=env.threads(),
                   gemv=env.choice("AMXC_GEMV"), tiles=env.choice("AMXC_TILES"),
                   profile=env.choice("AMXC_PROFILE") == "1", pin=env.choice("AMXC_PIN") == "1",
                   weights=env.choice("AMXC_WEIGHTS"))
        return replace(opts, **{k: v for k, v in overrides.items() if v is not None})


class CStepArgs(ctypes.Structure):
    """struct StepArgs of include/amxc_rt.h."""
    _fields_ = [("b", ctypes.c_int64), ("s", ctypes.c_int64),
                ("ids", ctypes.c_void_p), ("pos", ctypes.c_void_p),
                ("kcache", ctypes.c_void_p), ("vcache", ctypes.c_void_p),
                ("block_tables", ctypes.c_void_p),
                ("max_blocks", ctypes.c_int64), ("block_size", ctypes.c_int64), ("num_blocks", ctypes.c_int64),
                ("out", ctypes.c_void_p), ("ws", ctypes.c_void_p), ("W", ctypes.c_void_p),
                ("nthreads", ctypes.c_int), ("last_only", ctypes.c_int), ("comm", ctypes.c_void_p)]


def required_tier(module: Module) -> str:
    return module.attrs.get("target", "auto")


def build_program(module: Module, options: NativeOptions | None = None) -> "Program":
    """The program that runs `module` as `options` say (default: NativeOptions(), no env).
    The module must have been lowered (the compile pipeline's last pass): loading never
    compiles."""
    options = options or NativeOptions()
    if options.executor == "interpreter" or options.tier == "interpreter":
        return InterpreterProgram(module)
    return NativeProgram(module, options)


class Program:
    """run(batch, k, v) -> logits: [b, vocab] for batch.logits == "last", else [b, s, vocab]."""
    name = "program"
    communicator = None          # tensor parallelism's collectives, when a program has ranks

    def __init__(self, module: Module):
        for fn in ("prefill", "decode"):
            if fn not in module.functions:
                raise ProgramError(f"module @{module.name} has no @{fn}: compile it with the kv-cache pass")
        cache = module.functions["prefill"].args[-1].type
        if not isinstance(cache, KVCacheType):
            raise ProgramError(f"@prefill of @{module.name} takes no kv_cache argument")
        self.module, self.cache_type = module, cache
        self.vocab = int(module.functions["prefill"].results[0].type.shape[-1])
        self.embed_rows = _embedding_rows(module)

    def run(self, batch: StepBatch, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        self._check(batch, k, v)
        out = self._run(batch, k, v)
        return out if batch.logits == "all" else out[:, -1]

    def _run(self, batch: StepBatch, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check(self, batch: StepBatch, k: np.ndarray, v: np.ndarray) -> None:
        t = self.cache_type
        if k.shape != v.shape or k.ndim != 5 or (k.shape[0], k.shape[2], k.shape[4]) != (t.physical_layers, t.kv_heads, t.row) \
                or k.dtype != t.dtype.storage or not (k.flags.c_contiguous and v.flags.c_contiguous):
            raise StepError(f"KV arrays {k.shape} {k.dtype} do not fit {t}")
        batch.check_reserved(k.shape[3], k.shape[1])
        ids = batch.ids
        if self.embed_rows and ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.embed_rows:
                raise NativeError(f"token id {hi if hi >= self.embed_rows else lo} is outside the vocabulary "
                                  f"[0, {self.embed_rows})")


class InterpreterProgram(Program):
    """The reference interpreter over the same step batches (the oracle; slow).  A module
    sharded N ways runs all its ranks in lockstep (run_ranks); rank 0's keys and values are the
    arrays the runtime passes, the other ranks' are kept here, the same shape."""
    name = "interpreter"

    def __init__(self, module: Module):
        super().__init__(module)
        self.ways = module.attrs.get("tp", 1)
        self.rank_kv: list[tuple[np.ndarray, np.ndarray]] = []

    def _run(self, batch, k, v):
        if self.ways == 1:
            return interpret(self.module, [batch.ids, batch.positions, PagedView(batch, k, v, self.cache_type.layers, self.cache_type.storage)],
                             function=batch.function)[0]
        if not self.rank_kv or self.rank_kv[0][0].shape != k.shape:
            self.rank_kv = [(np.zeros_like(k), np.zeros_like(v)) for _ in range(self.ways - 1)]
        layers = self.cache_type.layers
        st = self.cache_type.storage
        views = [PagedView(batch, k, v, layers, st)] + [PagedView(batch, kr, vr, layers, st) for kr, vr in self.rank_kv]
        outs = run_ranks(self.module, [[batch.ids, batch.positions, view] for view in views],
                         function=batch.function)
        return outs[0][0]


class NativeProgram(Program):
    """The module's functions as native code for one ISA tier."""

    def __init__(self, module: Module, options: NativeOptions | None = None, *, limits: Limits | None = None,
                 rank: int = 0, comm=None):
        """`rank` and `comm` (a runtime.comm group: its CComm is handed to the native step) for one
        rank of a module sharded for tensor parallelism."""
        super().__init__(module)
        ways = module.attrs.get("tp", 1)
        if ways > 1 and comm is None:
            raise ProgramError(f"@{module.name} is sharded {ways} ways: each rank's program needs a "
                               f"communicator (amxc run starts the ranks)")
        self.rank, self.comm = rank, comm
        options = options or NativeOptions()
        if "target" not in module.attrs:
            raise ProgramError(f"@{module.name} was not lowered: compile it with the lower pass "
                               f"(amxc compile does), or run it on the interpreter")
        self.tier = isa.select_tier(options.tier)
        need = required_tier(module)
        if need != "auto" and need not in isa.TIERS:
            raise isa.ISAError(f"@{module.name} names target {need!r}, which is not a tier "
                               f"({', '.join(isa.TIERS)})")
        if need not in ("auto", "ref") and isa.TIERS.index(_base(self.tier)) < isa.TIERS.index(need):
            raise isa.ISAError(f"@{module.name} was compiled for target '{need}', and this run uses "
                               f"'{self.tier}' (the best this machine runs is '{isa.best_tier()}'); "
                               f"recompile with --target auto or --target {isa.best_tier()}")
        cpus = env.available_cpus()
        if options.threads is not None and not 1 <= options.threads <= cpus:
            raise env.EnvError(f"threads={options.threads} must be from 1 to {cpus} (the CPUs this process may use)")
        self.options, self.limits = options, limits or Limits()
        self.threads = options.threads or cpus
        self.gemv, self.tiles, self.profiling = options.gemv, options.tiles, options.profile
        gen = generate(module, self.tier, self.limits, self.gemv, self.tiles, self.profiling)
        self.profiled = gen.profiled
        self.source = gen.source
        self.library = toolchain.build(gen.source, self.tier, name=_safe(module.name))
        if self.options.pin:
            env.pin_openmp_threads()          # before the library brings libgomp in
        lib = toolchain.load(self.library)
        self.entry = {name: getattr(lib, f"amxc_{name}") for name in gen.functions}
        for fn in self.entry.values():
            fn.argtypes, fn.restype = [ctypes.POINTER(CStepArgs)], ctypes.c_int
        if options.weights not in ("copy", "map"):
            raise ProgramError(f"weights={options.weights!r} is not 'copy' or 'map'")
        self.arrays = [np.ascontiguousarray(_rank_data(module.params[n], rank)) for n in gen.params]
        self.resident = None
        if options.weights == "copy":           # every weight the steps stream; tables they only
            gathered = _gathered_only(module)   # look rows up in stay mapped
            streamed = [i for i, n in enumerate(gen.params) if n not in gathered]
            self.resident = ResidentWeights([self.arrays[i] for i in streamed])
            for i, copy in zip(streamed, self.resident.arrays):
                self.arrays[i] = copy
        self.table = (ctypes.c_void_p * max(len(self.arrays), 1))(*[a.ctypes.data for a in self.arrays])
        self.workspace_bytes = gen.workspace
        self.workspace = np.zeros(gen.workspace + 64, np.uint8)
        self.ws_ptr = (self.workspace.ctypes.data + 63) // 64 * 64
        self.name = f"native-{self.tier}"

    def profile(self, function: str) -> list[tuple[object, float]]:
        """(IR node, seconds) for every timed node of `function` since the library was loaded
        (profile=True builds only)."""
        if not self.profiling:
            raise NativeError("profiling is off: build the program with profile=True (AMXC_PROFILE=1)")
        fn = getattr(toolchain.load(self.library), f"amxc_profile_{function}")
        fn.restype = ctypes.POINTER(ctypes.c_double)
        times = fn()
        return [(node, times[i]) for i, node in enumerate(self.profiled[function])]

    def _run(self, batch, k, v):
        b, s = batch.ids.shape
        last = batch.logits == "last"        # prefill: the head runs on each row's last token only
        out = np.empty((b, 1 if last else s, self.vocab), np.float32)
        if batch.function == "decode" and b <= self.limits.max_batch:
            self._call(batch, k, v, out)
        elif batch.function == "decode":     # calls of at most max_batch rows (the workspace's plan)
            for r0 in range(0, b, self.limits.max_batch):
                self._call(batch.rows_slice(r0, r0 + self.limits.max_batch), k, v, out[r0:r0 + self.limits.max_batch])
        else:                                # one row at a time, chunks of at most max_tokens
            for r in range(b):
                row = batch.rows_slice(r, r + 1)
                for c0 in range(0, s, self.limits.max_tokens):
                    self._call(row.tokens_slice(c0, c0 + self.limits.max_tokens), k, v,
                               out[r:r + 1] if last else out[r:r + 1, c0:c0 + self.limits.max_tokens], last)
        return out

    def _call(self, step: StepBatch, k, v, out, last_only: bool = False) -> None:
        result = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)
        bt = step.block_tables
        args = CStepArgs(step.ids.shape[0], step.ids.shape[1], step.ids.ctypes.data, step.positions.ctypes.data,
                         k.ctypes.data, v.ctypes.data, bt.ctypes.data, bt.shape[1], k.shape[3], k.shape[1],
                         result.ctypes.data, self.ws_ptr, ctypes.addressof(self.table), self.threads,
                         int(last_only), self.comm.address if self.comm is not None else None)
        rc = self.entry[step.function](ctypes.byref(args))
        if rc == COMM_FAILED and self.comm is not None:
            error = self.comm.comm.error.decode(errors="replace")
            raise CommFailure(f"rank {self.rank}: {error or 'a collective failed'}")
        if rc != 0:
            raise NativeError(f"native @{step.function} failed with status {rc}")
        if result is not out:
            out[...] = result


COMM_FAILED = 90       # AMXC_COMM_FAILED of include/amxc_tp.h


class CommFailure(NativeError):
    """A collective of a tensor-parallel step failed: a rank died, hung or left."""


def _rank_data(p, rank: int) -> np.ndarray:
    return p.load(rank) if p.sharded else p.load()


def _base(tier: str) -> str:
    return "avx2" if tier == isa.EMULATED else tier


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "model"


def _gathered_only(module: Module) -> set[str]:
    """Parameters read by embedding lookups alone (a few rows a step, not streamed)."""
    users: dict[str, set[str]] = {}
    for fn in module.functions.values():
        for n in fn.nodes:
            for v in n.inputs:
                if v.name in module.params:
                    users.setdefault(v.name, set()).add(n.op)
    return {name for name, ops in users.items() if ops <= {"embedding", "embedding_part"}}


def _embedding_rows(module: Module) -> int:
    for fn in module.functions.values():
        for n in fn.nodes:
            if n.op == "embedding" and n.inputs[1].name == "input_ids":
                return int(n.inputs[0].type.shape[0])
            if n.op == "embedding_part" and n.inputs[1].name == "input_ids":      # a vocab-split table
                return int(n.inputs[0].type.shape[0]) * module.attrs.get("tp", 1)
    return 0
