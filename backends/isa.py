"""Which instruction-set tier this machine runs, and which one to use.

Tiers, lowest first: `ref` (scalar C++, runs anywhere), `avx2` (x86-64-v3: avx2, fma, f16c,
bmi2), `avx512` (avx512f/bw/vl/vnni/bf16), `amx` (avx512 plus amx_tile/bf16/int8 *and* the
kernel's permission to use tile data, `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`;
Linux >= 5.16 traps the first tile instruction of a process that has not asked).  The CPU flags
come from /proc/cpuinfo.  `AMXC_ISA=<tier>` forces a lower tier (never a higher one: that would
crash with SIGILL); `AMXC_ISA=amx-emulated` runs the AMX kernels through the software tile
emulator (backends/include/amx_compat.h) with AVX2 around them, for machines without AMX.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path

TIERS = ("ref", "avx2", "avx512", "amx")
EMULATED = "amx-emulated"          # amx tile kernels in software, avx2 elsewhere
REQUIRED_FLAGS = {
    "ref": set(),
    "avx2": {"avx2", "fma", "f16c", "bmi2"},
    "avx512": {"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
               "avx512_bf16"},
    "amx": {"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
            "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"},
}
EMULATED_FLAGS = REQUIRED_FLAGS["avx2"]
ENV = "AMXC_ISA"

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158               # x86-64


class ISAError(RuntimeError):
    """A tier this machine cannot run; the message names what is missing and what to use."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def amx_permission() -> bool:
    """Ask the kernel for AMX tile data (once per process; inherited by threads and forks)."""
    if platform.machine() != "x86_64" or "amx_tile" not in cpu_flags():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def supported(tier: str) -> bool:
    if tier == EMULATED:
        return EMULATED_FLAGS <= cpu_flags()
    if tier not in REQUIRED_FLAGS:
        raise ISAError(f"unknown ISA tier '{tier}' (tiers: {', '.join(TIERS)}, {EMULATED})")
    if platform.machine() != "x86_64" and tier != "ref":
        return False
    if not REQUIRED_FLAGS[tier] <= cpu_flags():
        return False
    return tier != "amx" or amx_permission()


def missing(tier: str) -> list[str]:
    """What this machine lacks for `tier` (flags, or the AMX permission)."""
    need = EMULATED_FLAGS if tier == EMULATED else REQUIRED_FLAGS[tier]
    out = sorted(need - cpu_flags())
    if tier == "amx" and not out and not amx_permission():
        out.append("arch_prctl(ARCH_REQ_XCOMP_PERM) permission for AMX tile data")
    return out


#: tiers whose int8 kernels are the avx2 templates: on a host with AVX-VNNI (Intel Alder Lake
#: and later clients, Sierra Forest Xeons: 256-bit vpdpbusd without AVX-512) they are built with
#: -mavxvnni and take their dpbusd variant (KernelSet), the same integers as maddubs, fewer ops
AVX2_KERNEL_TIERS = ("avx2", EMULATED)


def avx_vnni(tier: str) -> bool:
    """Whether `tier`'s kernels run on AVX-VNNI here."""
    return tier in AVX2_KERNEL_TIERS and "avx_vnni" in cpu_flags()


def best_tier() -> str:
    """The highest tier this machine runs."""
    return [t for t in TIERS if supported(t)][-1]


def select_tier(requested: str | None = None) -> str:
    """The tier to run: `requested` if this machine supports it; "auto" (or None): the best.
    A tier above the machine's is an error naming the missing flags and the fallback.  (The
    caller reads $AMXC_ISA: env.isa_request.)"""
    want = requested or "auto"
    if want == "auto":
        return best_tier()
    if want == EMULATED or want in TIERS:
        if not supported(want):
            raise ISAError(f"ISA tier '{want}' is not available on this machine (missing: "
                           f"{', '.join(missing(want))}); the best it runs is '{best_tier()}' "
                           f"(set {ENV}={best_tier()} or leave it unset)")
        return want
    raise ISAError(f"{ENV}={want!r} is not a tier (tiers: auto, {', '.join(TIERS)}, {EMULATED})")
