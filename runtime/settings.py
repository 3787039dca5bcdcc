"""Runtime settings, in one object: how to execute (NativeOptions: executor, ISA tier, threads,
GEMV/tile modes), how big the KV cache is, and how the scheduler fills a step.

`Settings.from_env()` is where the AMXC_* variables are read (at the top: the CLI, the Python
API, Engine.load); everything below takes the object."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from amxc.backends.program import NativeOptions

from .speculate import Speculation


@dataclass(frozen=True)
class Settings:
    native: NativeOptions = field(default_factory=NativeOptions)
    kv_tokens: int = 4096            # KV cache capacity, tokens (rounded up to whole blocks)
    kv_bytes: int | None = None      # or its memory, bytes: the engine turns it into tokens
    block_size: int = 16             # tokens per KV block
    max_batch_tokens: int = 512      # tokens one step computes (decode rows + prefill chunks)
    max_seqs: int = 64               # sequences running at once
    prefix_caching: bool = True
    # tensor parallelism (a sharded artifact): where each rank runs and how the ranks talk
    bind: str | None = None          # CPUs per rank, "0-27|28-55|..." (default: NUMA nodes, else an even split)
    transport: str = "shm"           # "shm": ranks on this host; "mpi": ranks started by mpiexec
    comm_timeout: float = 30.0       # seconds a rank may wait on a silent peer before giving up
    speculate: str | None = None     # "ngram[:K]": speculative decoding by prompt lookup (speculate.py)

    def __post_init__(self):
        if self.transport not in ("shm", "mpi"):
            raise ValueError(f"settings: transport must be 'shm' or 'mpi', got {self.transport!r}")
        if not (isinstance(self.comm_timeout, (int, float)) and 0 < self.comm_timeout <= 3600):
            raise ValueError(f"settings: comm_timeout must be 0 < seconds <= 3600, got {self.comm_timeout!r}")
        Speculation.parse(self.speculate)            # a bad spec fails here, before any load
        for name in ("kv_tokens", "block_size", "max_batch_tokens", "max_seqs", "kv_bytes"):
            value = getattr(self, name)
            if name == "kv_bytes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"settings: {name} must be a positive integer, got {value!r}")

    @property
    def speculation(self) -> Speculation | None:
        return Speculation.parse(self.speculate)

    @property
    def num_blocks(self) -> int:
        return -(-self.kv_tokens // self.block_size)

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults, the environment's native options, then `overrides` (see with_overrides)."""
        return cls(native=NativeOptions.from_env()).with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "Settings":
        """These settings with `overrides` applied (None means unset).  Native option names
        (tier or its older spelling isa, threads, gemv, tiles, executor, profile) go to `native`."""
        if "isa" in overrides:
            overrides["tier"] = overrides.pop("isa")
        native_names = {f.name for f in fields(NativeOptions)}
        native = {k: overrides.pop(k) for k in list(overrides) if k in native_names}
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        out = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        return replace(out, native=replace(out.native, **{k: v for k, v in native.items() if v is not None}))
