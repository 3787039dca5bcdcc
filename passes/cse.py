"""cse: one node per distinct computation (same op, same inputs, same attributes)."""
from amxc.ir import Module
from amxc.ir.attrs import format_value

from .base import Pass, register_pass
from .pattern import replace_uses


@register_pass("cse")
class CommonSubexpressionElimination(Pass):
    def run(self, module: Module) -> bool:
        changed = False
        for fn in module.functions.values():
            seen: dict[tuple, object] = {}
            replaced: dict[int, object] = {}
            for node in list(fn.nodes):
                node.inputs = [replaced.get(id(v), v) for v in node.inputs]
                if node.opdef.side_effects:
                    continue
                key = (node.op, tuple(id(v) for v in node.inputs),
                       tuple((k, format_value(v)) for k, v in sorted(node.attrs.items()) if v is not None),
                       tuple(str(v.type) for v in node.outputs))
                if key in seen:
                    for old, new in zip(node.outputs, seen[key].outputs):
                        replaced[id(old)] = new
                        replace_uses(fn, old, new)
                    fn.nodes.remove(node)
                    changed = True
                else:
                    seen[key] = node
        return changed
