"""lower: make a cache-aware module ready for the native kernels.

  * NF4 and q8 weights are repacked into the kernels' r16k4 order (ir/formats/; same values, so
    the IR still runs on the reference interpreter); an NF4 weight no kernel streams (block
    other than 64, rows not a multiple of 64 wide — bitsandbytes imports can have both) is
    stored decoded as f32 instead, and the report says so;
  * every op of @prefill and @decode must have native code (its registry entry's `native`),
    else the pass fails naming the op and its source line;
  * `target` is recorded: the lowest ISA tier the artifact may run on.  `auto` runs anywhere and
    picks the machine's best tier at load; `avx2`, `avx512` or `amx` make loading on a machine
    without it an error that names the fallback.

Kernels themselves are not in the artifact: they are generated from this IR at load, for the
tier chosen there, and cached (backends/toolchain.py) — loading never runs code from an artifact.
"""
from __future__ import annotations

from amxc.ir import Module, Param, TensorType
from amxc.ir.dtypes import f32
from amxc.ir.formats import nf4, q8
from amxc.ir.transform import swap_to_float
from amxc.passes import Option, Pass, PassError, register_pass

from .isa import TIERS

STEP_FUNCTIONS = ("prefill", "decode")


@register_pass("lower")
class Lower(Pass):
    options = {"target": Option(str, "auto", "auto | ref | avx2 | avx512 | amx: the lowest tier to run on")}

    def run(self, module: Module) -> bool:
        target = self.opts["target"]
        if target not in ("auto", *TIERS):
            raise PassError(f"lower: target={target!r} is not one of auto, {', '.join(TIERS)}")
        missing = [f for f in STEP_FUNCTIONS if f not in module.functions]
        if missing:
            raise PassError(f"lower needs @prefill and @decode (run kv-cache first); missing @{missing[0]}")
        for name in STEP_FUNCTIONS:
            for n in module.functions[name].nodes:
                if n.opdef.native is None:
                    raise PassError(f"lower: no native kernel for op '{n.op}' in @{name}"
                                    + (f" ({n.loc})" if n.loc else ""))
        self.repacked, self.decoded = [], []
        changed = False
        for p in list(module.params.values()):
            if p.type.dtype.name == "q8" and p.type.quant_layout().pack != "r16k4":
                layout = p.type.quant_layout()
                t = TensorType(p.type.dtype, p.type.shape, layout.packed().encoding())
                module.params[p.name] = p.derive(p.name, t, lambda blob, lay=layout: q8.repack(blob, lay)[0],
                                                 attrs=p.attrs)
                self._retarget_uses(module, p, module.params[p.name])
                self.repacked.append(p.name)
                changed = True
            if p.type.dtype.name != "nf4":
                continue
            layout = p.type.nf4_layout()
            if layout.pack == "r16k4":
                continue
            if layout.block == 64 and len(layout.shape) == 2 and layout.shape[1] % 64 == 0:
                module.params[p.name] = _repacked(p, layout)
                self._retarget_uses(module, p, module.params[p.name])
                self.repacked.append(p.name)
            else:
                swap_to_float(module, p, _decoded(p, layout))
                self.decoded.append(p.name)
            changed = True
        if module.attrs.get("target") != target:
            module.attrs["target"] = target
            changed = True
        return changed

    @staticmethod
    def _retarget_uses(module: Module, old: Param, new: Param) -> None:
        for fn in module.functions.values():
            for n in fn.nodes:
                n.inputs = [new if v is old else v for v in n.inputs]


def _repacked(p: Param, layout: nf4.Layout) -> Param:
    target = layout.packed("r16k4")
    t = TensorType(p.type.dtype, p.type.shape, target.encoding())
    return p.derive(p.name, t, lambda blob: nf4.repack(blob, layout)[0], attrs=p.attrs)


def _decoded(p: Param, layout: nf4.Layout) -> Param:
    return p.derive(p.name, TensorType(f32, p.type.shape), layout.dequantize,
                    attrs={**p.attrs, "decoded_from": str(p.type)})
