"""The kernel library: jinja2 templates (templates/<family>_<isa>.cpp.j2) rendered with concrete
shapes into C++ functions.  A KernelSet collects what one translation unit needs: asking twice
for the same kernel returns the same function name, so each shape is instantiated once.

Which template a tier uses for a family is the table TIER_KERNELS: `amx` is avx512 with AMX tile
GEMMs for prefill, `amx-emulated` the same tile GEMMs through the software emulator with avx2
around them (so AMX code runs, slowly, on machines without AMX)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).parent / "templates"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: family -> template isa, per tier
TIER_KERNELS = {
    "ref": {"q8": "ref", "gemv_nf4": "ref", "gemm_nf4": "ref", "gemv_f32": "ref", "gemm_f32": "ref"},
    "avx2": {"q8": "ref", "gemv_nf4": "avx2", "gemm_nf4": "avx2", "gemv_f32": "avx2", "gemm_f32": "avx2"},
    "avx512": {"q8": "ref", "gemv_nf4": "avx512", "gemm_nf4": "avx512", "gemv_f32": "avx512",
               "gemm_f32": "avx512"},
    "amx": {"q8": "ref", "gemv_nf4": "avx512", "gemm_nf4": "avx512", "gemv_f32": "avx512",
            "gemm_f32": "avx512", "gemm_nf4_tiles": "amx"},
    "amx-emulated": {"q8": "ref", "gemv_nf4": "avx2", "gemm_nf4": "avx2", "gemv_f32": "avx2",
                     "gemm_f32": "avx2", "gemm_nf4_tiles": "amx"},
}
#: headers each tier's translation unit includes
TIER_HEADERS = {"ref": ["amxc_rt.h", "amxc_nf4.h"], "avx2": ["amxc_rt.h", "amxc_avx2.h"],
                "avx512": ["amxc_rt.h", "amxc_avx512.h"],
                "amx": ["amxc_rt.h", "amxc_avx512.h", "amx_compat.h", "amxc_tiles.h"],
                "amx-emulated": ["amxc_rt.h", "amxc_avx2.h", "amx_compat.h", "amxc_tiles.h"]}


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template: str, **params) -> str:
    return environment().get_template(template).render(**params)


class KernelSet:
    def __init__(self, tier: str):
        self.tier = tier
        self.sources: dict[str, str] = {}      # function name -> rendered C++

    def has(self, family: str) -> bool:
        return family in TIER_KERNELS[self.tier]

    def get(self, family: str, **params) -> str:
        """The name of `family`'s kernel for `params`, rendering it on first use.  Parameters
        become C++ (sizes, the function name): only ints, flags and plain identifiers pass."""
        for k, v in params.items():
            if not (v is None or isinstance(v, (int, bool)) or (isinstance(v, str) and _IDENT.fullmatch(v))):
                raise ValueError(f"kernel {family}: parameter {k} must be an int, a flag or an "
                                 f"identifier, got {type(v).__name__}")
        isa = TIER_KERNELS[self.tier][family]
        key = "_".join(f"{v}" for v in params.values() if v not in (None, False, True, "")) + \
              "".join(f"_{k}" for k, v in params.items() if v is True)
        name = f"{family}_{isa}_{key}".replace("-", "_").replace(".", "_")
        if name not in self.sources:
            self.sources[name] = render(f"{family}_{isa}.cpp.j2", name=name, **params)
        return name

    def source(self) -> str:
        return "\n".join(self.sources.values())
