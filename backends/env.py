"""amxc's environment variables, read and checked in one place: a value that is not one of the
documented ones is an error naming the variable, never silently ignored."""
from __future__ import annotations

import os

#: variable -> (allowed values, default); AMXC_ISA is checked by isa.select_tier
CHOICES = {
    "AMXC_EXECUTOR": (("native", "interpreter"), "native"),
    "AMXC_GEMV": (("int8", "exact"), "int8"),
    "AMXC_TILES": (("int8", "bf16", "off"), "int8"),
    "AMXC_PROFILE": (("0", "1"), "0"),
    "AMXC_VERIFY": (("remember", "always"), "remember"),    # runtime/verified.py
    "AMXC_PIN": (("0", "1"), "0"),                          # NativeOptions.pin
    "AMXC_WEIGHTS": (("copy", "map"), "copy"),              # NativeOptions.weights
}


class EnvError(ValueError):
    """An environment variable with a value amxc does not know."""


def choice(name: str) -> str:
    allowed, default = CHOICES[name]
    value = os.environ.get(name, "") or default
    if value not in allowed:
        raise EnvError(f"{name}={value!r} is not one of: {', '.join(allowed)} (or leave it unset)")
    return value


def isa_request() -> str:
    """AMXC_ISA, or "auto"; isa.select_tier checks it against the machine."""
    return os.environ.get("AMXC_ISA", "").strip() or "auto"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads() -> int:
    """AMXC_NUM_THREADS, 1 to the CPUs this process may use (default: all of them).  More
    threads than CPUs only oversubscribe, and the kernels size per-thread scratch by it."""
    cpus = available_cpus()
    value = os.environ.get("AMXC_NUM_THREADS", "")
    if not value:
        return cpus
    if not value.strip().isdigit() or not 1 <= int(value) <= cpus:
        raise EnvError(f"AMXC_NUM_THREADS={value!r} must be a whole number from 1 to {cpus} "
                       f"(the CPUs this process may use)")
    return int(value)


def pin_openmp_threads() -> bool:
    """Bind the kernels' OpenMP threads one to a core (OMP_PROC_BIND=close, OMP_PLACES=cores,
    within this process's CPU mask) unless the user set either variable; called before the first
    kernel library brings libgomp in, which reads them once.  True if it set them.

    Opt-in (AMXC_PIN=1, NativeOptions.pin): measured on a 2-vCPU Zen 4 VM, pinned threads keep
    decoding at speed beside another busy process (SmolLM2 74-79 tok/s against 16-21 unpinned)
    and prefill faster on a quiet one, but libgomp binds the calling thread too, and every
    thread the process starts afterwards inherits that one-core mask: a second engine loaded in
    the same process (or a library pool started later) then shares one core with the kernels'
    main thread, and decoding ran 1.75x slower.  Pin where one engine owns the process."""
    if "OMP_PROC_BIND" in os.environ or "OMP_PLACES" in os.environ:
        return False
    os.environ["OMP_PROC_BIND"] = "close"
    os.environ["OMP_PLACES"] = "cores"
    return True
