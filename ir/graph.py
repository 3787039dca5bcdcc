"""Graph views of an IR function: networkx for analyses, DOT text and a self-contained SVG for
people (`amxc inspect --format dot|svg`).  The SVG needs no Graphviz install: nodes are placed
in layers by dependency depth, ordered within a layer by their inputs' positions."""
from __future__ import annotations

import html
from collections import defaultdict

import networkx as nx

from .core import Function, Param

_OP_COLORS = {"linear": "#cfe2ff", "matmul": "#cfe2ff", "sdpa": "#f8d7da", "embedding": "#d1e7dd",
              "layer_norm": "#fff3cd", "softmax": "#f8d7da", "concat": "#e2e3e5", "reshape": "#e2e3e5",
              "permute": "#e2e3e5", "slice": "#e2e3e5", "expand": "#e2e3e5"}


def to_networkx(fn: Function) -> nx.DiGraph:
    """Nodes: 'arg:NAME', 'node:INDEX', 'return'; edges carry the value name and type."""
    g = nx.DiGraph()
    where = {}
    for a in fn.args:
        key = f"arg:{a.name}"
        g.add_node(key, label=f"%{a.name}", detail=str(a.type), kind="arg")
        where[id(a)] = key
    for i, node in enumerate(fn.nodes):
        key = f"node:{i}"
        params = [v.name for v in node.inputs if isinstance(v, Param)]
        g.add_node(key, label=node.op, detail=", ".join(str(v.type) for v in node.outputs),
                   params=params, kind="op", loc=node.loc or "")
        for v in node.inputs:
            if id(v) in where:
                g.add_edge(where[id(v)], key, value=v.name, type=str(v.type))
        for v in node.outputs:
            where[id(v)] = key
    g.add_node("return", label="return", detail="", kind="return")
    for v in fn.results:
        if id(v) in where:
            g.add_edge(where[id(v)], "return", value=v.name, type=str(v.type))
    return g


def to_dot(fn: Function) -> str:
    g = to_networkx(fn)
    lines = [f'digraph "{fn.name}" {{', '  node [shape=box, fontname="monospace", fontsize=10];']
    for key, d in g.nodes(data=True):
        parts = [d["label"], d["detail"], *(f"@{p}" for p in d.get("params", []))]
        label = "\\n".join(_dot_escape(p) for p in parts if p)
        color = _OP_COLORS.get(d["label"], "#ffffff") if d["kind"] == "op" else "#eeeeee"
        lines.append(f'  "{key}" [label="{label}", style=filled, fillcolor="{color}"];')
    for u, v, d in g.edges(data=True):
        lines.append(f'  "{u}" -> "{v}" [label="%{_dot_escape(d["value"])}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def layout(g: nx.DiGraph) -> dict[str, tuple[int, int]]:
    """(layer, position-in-layer) per node: layer = longest path from a source."""
    depth: dict[str, int] = {}
    for key in nx.topological_sort(g):
        depth[key] = max((depth[p] + 1 for p in g.predecessors(key)), default=0)
    layers: dict[int, list[str]] = defaultdict(list)
    for key, d in depth.items():
        layers[d].append(key)
    pos: dict[str, tuple[int, int]] = {}
    for d in sorted(layers):
        def barycenter(k):
            preds = [pos[p][1] for p in g.predecessors(k) if p in pos]
            return sum(preds) / len(preds) if preds else 0.0
        for i, key in enumerate(sorted(layers[d], key=barycenter)):
            pos[key] = (d, i)
    return pos


def to_svg(fn: Function, title: str | None = None) -> str:
    g = to_networkx(fn)
    pos = layout(g)
    box_w, box_h, gap_x, gap_y, margin = 230, 44, 30, 36, 20
    width = margin * 2 + (max(p[1] for p in pos.values()) + 1) * (box_w + gap_x)
    height = margin * 2 + 30 + (max(p[0] for p in pos.values()) + 1) * (box_h + gap_y)

    def xy(key):
        layer, i = pos[key]
        return margin + i * (box_w + gap_x), margin + 30 + layer * (box_h + gap_y)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
           'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>',
           f'<text x="{margin}" y="{margin + 12}" font-size="14">{html.escape(title or "@" + fn.name)}</text>']
    for u, v, d in g.edges(data=True):
        (x1, y1), (x2, y2) = xy(u), xy(v)
        x1, y1, x2 = x1 + box_w / 2, y1 + box_h, x2 + box_w / 2
        out.append(f'<path d="M{x1},{y1} C{x1},{y1 + gap_y} {x2},{y2 - gap_y} {x2},{y2}" fill="none" '
                   f'stroke="#999" marker-end="url(#arrow)"><title>%{html.escape(d["value"])}: '
                   f'{html.escape(d["type"])}</title></path>')
    for key, d in g.nodes(data=True):
        x, y = xy(key)
        color = _OP_COLORS.get(d["label"], "#ffffff") if d["kind"] == "op" else "#eeeeee"
        tip = "\n".join(filter(None, [d["detail"], *("@" + p for p in d.get("params", [])), d.get("loc")]))
        sub = d["detail"] if len(d["detail"]) <= 34 else d["detail"][:33] + "…"
        if d.get("params"):
            sub = "@" + d["params"][0].rsplit(".", 2)[-2] + " " + sub
            sub = sub if len(sub) <= 34 else sub[:33] + "…"
        out.append(f'<g><title>{html.escape(tip)}</title><rect x="{x}" y="{y}" width="{box_w}" '
                   f'height="{box_h}" rx="6" fill="{color}" stroke="#555"/>'
                   f'<text x="{x + 8}" y="{y + 17}" font-weight="bold">{html.escape(d["label"])}</text>'
                   f'<text x="{x + 8}" y="{y + 34}" fill="#333">{html.escape(sub)}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
