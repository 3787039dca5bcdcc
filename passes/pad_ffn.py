"""pad-ffn: widen each fused feed-forward block's hidden layer with zero units, up to a multiple
of `multiple`, so its down projection's input fits whole quantization blocks.

NF4 and q8 store blocks of 64 inputs along each weight row, and the int8 activation blocks run
over 64 inputs too (ir/formats), so quantize-nf4 and quantize-int8 leave in float32 a weight
whose input size is not a multiple of 64.  In a feed-forward block that is the down projection
whenever the hidden width is not: stories260K's 172-wide MLP kept 3 of every layer's 7 matrices
at 4 bytes a weight (1.37 bytes per layer weight for the whole NF4 model, against 0.91 for
llama.cpp's IQ4_NL, which keeps them in F16).  Padded to 192, they are NF4 too.

A padding unit reads zero rows of gate/up (fc, and a zero bias) and writes through a zero column
of down (proj): whatever it computes, it adds exact zeros, so the function is unchanged
(products in the padded columns are +-0; only a BLAS's summation order may differ, at float32
rounding).  Quantization keeps zeros exact: a zero weight is an NF4 and a q8 code, and an
all-zero block has scale 0.  Each padded parameter records its true shape (`padded_from`), so
counts of parameters and bytes per parameter leave the padding out.

Run before shard-tp (which then splits the padded width into whole blocks per rank) and before
quantization; `amxc compile --quant ...` places it there.  Blocks whose weights are read by
anything but the same position of the same fused op (e.g. a weight shared with another layer in
another role) are left as they are, and `skipped` says why.
"""
from __future__ import annotations

import numpy as np

from amxc.ir import Module, Param
from amxc.ir.dtypes import f32
from amxc.ir.transform import replace_param, weight_uses

from .base import Option, Pass, PassError, register_pass

#: op -> (inputs whose rows are hidden units, inputs whose columns are hidden units)
#: (weights [out, in] as linear reads them; a bias of the hidden layer is "rows" of rank 1)
_HIDDEN = {"mlp_swiglu": ((1, 2), (3,)),      # gate, up | down
           "mlp_gelu": ((1, 3), (2,))}        # fc, fc's bias | proj


@register_pass("pad-ffn")
class PadFFN(Pass):
    options = {"multiple": Option(int, 64, "pad each fused MLP's hidden width up to a multiple of this "
                                           "(the quantization block)")}

    def run(self, module: Module) -> bool:
        multiple = self.opts["multiple"]
        if multiple < 1:
            raise PassError(f"pad-ffn: multiple={multiple} is not positive")
        if module.attrs.get("tp", 1) > 1:
            raise PassError("pad-ffn: the module is already sharded for tensor parallelism; pad before "
                            "shard-tp (amxc compile places pad-ffn there)")
        self.padded: dict[str, tuple[int, int]] = {}     # weight -> (hidden width, padded width)
        self.skipped: dict[str, str] = {}                 # "%out = op" -> why not
        uses = weight_uses(module)
        for fn in module.functions.values():
            for node in fn.nodes:
                if node.op not in _HIDDEN:
                    continue
                rows, cols = _HIDDEN[node.op]
                hidden = node.inputs[cols[0]].type.shape[-1]
                if hidden % multiple == 0:      # fits (or padded already, at its prefill use)
                    continue
                why = _why_not(module, node, uses)
                if why:
                    self.skipped[f"%{node.outputs[0].name} = {node.op}"] = why
                    continue
                width = -(-hidden // multiple) * multiple
                for i in rows + cols:
                    if i < len(node.inputs):
                        _pad(module, node.inputs[i], width - hidden, axis=0 if i in rows else 1)
                        self.padded[node.inputs[i].name] = (hidden, width)
        return bool(self.padded)


def _why_not(module: Module, node, uses: dict) -> str | None:
    """Why `node`'s hidden layer cannot be padded, or None: every weight and bias must be a
    float32 parameter read only at this position of this op (prefill and decode may each read it)."""
    rows, cols = _HIDDEN[node.op]
    for i in rows + cols:
        if i >= len(node.inputs):
            continue
        v = node.inputs[i]
        if not isinstance(v, Param):
            return f"{node.op} operand {i} is computed, not a parameter"
        if v.type.dtype != f32 or not v.type.is_static():
            return f"@{v.name} is {v.type}, not a static float32 tensor"
        other = next(((n.op, j) for n, j in uses[v.name] if n.op != node.op or j != i), None)
        if other:
            return f"@{v.name} is also read by {other[0]} (operand {other[1]})"
    return None


def _pad(module: Module, p: Param, extra: int, axis: int) -> None:
    """Replace `p` by itself with `extra` zero rows (axis 0) or columns (axis 1) appended."""
    shape = list(p.type.shape)
    widths = [(0, 0)] * len(shape)
    widths[axis] = (0, extra)
    shape[axis] += extra
    attrs = {**p.attrs, "padded_from": p.attrs.get("padded_from", list(p.type.shape))}
    new = p.derive(p.name, p.type.with_shape(shape),
                   lambda w: np.pad(w, widths), attrs=attrs)
    replace_param(module, p, new)


def true_numel(p: Param) -> int:
    """A parameter's element count without pad-ffn's padding.  `padded_from` comes from IR text a
    user may hand in: a value that is not a shape within the type's (ints, same rank, no larger)
    is ignored rather than trusted."""
    shape, was = p.type.shape, p.attrs.get("padded_from")
    if isinstance(was, (list, tuple)) and len(was) == len(shape) and all(
            isinstance(w, int) and not isinstance(w, bool) and isinstance(d, int) and 0 <= w <= d
            for w, d in zip(was, shape)):
        return int(np.prod(was, dtype=np.int64))
    return p.type.numel()
