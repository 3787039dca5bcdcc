"""Building single kernels for tests: render a family's template for a tier, wrap it in an
extern "C" entry point, compile (cached) and call it through ctypes with numpy arrays."""
from __future__ import annotations

import ctypes

import numpy as np

from amxc.backends import isa, toolchain
from amxc.backends.kernels import TIER_HEADERS, KernelSet


def runnable_tiers() -> list[str]:
    return [t for t in (*isa.TIERS, isa.EMULATED) if isa.supported(t)]


def build(tier: str, family: str, params: dict, signature: str, call: str):
    """A ctypes function `entry` that runs `call` (C++ using `name`) with `signature`."""
    ks = KernelSet(tier)
    name = ks.get(family, **params)
    head = "".join(f'#include "{h}"\n' for h in TIER_HEADERS[tier])
    src = f'{head}\n{ks.source()}\nextern "C" void entry({signature}) {{ {call.replace("NAME", name)}; }}\n'
    lib = toolchain.load(toolchain.build(src, tier, f"test-{family}"))
    return lib.entry


def ptr(a):
    return ctypes.c_void_p(0) if a is None else ctypes.c_void_p(a.ctypes.data)
