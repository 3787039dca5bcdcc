"""dce: remove nodes whose results nobody reads, and parameters no function uses."""
from amxc.ir import Module

from .base import Pass, register_pass
from .pattern import remove_dead


@register_pass("dce")
class DeadCodeElimination(Pass):
    def run(self, module: Module) -> bool:
        removed = sum(remove_dead(fn) for fn in module.functions.values())
        return bool(removed) | bool(module.drop_unused_params())
