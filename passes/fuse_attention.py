"""fuse-attention: scaled dot-product attention, in its SDPA-call and decomposed
matmul-softmax-matmul forms, with MHA/GQA/MQA (repeat_kv undone), into `attention`.

Masks are recognised by what they compute, not by how an exporter spelled them (HF builds its
causal mask from position_ids through a dozen index/compare ops that change between versions):
the mask's subgraph is run on probe positions and compared with the causal and sliding-window
position masks, optionally combined with a key-padding mask taken from a [b, s] input.
amxc's `attention` masks by positions, the rule its KV cache also uses, so the
fused graph treats each batch row as one sequence (no packed sequences)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from amxc.ir import Builder, Function, Module, Param, Value
from amxc.ir import dtypes as T
from amxc.ir.interpreter import run as interpret
from amxc.ir.ops.fused import position_mask

from .base import register_pass
from .pattern import P, RewritePass, Rule

PROBE_MAX = 4096


# -- masks ------------------------------------------------------------------------------------------
def _ancestors(fn: Function, v: Value) -> list:
    need, nodes = {id(v)}, []
    for n in reversed(fn.nodes):
        if any(id(o) in need for o in n.outputs):
            nodes.append(n)
            need.update(id(x) for x in n.inputs)
    return nodes[::-1], need


@dataclass(frozen=True)
class MaskInfo:
    causal: bool
    window: int
    positions: Value | None     # the i64[b, s] input the mask compares, if any
    padding: Value | None       # the [b, s] input marking real (non-zero) tokens, if any


def classify_mask(fn: Function, mask: Value) -> MaskInfo | str:
    """What a mask computes, found by running its subgraph on probe inputs: causal or not, a
    sliding window, and which inputs serve as positions and as a key-padding mask."""
    nodes, need = _ancestors(fn, mask)
    args = [a for a in fn.args if id(a) in need]
    leaves = [mask] + [x for n in nodes for x in n.inputs]
    if any(isinstance(x, Param) and not x.name.startswith("folded.") for x in leaves):
        return "mask depends on model weights"
    if len(args) > 2 or any(a.type.rank != 2 or a.type.dtype not in (T.i64, T.i32, T.bool_) for a in args):
        return "mask depends on inputs other than [b, s] positions and a padding mask"
    consts = {int(n.attrs["value"]) for n in nodes if n.op == "constant"
              and isinstance(n.attrs["value"], (int, float)) and 1 < abs(n.attrs["value"]) < PROBE_MAX}
    windows = sorted(consts | {c + 1 for c in consts})
    size = min(max([8] + [2 * w + 2 for w in windows]), PROBE_MAX)
    module = Module("probe")
    module.add_function(Function("probe", args, nodes, [mask]))
    shapes = [tuple(d if isinstance(d, int) else (2 if i == 0 else size) for i, d in enumerate(a.type.shape))
              for a in args]
    batch, seq = shapes[0] if shapes else (1, None)
    roles = {0: [(None, None)], 1: [(0, None), (None, 0)], 2: [(0, 1), (1, 0)]}[len(args)]
    reason = "mask is neither causal nor a causal sliding window over positions"
    for pos_i, pad_i in roles:
        pos = np.arange(seq or 0, dtype=np.int64)[None] + 3 * np.arange(batch, dtype=np.int64)[:, None]
        valid = np.ones_like(pos, dtype=bool)
        valid[-1, : max(1, (seq or 0) // 3)] = False       # left padding in the last row
        inputs = [(pos if i == pos_i else valid).astype(a.type.dtype.storage) for i, a in enumerate(args)]
        try:
            (value,) = interpret(module, inputs)
        except Exception as e:    # a mask we cannot evaluate statically is not ours to fuse
            return f"mask could not be evaluated on probe inputs ({type(e).__name__})"
        if value.dtype != np.bool_ and not np.all((value == 0) | (value <= -1e4)):
            return "additive mask holds values other than 0 and -inf (a bias, not a mask)"
        visible = value if value.dtype == np.bool_ else value == 0
        if visible.ndim != 4 or visible.shape[1] != 1:
            return "mask is not [b, 1, q, k]"
        if seq is None:
            pos = np.arange(visible.shape[2], dtype=np.int64)[None]
        keys = valid[:, None, None, :] if pad_i is not None else True
        visible = np.broadcast_to(visible, (pos.shape[0], 1, pos.shape[1], pos.shape[1]))
        pos_arg = args[pos_i] if pos_i is not None else None
        pad_arg = args[pad_i] if pad_i is not None else None
        if np.array_equal(visible, np.broadcast_to(keys, visible.shape)):
            return MaskInfo(False, 0, pos_arg, pad_arg)
        for w in [0] + windows:
            if np.array_equal(visible, position_mask(pos, pos, True, w) & keys):
                return MaskInfo(True, w, pos_arg, pad_arg)
    return reason


def positions_for(b: Builder, fn: Function, q: Value, given: Value | None) -> Value:
    """The i64[b, s] positions the attention masks by: the traced input, else 0..s-1."""
    if given is not None and given.type.shape == (q.type.shape[0], q.type.shape[2]):
        return given
    batch, seq = q.type.shape[0], q.type.shape[2]
    r = b.emit("arange", [], {"end": seq, "dtype": T.i64}, name="positions")
    r = b.emit("reshape", [r], {"shape": [1, seq]}, name="positions")
    return r if batch == 1 else b.emit("expand", [r], {"shape": [batch, seq]}, name="positions")


# -- repeat_kv ------------------------------------------------------------------------------------
def unrepeat(v: Value) -> Value:
    """k for repeat_kv(k) = reshape(expand(reshape(k, [b,hk,1,s,d]), [b,hk,r,s,d]), [b,hk*r,s,d])."""
    outer = v.producer
    if outer is None or outer.op != "reshape":
        return v
    mid = outer.inputs[0].producer
    if mid is None or mid.op != "expand":
        return v
    inner = mid.inputs[0].producer
    if inner is None or inner.op != "reshape":
        return v
    k = inner.inputs[0]
    b, hk, s, d = k.type.shape if k.type.rank == 4 else (None,) * 4
    if hk is None or inner.outputs[0].type.shape != (b, hk, 1, s, d):
        return v
    exp = mid.outputs[0].type.shape
    if exp[:2] != (b, hk) or exp[3:] != (s, d) or outer.attrs["shape"] != (b, hk * exp[2], s, d):
        return v
    return k


# -- rules ----------------------------------------------------------------------------------------
def _emit_attention(m, b: Builder, fn: Function, q, k, v, scale, info: MaskInfo):
    squeeze = q.type.rank == 3          # single-head [b, s, d] attention gets a head axis
    if squeeze:
        q, k, v = (b.emit("reshape", [t], {"shape": [t.type.shape[0], 1, *t.type.shape[1:]]})
                   for t in (q, k, v))
    inputs = [q, unrepeat(k), unrepeat(v), positions_for(b, fn, q, info.positions)]
    if info.padding is not None:
        pad = info.padding
        inputs.append(pad if pad.type.dtype == T.bool_ else
                      b.emit("ne", [pad, b.emit("constant", [], {"value": 0, "dtype": pad.type.dtype})],
                             name="key_valid"))
    out = b.emit("attention", inputs, {"scale": float(scale), "causal": info.causal, "window": info.window})
    if squeeze:
        out = b.emit("reshape", [out], {"shape": [out.type.shape[0], *out.type.shape[2:]]})
    return out


def sdpa_rule(fn: Function) -> list[Rule]:
    def info(m):
        node = m.root
        if len(node.inputs) == 4:
            if node.attrs["causal"]:
                return "both a mask and causal=true"
            return classify_mask(fn, node.inputs[3])
        return MaskInfo(node.attrs["causal"], 0, None, None)

    def where(m):
        got = info(m)
        if isinstance(got, str):
            return got
        m["mask_info"] = got
        return True

    def build(m, b):
        q, k, v = m.root.inputs[:3]
        scale = m.root.attrs["scale"] or 1.0 / math.sqrt(q.type.shape[-1])
        return _emit_attention(m, b, fn, q, k, v, scale, m.mask_info)

    qkv = (P.var("q"), P.var("k"), P.var("v"))
    return [Rule("sdpa", P.op("sdpa", *qkv, name="root"), build, where),
            Rule("sdpa", P.op("sdpa", *qkv, P.var("mask"), name="root"), build, where)]


def decomposed_rules(fn: Function) -> list[Rule]:
    kt = P.op("permute", P.var("k"), name="kt")
    scores = P.op("matmul", P.var("q"), kt, one_use=True)
    scaled = [(P.op("mul", scores, P.const("c"), one_use=True), lambda c: c),
              (P.op("div", scores, P.const("c"), one_use=True), lambda c: 1.0 / c),
              (scores, lambda c: 1.0)]
    rules = []
    for s, to_scale in scaled:
        variants = [(s, None), (P.op("add", s, P.var("mask"), one_use=True), "mask"),
                    (P.op("where", P.var("mask"), s, P.const("ninf", lambda c: c == -math.inf),
                          one_use=True), "mask")]
        for logits, has_mask in variants:
            def where(m, has_mask=has_mask):
                rank = m.k.type.rank
                perm = list(range(rank))
                perm[-1], perm[-2] = perm[-2], perm[-1]
                if list(m.kt.attrs["perm"]) != perm or rank not in (3, 4):
                    return "scores are not q @ k^T over [.., s, d] tensors"
                if m.sm.attrs["axis"] not in (-1, rank - 1):
                    return "softmax is not over the keys"
                got = classify_mask(fn, m.mask) if has_mask else MaskInfo(False, 0, None, None)
                if isinstance(got, str):
                    return got
                m["mask_info"] = got
                return True

            def build(m, b, to_scale=to_scale):
                return _emit_attention(m, b, fn, m.q, m.k, m.v, to_scale(m.get("c", 1.0)), m.mask_info)
            rules.append(Rule("attention-decomposed",
                              P.op("matmul", P.op("softmax", logits, one_use=True, name="sm"), P.var("v")),
                              build, where))
            # ONNX exports guard the softmax against all-masked rows, where(isnan(p), 0, p):
            # `attention` gives such rows zeros too, so the guard fuses with it
            guarded = P.op("where", P.op("isnan", P.op("softmax", logits, name="sm"), one_use=True),
                           P.const("zero", lambda c: c == 0), P.var("probs"), one_use=True)

            def where_guarded(m, where=where):
                return where(m) if m.probs is m.sm.outputs[0] else "guard reads another tensor"
            rules.append(Rule("attention-decomposed", P.op("matmul", guarded, P.var("v")), build,
                              where_guarded))
    return rules


@register_pass("fuse-attention")
class FuseAttention(RewritePass):
    """sdpa(q, repeat_kv(k), repeat_kv(v), mask) or softmax(q k^T * c + mask) v
    ->  attention(q, k, v, positions) {scale, causal, window}"""

    def run(self, module: Module) -> bool:
        from .pattern import RewriteLog, rewrite
        self.log = RewriteLog()
        changed = False
        for fn in module.functions.values():
            changed |= rewrite(fn, sdpa_rule(fn) + decomposed_rules(fn), self.log)
        return changed
