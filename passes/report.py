"""The fusion report: which expected fusions fired in which layer, and why the others did not.

Counted on the result, not on pass firings, so a fusion the frontend already produced (GPT-2's
`layer_norm`) counts too.  Which op counts as which fusion is the op's own `kind` (the op
registry); every kind is expected in every layer.  A layer missing an expected fusion is a
warning naming the rejected candidates of that layer with the rule's reason (`--strict-fusion`
makes it an error)."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from amxc.ir import Module, all_ops

#: the order the report lists kinds in (a layer's order); kinds ops declare beyond these follow
ORDER = ("attention", "norm", "rope", "mlp")
NO_ROPE_FAMILIES = {"gpt2"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks?)\.(\d+)(?:\.|\b)")


def layer_of(loc: str | None) -> int | None:
    m = _LAYER.search(loc or "")
    return int(m.group(1)) if m else None


@dataclass
class FusionReport:
    num_layers: int
    expected: tuple[str, ...]
    counts: dict[str, dict[int, int]]
    rejected: list[tuple[str, int | None, str]] = field(default_factory=list)

    def layers_with(self, kind: str) -> int:
        return sum(1 for n in self.counts.get(kind, {}).values() if n)

    def missing(self) -> dict[str, list[int]]:
        return {k: [i for i in range(self.num_layers) if not self.counts.get(k, {}).get(i)]
                for k in self.expected
                if any(not self.counts.get(k, {}).get(i) for i in range(self.num_layers))}

    def warnings(self) -> list[str]:
        out = []
        for kind, layers in self.missing().items():
            why = sorted({f"{rule}: {reason}" for rule, layer, reason in self.rejected
                          if layer in layers or layer is None})
            out.append(f"fusion '{kind}' did not fire in layer(s) {_ranges(layers)} of "
                       f"{self.num_layers}" + (f"; rejected candidates: {'; '.join(why[:4])}" if why
                                               else "; no candidate matched"))
        return out

    def render(self) -> str:
        head = f"fusions per layer ({self.num_layers} layers):"
        rows = [f"  {k:<10} {self.layers_with(k):>3}/{self.num_layers} layers, "
                f"{sum(self.counts.get(k, {}).values())} ops" for k in self.expected]
        return "\n".join([head, *rows, *(f"  warning: {w}" for w in self.warnings())])


def kinds() -> tuple[str, ...]:
    """Every fusion kind an op declares, in report order."""
    declared = [op.kind for op in all_ops().values() if op.kind]
    return tuple(sorted(set(declared), key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER),
                                                      declared.index(k))))


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs[:8]) + (" …" if len(xs) > 8 else "")


def fusion_report(module: Module, passes=()) -> FusionReport:
    fn = module.main
    counts: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    known = module.attrs.get("num_layers")
    for node in fn.nodes:
        kind = node.opdef.kind
        if kind:                          # an op that knows its layer (attention_cached) says so
            layer = node.attrs["layer"] if "layer" in node.opdef.attrs else layer_of(node.loc)
            # exporters may file the final norm under one layer past the last (the ONNX model
            # builder's layers.N/final_norm_layernorm): it belongs to no layer
            if layer is not None and (not known or layer < known):
                counts[kind][layer] += 1
    layers = known or (1 + max((i for c in counts.values() for i in c), default=-1))
    no_rope = module.attrs.get("family") in NO_ROPE_FAMILIES or module.attrs.get("position_encoding") == "learned"
    expected = tuple(k for k in kinds() if (k != "rope" or not no_rope)
                     and (k != "lf" or module.attrs.get("family") == "yuan"))
    rejected = [(rule, layer_of(node.loc), reason) for p in passes
                for rule, node, reason in getattr(getattr(p, "log", None), "rejected", [])]
    return FusionReport(layers, expected, {k: dict(v) for k, v in counts.items()}, rejected)
