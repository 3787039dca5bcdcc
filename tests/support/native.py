"""Building single kernels for tests: render a family's template for a tier, wrap it in an
extern "C" entry point, compile (cached) and call it through ctypes with numpy arrays.

Tiers: every tier (ref, avx2, avx512, amx, amx-emulated) is a test item on every host.  Tests
take the `tier` fixture (tests/conftest.py) with `parametrize("tier", ALL_TIERS, indirect=True)`;
on a host that cannot run a tier the item is skipped with a reason naming the missing CPU flags
(isa.missing), or FAILS if $AMXC_EXPECT_TIERS (comma-separated tier names, for CI) names it.

NF4 weights for kernel tests (`nf4_weight`): the kernels read the r16k4 repack, but the oracles
read the ORIGINAL flat (bitsandbytes-order) bytes, so a wrong repack cannot agree with itself."""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

import numpy as np
import pytest

from amxc.backends import isa, toolchain
from amxc.backends.kernels import TIER_HEADERS, KernelSet
from amxc.ir.formats import nf4

ALL_TIERS = (*isa.TIERS, isa.EMULATED)
EXPECT_ENV = "AMXC_EXPECT_TIERS"
#: the avx2 int8 kernels' dpbusd variant (what an AVX-VNNI host builds), a kernel test item
#: on every AVX2 host: native vpdpbusd where the host has avx_vnni, the exact software twin
#: elsewhere (amxc_avx2.h dpbusd_x8); build() and require_tier() take it as a tier
VNNI = "avx2-vnni"
KERNEL_TIERS = (*ALL_TIERS, VNNI)


def runnable_tiers() -> list[str]:
    """The tiers this host runs (silently drops the others: prefer ALL_TIERS + the `tier` fixture)."""
    return [t for t in ALL_TIERS if isa.supported(t)]


def missing_reason(tier: str) -> str:
    lacks = isa.missing(tier)
    what = ", ".join(lacks) if lacks else f"x86-64 (this is {platform.machine()})"
    return f"this host cannot run tier {tier}: missing {what}"


def expected_tiers() -> list[str]:
    """The tiers $AMXC_EXPECT_TIERS says this host must run (an unknown name is an error)."""
    names = [t.strip() for t in os.environ.get(EXPECT_ENV, "").split(",") if t.strip()]
    unknown = [t for t in names if t not in ALL_TIERS]
    if unknown:
        raise ValueError(f"{EXPECT_ENV} names unknown tier(s) {', '.join(unknown)} (tiers: {', '.join(ALL_TIERS)})")
    return names


def expected_but_missing() -> list[str]:
    """One line per tier $AMXC_EXPECT_TIERS names that this host cannot run."""
    return [missing_reason(t) for t in expected_tiers() if not isa.supported(t)]


def require_tier(tier: str) -> str:
    """`tier` if this host runs it; else skip naming the missing flags (fail if it is expected)."""
    if tier == VNNI:
        require_tier("avx2")
        return tier
    if tier not in ALL_TIERS:
        raise ValueError(f"unknown tier {tier!r}")
    if not isa.supported(tier):
        reason = missing_reason(tier)
        if tier in expected_tiers():
            pytest.fail(f"{reason}, but {EXPECT_ENV} requires it", pytrace=False)
        pytest.skip(reason)
    return tier


def build(tier: str, family: str, params: dict, signature: str, call: str, vnni: bool | None = None):
    """A ctypes function `entry` that runs `call` (C++ using `name`) with `signature`; `vnni`:
    KernelSet's (the avx2 kernels' dpbusd variant; None: as this host would build them)."""
    return build_many(tier, family, [params], signature, call, vnni)[0]


def build_many(tier: str, family: str, params_list: list[dict], signature: str, call: str,
               vnni: bool | None = None) -> list:
    """One library with a kernel per params (entry0, entry1, ...): one compile for many shapes."""
    if tier == VNNI:
        tier, vnni = "avx2", True
    ks = KernelSet(tier, vnni)
    names = [ks.get(family, **params) for params in params_list]
    head = "".join(f'#include "{h}"\n' for h in TIER_HEADERS[tier])
    entries = "".join(f'extern "C" void entry{i}({signature}) {{ {call.replace("NAME", name)}; }}\n'
                      for i, name in enumerate(names))
    lib = toolchain.load(toolchain.build(f"{head}\n{ks.source()}\n{entries}", tier, f"test-{family}"))
    return [getattr(lib, f"entry{i}") for i in range(len(names))]


def ptr(a):
    return ctypes.c_void_p(0) if a is None else ctypes.c_void_p(a.ctypes.data)


@dataclass
class NF4Weight:
    """A quantized weight twice: `orig` in the flat layout `flat` (what quantize produced, the
    oracle's input) and `blob` in the kernels' r16k4 layout `layout` (what the kernels read)."""
    orig: np.ndarray
    flat: nf4.Layout
    blob: np.ndarray
    layout: nf4.Layout

    def dequantized(self) -> np.ndarray:
        """The oracle's weight: the flat dequantization of the original bytes."""
        return self.flat.dequantize(self.orig)

    def twin_input(self) -> tuple[nf4.Layout, np.ndarray]:
        """(layout, bytes) for reference.gemv_nf4_q8 from the ORIGINAL flat bytes.  The twin reads
        fp8 and f32 scales; bitsandbytes scales become the flat f32 layout of their decoded
        values (as the kernels receive them), built with the flat packer, not the r16k4 one."""
        if self.flat.scale != "bnb_dynamic8":
            return self.flat, self.orig
        f32 = nf4.Layout(self.flat.shape, self.flat.block, "f32")
        return f32, f32.join(self.flat.codes(self.orig), self.flat.block_scales(self.orig))


def nf4_weight(n: int, k: int, scale: str, seed: int = 0, scale_block: int = 256) -> NF4Weight:
    w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.05).astype(np.float32)
    flat = nf4.Layout((n, k), 64, scale, scale_block)
    orig = nf4.quantize(w, flat)
    blob, layout = nf4.repack(orig.copy(), flat)
    return NF4Weight(orig, flat, blob, layout)
