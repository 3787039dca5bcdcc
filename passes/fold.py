"""fold-constants: evaluate nodes whose inputs are all known at compile time.

Scalars become `constant` nodes; small static tensors (at most MAX_ELEMENTS) become module
parameters `@folded.N`.  Only statically shaped results fold: anything that depends on a
symbolic size (an `arange(s)`) is left for run time."""
from __future__ import annotations

import numpy as np

from amxc.ir import Builder, Module, Param
from amxc.ir.interpreter import reference_kwargs

from .base import Option, Pass, register_pass
from .pattern import remove_dead, replace_uses

CREATION = {"constant", "arange", "full"}


@register_pass("fold-constants")
class FoldConstants(Pass):
    options = {"max_elements": Option(int, 4096, "largest tensor folded into a parameter")}

    def run(self, module: Module) -> bool:
        changed = False
        counter = sum(1 for p in module.params if p.startswith("folded."))
        for fn in module.functions.values():
            known: dict[int, np.ndarray] = {}
            for i, node in enumerate(list(fn.nodes)):
                if node.opdef.side_effects or not all(o.type.is_static() for o in node.outputs):
                    continue
                if node.op not in CREATION and not (node.inputs and all(id(v) in known for v in node.inputs)):
                    continue
                out = node.opdef.reference(*(known[id(v)] for v in node.inputs), **reference_kwargs(node, {}))
                outs = out if isinstance(out, tuple) else (out,)
                for v, arr in zip(node.outputs, outs):
                    known[id(v)] = np.asarray(arr)
                if node.op == "constant":
                    continue
                for v, arr in zip(node.outputs, outs):
                    arr = np.asarray(arr, dtype=v.type.dtype.storage)
                    if arr.size > self.opts["max_elements"]:
                        continue
                    b = Builder(fn, loc=node.loc, insert_at=fn.nodes.index(node))
                    if arr.ndim == 0:
                        new = b.emit("constant", [], {"value": arr.item(), "dtype": v.type.dtype},
                                     name=v.name)
                    else:
                        new = module.add_param(Param(f"folded.{counter}", v.type))
                        new.set_data(arr)
                        counter += 1
                    replace_uses(fn, v, new)
                    changed = True
            remove_dead(fn)
        return changed

