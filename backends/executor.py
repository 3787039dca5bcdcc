"""Running a lowered module natively: one call into the generated library per step.

The library is generated from the module's IR for the chosen tier (codegen.py), built or taken
from the cache (toolchain.py), and given the parameters as a table of pointers into their
arrays (memory-mapped from weights.bin for an artifact).  A call passes the step's token ids,
positions, the paged KV cache with the batch's block tables, and a preallocated workspace.
Python's part per decode step is building that argument struct and the block tables.
"""
from __future__ import annotations

import ctypes

import numpy as np

from amxc.ir import Module

from . import env, isa, toolchain
from .codegen import Limits, generate


class NativeError(RuntimeError):
    """A step the native code refused (bad token id, unreserved position, kernel error)."""


class StepArgs(ctypes.Structure):
    _fields_ = [("b", ctypes.c_int64), ("s", ctypes.c_int64),
                ("ids", ctypes.c_void_p), ("pos", ctypes.c_void_p),
                ("kcache", ctypes.c_void_p), ("vcache", ctypes.c_void_p),
                ("block_tables", ctypes.c_void_p),
                ("max_blocks", ctypes.c_int64), ("block_size", ctypes.c_int64), ("num_blocks", ctypes.c_int64),
                ("out", ctypes.c_void_p), ("ws", ctypes.c_void_p), ("W", ctypes.c_void_p),
                ("nthreads", ctypes.c_int)]


def required_tier(module: Module) -> str:
    return module.attrs.get("target", "auto")


class NativeExecutor:
    """executor(module, function, [ids, positions, kv_view]) -> logits, natively."""

    def __init__(self, module: Module, tier: str | None = None, *, limits: Limits | None = None,
                 gemv: str | None = None, threads: int | None = None, profile: bool | None = None):
        self.tier = isa.select_tier(tier)
        need = required_tier(module)
        if need != "auto" and need not in isa.TIERS:
            raise isa.ISAError(f"@{module.name} names target {need!r}, which is not a tier "
                               f"({', '.join(isa.TIERS)})")
        if need not in ("auto", "ref") and isa.TIERS.index(_base(self.tier)) < isa.TIERS.index(need):
            raise isa.ISAError(f"@{module.name} was compiled for target '{need}', and this run uses "
                               f"'{self.tier}' (the best this machine runs is '{isa.best_tier()}'); "
                               f"recompile with --target auto or --target {isa.best_tier()}")
        self.module = module
        self.limits = limits or Limits()
        self.gemv = gemv or env.choice("AMXC_GEMV")
        self.tiles = env.choice("AMXC_TILES")
        self.profiling = profile if profile is not None else env.choice("AMXC_PROFILE") == "1"
        gen = generate(module, self.tier, self.limits, self.gemv, self.tiles, self.profiling)
        self.profiled = gen.profiled
        self.source = gen.source
        self.library = toolchain.build(gen.source, self.tier, name=_safe(module.name))
        lib = toolchain.load(self.library)
        self.steps = {name: getattr(lib, f"amxc_{name}") for name in gen.functions}
        for fn in self.steps.values():
            fn.argtypes, fn.restype = [ctypes.POINTER(StepArgs)], ctypes.c_int
        self.arrays = [np.ascontiguousarray(module.params[n].load()) for n in gen.params]
        self.table = (ctypes.c_void_p * max(len(self.arrays), 1))(*[a.ctypes.data for a in self.arrays])
        self.workspace = np.zeros(gen.workspace + 64, np.uint8)
        self.ws_ptr = (self.workspace.ctypes.data + 63) // 64 * 64
        cpus = env.available_cpus()
        if threads is not None and not 1 <= threads <= cpus:
            raise env.EnvError(f"threads={threads} must be from 1 to {cpus} (the CPUs this process may use)")
        self.threads = threads or env.threads()
        self.vocab = {f: module.functions[f].results[0].type.shape[-1] for f in gen.functions}
        self.embed_rows = _embedding_rows(module)
        self.__name__ = f"native-{self.tier}"

    def profile(self, function: str) -> list[tuple[object, float]]:
        """(IR node, seconds) for every timed node of `function` since the library was loaded
        (AMXC_PROFILE=1 builds only)."""
        if not self.profiling:
            raise NativeError("profiling is off: build the executor with profile=True or AMXC_PROFILE=1")
        fn = getattr(toolchain.load(self.library), f"amxc_profile_{function}")
        fn.restype = ctypes.POINTER(ctypes.c_double)
        times = fn()
        return [(node, times[i]) for i, node in enumerate(self.profiled[function])]

    def __call__(self, module: Module, function: str, inputs: list) -> np.ndarray:
        ids, pos, view = inputs
        ids = np.ascontiguousarray(ids, np.int64)
        pos = np.ascontiguousarray(pos, np.int64)
        if self.embed_rows and ids.size and (ids.min() < 0 or ids.max() >= self.embed_rows):
            bad = int(ids.max() if ids.max() >= self.embed_rows else ids.min())
            raise NativeError(f"token id {bad} is outside the vocabulary [0, {self.embed_rows})")
        b, s = ids.shape
        out = np.empty((b, s, self.vocab[function]), np.float32)
        if function == "decode":
            step = self.limits.max_batch
            for r0 in range(0, b, step):
                self._call(function, ids[r0:r0 + step], pos[r0:r0 + step], view, view.seqs[r0:r0 + step],
                           out[r0:r0 + step])
        else:
            chunk = self.limits.max_tokens
            for r in range(b):
                for c0 in range(0, s, chunk):
                    self._call(function, ids[r:r + 1, c0:c0 + chunk], pos[r:r + 1, c0:c0 + chunk], view,
                               view.seqs[r:r + 1], out[r:r + 1, c0:c0 + chunk])
        return out

    def _call(self, function, ids, pos, view, seqs, out) -> None:
        cache = view.cache
        ids, pos = np.ascontiguousarray(ids), np.ascontiguousarray(pos)
        bt = view.block_tables(seqs, pos)           # the runtime checks every position is reserved
        result = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)
        args = StepArgs(ids.shape[0], ids.shape[1], ids.ctypes.data, pos.ctypes.data,
                        cache.k.ctypes.data, cache.v.ctypes.data, bt.ctypes.data, bt.shape[1],
                        cache.block_size, cache.num_blocks, result.ctypes.data, self.ws_ptr,
                        ctypes.addressof(self.table), self.threads)
        rc = self.steps[function](ctypes.byref(args))
        if rc != 0:
            raise NativeError(f"native @{function} failed with status {rc}")
        if result is not out:
            out[...] = result
        for r, q in enumerate(seqs):                      # keep the cache's bookkeeping exact
            blocks = np.asarray(cache.tables[q])[pos[r] // cache.block_size]
            cache.filled[blocks, pos[r] % cache.block_size] = True


def _base(tier: str) -> str:
    return "avx2" if tier == isa.EMULATED else tier


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "model"


def _embedding_rows(module: Module) -> int:
    for fn in module.functions.values():
        for n in fn.nodes:
            if n.op == "embedding" and n.inputs[1].name == "input_ids":
                return int(n.inputs[0].type.shape[0])
    return 0
