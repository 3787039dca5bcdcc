"""The kernel library: jinja2 templates (templates/*.cpp.j2) rendered with concrete shapes into
C++ functions.  A KernelSet collects what one translation unit needs: asking twice for the same
kernel returns the same function name, so each shape is instantiated once; the code is rendered
when the unit's source is asked for, in the order the kernels were first named.

Which template a tier uses for a family is the table TIER_KERNELS: a family maps to a Template,
the isa that names its functions (`<family>_<isa>_<params>`), the template file, and parameters
the family fixes (`gemm_f32` and `gemm_nf4` are one GEMM template per isa, rendered with
weight="f32" or "nf4"; avx2 and avx512 share one f32 GEMV).  `amx` is avx512 with AMX tile
GEMMs for prefill, `amx-emulated` the same tile GEMMs through the software emulator with avx2
around them (so AMX code runs, slowly, on machines without AMX)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2

from . import isa

TEMPLATES = Path(__file__).parent / "templates"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Template:
    isa: str                                    # in the function name: <family>_<isa>_<params>
    file: str                                   # templates/<file>.cpp.j2
    fixed: dict = field(default_factory=dict)   # parameters the family fixes
    members: str = ""                           # a grouped family: the family of its members, one
                                                # per entry of its tuple parameter N

    @property
    def path(self) -> str:
        return f"{self.file}.cpp.j2"


def _family_templates(isa: str, simd_gemv: bool) -> dict[str, Template]:
    return {"q8": Template("ref", "q8_ref"),
            "gemv_nf4": Template(isa, f"gemv_nf4_{isa}", {"codes": "nf4"}),
            "gemv_nf4_group": Template(isa, "gemv_group", members="gemv_nf4"),
            "gemv_q8": Template(isa, f"gemv_nf4_{isa}", {"codes": "q8", "scale": "f32", "scale_block": 0,
                                                         "pair": False}),
            "gemm_q8": Template(isa, "gemm_q8"),
            "gemm_nf4": Template(isa, f"gemm_{isa}", {"weight": "nf4"}),
            "gemv_f32": Template(isa, "gemv_f32_simd" if simd_gemv else f"gemv_f32_{isa}"),
            "gemv_f32_acc64": Template(isa, "gemv_f32_acc64"),
            "gemm_f32": Template(isa, f"gemm_{isa}", {"weight": "f32", "scale": ""})}


_TILES = {"gemm_nf4_tiles": Template("amx", "gemm_nf4_tiles_amx")}

#: family -> template, per tier
TIER_KERNELS = {
    "ref": _family_templates("ref", simd_gemv=False),
    "avx2": _family_templates("avx2", simd_gemv=True),
    "avx512": _family_templates("avx512", simd_gemv=True),
    "amx": {**_family_templates("avx512", simd_gemv=True), **_TILES},
    "amx-emulated": {**_family_templates("avx2", simd_gemv=True), **_TILES},
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
    def __init__(self, tier: str, vnni: bool | None = None):
        """`vnni`: render the avx2 int8 kernels' dpbusd variant (templates/gemv_nf4_avx2.cpp.j2);
        None: where this host has AVX-VNNI (isa.avx_vnni).  True elsewhere runs the variant
        through amxc_avx2.h's exact software dpbusd: slower, for testing it on any AVX2 host."""
        self.tier = tier
        self.vnni = isa.avx_vnni(tier) if vnni is None else vnni
        self.wanted: dict[str, tuple[Template, dict]] = {}     # function name -> how to render it
        self.sources: dict[str, str] = {}                      # function name -> rendered C++

    def has(self, family: str) -> bool:
        return family in TIER_KERNELS[self.tier]

    def get(self, family: str, **params) -> str:
        """The name of `family`'s kernel for `params` (rendered by source()).  Parameters
        become C++ (sizes, the function name): only ints, flags, plain identifiers and tuples
        of ints pass.  A grouped family's members (one per entry of N) are named first, so
        they are rendered before it."""
        for k, v in params.items():
            if not (v is None or isinstance(v, (int, bool)) or (isinstance(v, str) and _IDENT.fullmatch(v))
                    or (isinstance(v, tuple) and v and all(type(i) is int for i in v))):
                raise ValueError(f"kernel {family}: parameter {k} must be an int, a flag, an "
                                 f"identifier or a tuple of ints, got {type(v).__name__}")
        template = TIER_KERNELS[self.tier][family]
        extra = {}
        if template.members:
            extra["members"] = [self.get(template.members, **{**params, "N": n}) for n in params["N"]]
        key = "_".join("x".join(map(str, v)) if isinstance(v, tuple) else f"{v}"
                       for v in params.values() if v not in (None, False, True, "")) + \
              "".join(f"_{k}" for k, v in params.items() if v is True)
        name = f"{family}_{template.isa}_{key}".replace("-", "_").replace(".", "_")
        self.wanted.setdefault(name, (template, {**params, **extra}))
        return name

    def source(self) -> str:
        for name, (template, params) in self.wanted.items():
            if name not in self.sources:
                self.sources[name] = render(template.path, name=name, **params, **template.fixed,
                                            **({"vnni": True} if self.vnni else {}))
        return "\n".join(self.sources[name] for name in self.wanted)
