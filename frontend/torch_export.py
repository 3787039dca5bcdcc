"""torch.export ExportedProgram -> amxc IR.

Walks the ATen graph once.  Tensor nodes become IR nodes through the conversion table in
`aten.py`; SymInt nodes (sym_size and its arithmetic) become symbolic dims, not IR values, so
shapes stay readable (`f32[b, s, 64]`).  Every converted value is checked against the exporter's
own shape/dtype metadata, so a conversion bug is caught at its node with the model source line.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable

import numpy as np
import sympy
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils._sympy.functions import FloorDiv

from amxc.ir import Builder, Function, Module, Param, TensorType, Value
from amxc.ir import dims as D
from amxc.ir import dtypes as T

from .errors import FrontendError, UnsupportedOpError

TORCH_DTYPES = {torch.float32: T.f32, torch.float16: T.f16, torch.bfloat16: T.bf16,
                torch.float64: T.f64, torch.int64: T.i64, torch.int32: T.i32, torch.int8: T.i8,
                torch.uint8: T.u8, torch.bool: T.bool_}


def ir_dtype(dt: torch.dtype, where: str = "") -> T.DType:
    try:
        return TORCH_DTYPES[dt]
    except KeyError:
        raise FrontendError(f"dtype {dt} is not supported{where}") from None


def source_location(node: torch.fx.Node) -> str | None:
    """'module.path (file.py:line)' for the innermost model frame of the node's stack."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    for key, (qualname, _) in stack.items():
        if not key.startswith("_empty"):
            path = qualname
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    model_frames = [(f, ln) for f, ln in frames if "/torch/" not in f.replace("\\", "/")]
    line = ""
    if model_frames:
        f, ln = model_frames[-1]
        line = f"{f.replace(chr(92), '/').rsplit('/', 1)[-1]}:{ln}"
    if path and line:
        return f"{path} ({line})"
    return path or line or None


class Converter:
    """State of one conversion: the IR function being built and the fx-node -> IR mapping."""

    def __init__(self, ep: ExportedProgram, model_name: str, dim_names: dict[str, dict[int, str]]):
        self.ep = ep
        self.model = model_name
        self.module = Module(model_name)
        self.fn = Function("forward", [])
        self.module.add_function(self.fn)
        self.b = Builder(self.fn)
        self.env: dict[torch.fx.Node, Any] = {}
        self.symbols: dict[sympy.Symbol, str] = {}
        self.dim_names = dim_names
        self.node: torch.fx.Node | None = None

    # -- symbolic sizes ------------------------------------------------------------------------
    def dim(self, v) -> D.Dim:
        """An int, SymInt or sympy expression as an IR dim."""
        if isinstance(v, torch.SymInt):
            v = v.node.expr
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, sympy.Integer):
            return int(v)
        if isinstance(v, sympy.Symbol):
            if v not in self.symbols:
                raise FrontendError(f"size {v} does not come from a model input")
            return D.Sym.var(self.symbols[v])
        if isinstance(v, (sympy.Add, sympy.Mul)):
            op = "+" if isinstance(v, sympy.Add) else "*"
            parts = [self.dim(a) for a in v.args]
            out = parts[0]
            for p in parts[1:]:
                out = D.binary(op, out, p)
            return out
        if isinstance(v, FloorDiv):
            return D.binary("//", self.dim(v.args[0]), self.dim(v.args[1]))
        if isinstance(v, sympy.Pow) and v.args[1].is_Integer and int(v.args[1]) > 0:
            base, out = self.dim(v.args[0]), self.dim(v.args[0])
            for _ in range(int(v.args[1]) - 1):
                out = D.binary("*", out, base)
            return out
        raise FrontendError(f"size expression {v} is not supported"
                            + (f" at {source_location(self.node)}" if self.node is not None else ""))

    def tensor_type(self, val, where: str = "") -> TensorType:
        if not isinstance(val, torch.Tensor):
            raise FrontendError(f"expected a tensor{where}, got {type(val).__name__}")
        return TensorType(ir_dtype(val.dtype, where), tuple(self.dim(d) for d in val.shape))

    def out_type(self, node: torch.fx.Node | None = None, index: int | None = None) -> TensorType:
        node = node or self.node
        val = node.meta["val"]
        if index is not None:
            val = val[index]
        return self.tensor_type(val, f" at {source_location(node)}")

    # -- IR emission helpers for the conversion table -----------------------------------------
    def emit(self, op: str, inputs, attrs: dict | None = None, name: str | None = None):
        return self.b.emit(op, list(inputs), attrs, name=name or self.node.name,
                           loc=source_location(self.node))

    def const(self, value, dtype: T.DType) -> Value:
        if dtype.is_float:
            value = float(value)
        elif dtype == T.bool_:
            value = bool(value)
        else:
            value = int(value)
        return self.emit("constant", [], {"value": value, "dtype": dtype}, name="c")

    def cast(self, v: Value, dtype: T.DType) -> Value:
        return v if v.type.dtype == dtype else self.emit("cast", [v], {"dtype": dtype}, name="cast")

    def as_tensor(self, v, dtype: T.DType) -> Value:
        """A python scalar as a constant of `dtype`, or a tensor cast to it."""
        return self.cast(v, dtype) if isinstance(v, Value) else self.const(v, dtype)

    # -- the walk ------------------------------------------------------------------------------
    def lift_inputs(self, param_data: Callable[[str, InputKind], Callable[[], np.ndarray] | None]):
        sig = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        for node in self.ep.graph.nodes:
            if node.op != "placeholder":
                continue
            spec = sig[node.name]
            val = node.meta.get("val")
            if spec.kind == InputKind.USER_INPUT:
                if not isinstance(val, torch.Tensor):
                    continue                      # constant flags such as use_cache=False
                names = self.dim_names.get(node.name, {})
                for axis, d in enumerate(val.shape):
                    expr = d.node.expr if isinstance(d, torch.SymInt) else None
                    if isinstance(expr, sympy.Symbol) and expr not in self.symbols:
                        self.symbols[expr] = names.get(axis, f"{node.name}_{axis}")
                arg = Value(node.name, self.tensor_type(val, f" for input {node.name}"))
                self.fn.args.append(arg)
                self.b.reserve(arg.name)
                self.env[node] = arg
            else:
                p = Param(spec.target, self.tensor_type(val, f" for {spec.target}"),
                          loader=param_data(spec.target, spec.kind))
                self.env[node] = p      # added to the module only if used (see finish)

    def lookup(self, a):
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.lookup(x) for x in a)
        return a

    def convert(self, table: dict) -> Module:
        for node in self.ep.graph.nodes:
            if node.op in ("placeholder",):
                continue
            self.node = node
            if node.op == "output":
                outs = [self.env[a] for a in node.args[0] if a is not None]
                self.fn.results = [o for o in outs if isinstance(o, Value)]
                continue
            val = node.meta.get("val")
            if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
                self.env[node] = self.dim(val)     # shape arithmetic stays symbolic
                continue
            if node.target is operator.getitem:
                self.env[node] = self.lookup(node.args[0])[node.args[1]]
                continue
            handler = table.get(node.target)
            if handler is None:
                raise UnsupportedOpError(str(node.target), source_location(node), self.model)
            args, kwargs = self.lookup(node.args), self.lookup(node.kwargs)
            out = handler(self, *args, **kwargs)
            if out is None:
                continue
            self.env[node] = out
            self.check(node, out)
        return self.finish()

    def check(self, node, out):
        vals = out if isinstance(out, (list, tuple)) else [out]
        metas = node.meta["val"] if isinstance(out, (list, tuple)) else [node.meta["val"]]
        for v, meta in zip(vals, metas):
            want = self.tensor_type(meta)
            if v.type != want:
                raise FrontendError(f"internal: {node.target} at {source_location(node)} converted to "
                                    f"{v.type}, exporter says {want}")

    def finish(self) -> Module:
        used = {id(v): v for n in self.fn.nodes for v in n.inputs if isinstance(v, Param)}
        for p in sorted(used.values(), key=lambda p: p.name):
            self.module.add_param(p)
        return self.module


def import_exported_program(ep: ExportedProgram, name: str, *, table: dict | None = None,
                            dim_names: dict[str, dict[int, str]] | None = None,
                            param_data: Callable | None = None) -> Module:
    """Convert `ep` into an IR module with one function @forward.

    `dim_names` names the symbolic sizes by input and axis ({"input_ids": {0: "b", 1: "s"}});
    `param_data(target, kind)` returns a zero-argument loader for each parameter/buffer/constant
    (defaults to the tensors stored in the ExportedProgram)."""
    from .aten import ATEN_TABLE

    conv = Converter(ep, name, dim_names or {})
    conv.lift_inputs(param_data or _program_tensors(ep))
    return conv.convert(table or ATEN_TABLE)


def _program_tensors(ep: ExportedProgram):
    def loader_for(target: str, kind):
        t = ep.constants.get(target) if kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ) \
            else ep.state_dict.get(target)
        if t is None:
            t = ep.constants.get(target)
        if t is None or t.device.type == "meta":
            return None
        return lambda: tensor_to_numpy(t)
    return loader_for


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detached, contiguous numpy copy; floats other than f64/f16 become f32 storage types."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return np.ascontiguousarray(t.cpu().numpy())
