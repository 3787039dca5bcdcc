"""ONNX -> amxc IR.

Two exports are the ones people bring: `torch.onnx.export(..., dynamo=True)` of a Hugging Face
decoder (ai.onnx ops only, attention decomposed into MatMul/Softmax), and onnxruntime-genai's
model builder (com.microsoft contrib ops: GroupQueryAttention, MatMulNBits, Skip/Simplified
LayerNormalization, RotaryEmbedding, GatherBlockQuantized).  Both become the same IR the
torch.export frontend produces, so the same fusions and kernels serve them.

How the walk works (one pass over the nodes in topological order):
  * every tensor is one of three things: an IR `Value` (computed at run time), a numpy array
    known at import (`Known`: constants and shape arithmetic, whose entries may be symbolic
    dims such as `s`), or a `Lazy` initializer (a weight, read from disk only when the compiled
    model needs it).  Ops whose inputs are all known are evaluated here, so the shape
    subgraphs exporters emit (Shape -> Gather -> Concat -> Reshape) fold into plain attributes;
  * each op's conversion is chosen by the model's opset for its domain (onnx_ops.py);
  * graphs with a KV cache (past_key_values inputs, present outputs) are imported as the
    full-sequence forward with an empty past and an all-ones attention mask; the kv-cache pass
    then builds amxc's own prefill/decode functions from it, as for every other frontend.

Everything read from the file is checked before use: external data must stay inside the model
directory and hold exactly the bytes an initializer's type says; a node must only read values
defined earlier; anything malformed or unsupported is a FrontendError naming the node, the op,
its domain and opset, and the file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from amxc.ir import Builder, Function, Module, Param, TensorType, Value
from amxc.ir import dims as D
from amxc.ir import dtypes as T

from amxc.ir.registry import TypeInferenceError

from .errors import FrontendError, UnsupportedOpError

MIN_OPSET = 17
MAX_KNOWN_ELEMENTS = 1 << 20        # the largest tensor evaluated at import (shape math, masks)
MS_DOMAIN = "com.microsoft"

# ONNX TensorProto element types -> IR dtypes.  Half-precision floats compute in f32 here: the
# runtime's activations are f32, and weights are upcast when loaded.
ONNX_DTYPES = {1: T.f32, 10: T.f32, 16: T.f32, 11: T.f64, 7: T.i64, 6: T.i32, 3: T.i8, 2: T.u8,
               9: T.bool_}
NUMPY_OF = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 3: np.int8,
            2: np.uint8, 9: np.bool_, 4: np.uint16, 5: np.int16, 12: np.uint32, 13: np.uint64}
BF16 = 16


def onnx_dtype(code: int, where: str) -> T.DType:
    try:
        return ONNX_DTYPES[code]
    except KeyError:
        import onnx
        name = onnx.TensorProto.DataType.Name(code) if code in onnx.TensorProto.DataType.values() else code
        raise FrontendError(f"{where}: element type {name} is not supported") from None


@dataclass
class Lazy:
    """A weight not read yet: its IR type and a loader.  `source` names the initializer it came
    from and `key` the views taken of it (transposes compose), so the same matrix reached twice
    (a tied embedding and head, each through its own Transpose) becomes one parameter."""
    type: TensorType
    loader: Callable[[], np.ndarray]
    source: str
    key: tuple = ()

    def __post_init__(self):
        if not self.key:
            self.key = (self.source,)

    def view(self, type_: TensorType, fn: Callable[[np.ndarray], np.ndarray], step: tuple) -> "Lazy":
        key = self.key + (step,)
        if step[0] == "T" and len(self.key) > 1 and self.key[-1][0] == "T":
            perm = tuple(self.key[-1][1][p] for p in step[1])
            key = self.key[:-1] + ((("T", perm),) if perm != tuple(range(len(perm))) else ())
        load = self.loader
        return Lazy(type_, lambda: np.ascontiguousarray(fn(load())), self.source, key)


# -- reading the file ---------------------------------------------------------------------------
def load_proto(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise FrontendError(f"{path}: not a valid ONNX file (truncated or corrupt protobuf: {e})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise FrontendError(f"{path}: cannot read the ONNX model ({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or not proto.graph.output:
        raise FrontendError(f"{path}: the ONNX model has no graph or no graph outputs")
    return proto


def opsets(proto, path: Path) -> dict[str, int]:
    out = {}
    for o in proto.opset_import:
        domain = o.domain or "ai.onnx"
        out["ai.onnx" if domain == "ai.onnx" else domain] = int(o.version)
    got = out.get("ai.onnx")
    if got is None or got < MIN_OPSET:
        raise FrontendError(f"{path}: ai.onnx opset {got} is not supported (amxc imports opset "
                            f"{MIN_OPSET} and later; re-export with opset_version>={MIN_OPSET})")
    return out


class Initializers:
    """The model's initializers as lazy tensors; external data is range-checked against its
    file, which must lie inside the model's directory."""

    def __init__(self, proto, path: Path):
        self.path, self.dir = path, path.parent.resolve()
        self.by_name: dict[str, Lazy] = {}
        for t in proto.graph.initializer:
            self.by_name[t.name] = self._lazy(t)

    def _lazy(self, t) -> Lazy:
        where = f"{self.path}: initializer '{t.name}'"
        if t.data_type not in NUMPY_OF and t.data_type != BF16:
            onnx_dtype(t.data_type, where)      # raises naming the type
        dtype = onnx_dtype(t.data_type, where)
        shape = tuple(int(d) for d in t.dims)
        if any(d < 0 for d in shape):
            raise FrontendError(f"{where}: negative dimension in {list(shape)}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count > 1 << 40:
            raise FrontendError(f"{where}: {count} elements is not a plausible weight")
        np_dtype = np.uint16 if t.data_type == BF16 else np.dtype(NUMPY_OF[t.data_type])
        nbytes = count * np.dtype(np_dtype).itemsize
        if t.data_location == 1:      # EXTERNAL
            raw = self._external(t, nbytes, where)
        else:
            raw = self._internal(t, count, nbytes, where)
        return Lazy(TensorType(dtype, shape), _decoder(raw, t.data_type, np_dtype, shape, dtype), t.name)

    def _internal(self, t, count: int, nbytes: int, where: str):
        if t.HasField("raw_data") or t.raw_data:
            if len(t.raw_data) != nbytes:
                raise FrontendError(f"{where}: holds {len(t.raw_data)} bytes, its type "
                                    f"{list(t.dims)} needs {nbytes}")
            data = t.raw_data
            return lambda: data
        import onnx.numpy_helper as nh
        try:
            arr = nh.to_array(t)
        except Exception as e:      # onnx raises ValueError/TypeError for inconsistent protos
            raise FrontendError(f"{where}: unreadable tensor data ({type(e).__name__}: {e})") from None
        if arr.size != count:
            raise FrontendError(f"{where}: holds {arr.size} values, its type {list(t.dims)} needs {count}")
        return lambda: arr

    def _external(self, t, nbytes: int, where: str):
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise FrontendError(f"{where}: external data location {location!r} must be a file "
                                f"name relative to the model's directory")
        file = (self.dir / location).resolve()
        if not file.is_relative_to(self.dir):
            raise FrontendError(f"{where}: external data {location!r} lies outside {self.dir}")
        if not file.is_file():
            raise FrontendError(f"{where}: external data file {file} is missing")
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", nbytes))
        except ValueError:
            raise FrontendError(f"{where}: external data offset/length are not integers") from None
        size = file.stat().st_size
        if length != nbytes or offset < 0 or offset + length > size:
            raise FrontendError(f"{where}: external data [{offset}, {offset + length}) of {file.name} "
                                f"({size} bytes) does not hold the {nbytes} bytes its type needs")

        def read():
            with open(file, "rb") as f:
                f.seek(offset)
                data = f.read(nbytes)
            if len(data) != nbytes:
                raise FrontendError(f"{where}: {file.name} changed while reading")
            return data
        return read


def _decoder(raw: Callable, code: int, np_dtype, shape, dtype: T.DType):
    def load():
        data = raw()
        if isinstance(data, np.ndarray):
            arr = data
        else:
            arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
        if code == BF16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(arr.astype(dtype.storage, copy=False))
    return load


# -- naming -------------------------------------------------------------------------------------
def clean_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_.")
    return name or "w"


def node_loc(node) -> str:
    """'node NAME (OpType)' plus the torch module path when the exporter recorded it."""
    scope = _scopes(node)
    name = _text(node.name)
    where = f"node '{name}' ({_text(node.op_type)})" if name else f"a {_text(node.op_type)} node"
    if len(scope) >= 2:
        return f"{where} [{scope[-2]}]"
    if name.startswith("/") and name.count("/") > 1:      # builder: /model/layers.0/attn/X
        return f"{where} [{'.'.join(p for p in name.split('/')[1:-1] if p)}]"
    return where


def _text(v) -> str:
    """A protobuf string field as text (a corrupt file can hold bytes that are not UTF-8)."""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return re.findall(r"'([^']*)'", p.value)
    return []


def weight_name(node, lazy: Lazy) -> str:
    """A readable parameter name: the initializer's, unless the exporter made one up (`val_12`,
    a folded transpose), where the torch module path of the reading node tells what it is."""
    if re.fullmatch(r"(val|_val|const|onnx::\w+)_?\d*", lazy.source) or lazy.source.startswith("onnx::"):
        scope = _scopes(node)
        if len(scope) >= 2 and scope[-2]:
            return clean_name(scope[-2] + ".weight")
    return clean_name(lazy.source)


# -- the conversion -----------------------------------------------------------------------------
class OnnxConverter:
    """State of one import: the IR function being built, the name -> tensor environment and the
    facts the contrib ops reveal (heads, rope tables) for the module's attributes."""

    def __init__(self, proto, path: Path, model_name: str):
        self.proto, self.path, self.model = proto, path, model_name
        self.opset = opsets(proto, path)
        self.inits = Initializers(proto, path)
        self.module = Module(model_name)
        self.fn = Function("forward", [])
        self.module.add_function(self.fn)
        self.b = Builder(self.fn)
        self.env: dict[str, object] = {}
        self.params: dict[tuple, Param] = {}
        self.facts: dict = {}
        self.node = None
        self.dims: dict[str, D.Dim] = {}

    # -- helpers the op table uses ------------------------------------------------------------
    def where(self) -> str:
        return f"{self.path.name}: {node_loc(self.node)}" if self.node is not None else str(self.path)

    def fail(self, msg: str):
        raise FrontendError(f"{self.where()}: {msg}")

    def emit(self, op: str, inputs, attrs: dict | None = None, name: str | None = None):
        base = name or (clean_name(self.node.output[0]) if self.node is not None and self.node.output
                        else op)
        return self.b.emit(op, list(inputs), attrs, name=base[:48] or op, loc=node_loc(self.node))

    def param(self, lazy: Lazy, name: str | None = None, key=None) -> Param:
        key = key or ("lazy",) + lazy.key
        p = self.params.get(key)
        if p is None:
            base = name or weight_name(self.node, lazy)
            pname, i = base, 1
            while pname in self.module.params:
                pname, i = f"{base}.{i}", i + 1
            p = Param(pname, lazy.type, loader=lazy.loader)
            self.module.add_param(p)
            self.params[key] = p
        return p

    def value(self, x, dtype: T.DType | None = None) -> Value:
        """x as an IR value: a Lazy becomes a parameter, a known array a constant."""
        if isinstance(x, Value):
            return x
        if isinstance(x, Lazy):
            return self.param(x)
        arr = np.asarray(x)
        if arr.dtype == object:
            return self._symbolic_value(arr)
        dt = dtype or dtype_of_array(arr, self.where())
        if arr.ndim == 0:
            v = arr.item()
            v = float(v) if dt.is_float else (bool(v) if dt == T.bool_ else int(v))
            return self.emit("constant", [], {"value": v, "dtype": dt}, name="c")
        flat = arr.reshape(-1)
        if flat.size and (flat == flat[0]).all():
            v = flat[0].item()
            return self.emit("full", [], {"shape": list(arr.shape), "dtype": dt,
                                          "value": float(v) if dt.is_float else (bool(v) if dt == T.bool_ else int(v))},
                             name="c")
        key = ("const", arr.dtype.str, arr.shape, arr.tobytes())
        p = self.params.get(key)
        if p is None:
            p = Param(f"const.{len(self.params)}", TensorType(dt, arr.shape))
            p.set_data(np.ascontiguousarray(arr.astype(dt.storage)))
            self.module.add_param(p)
            self.params[key] = p
        return p

    def _symbolic_value(self, arr: np.ndarray) -> Value:
        """Shape arithmetic needed at run time (a symbolic size used as data): one i64 per dim."""
        parts = []
        for d in arr.reshape(-1):
            r = self.emit("arange", [], {"start": d, "end": D.binary("+", d, 1), "dtype": T.i64}, name="size")
            parts.append(r)
        v = parts[0] if len(parts) == 1 else self.emit("concat", parts, {"axis": 0}, name="sizes")
        return self.emit("reshape", [v], {"shape": list(arr.shape)}, name="sizes")

    def known(self, x, what: str = "input") -> np.ndarray:
        """x's value at import time, or a clear error when it is only known at run time."""
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, Lazy):
            if int(np.prod(x.type.shape, dtype=np.int64)) > MAX_KNOWN_ELEMENTS:
                self.fail(f"{what} is a {x.type} weight where a small constant is expected")
            return x.loader()
        self.fail(f"{what} must be known when the model is compiled (it is computed at run time)")

    def is_known(self, x) -> bool:
        return isinstance(x, np.ndarray) or (
            isinstance(x, Lazy) and int(np.prod(x.type.shape, dtype=np.int64)) <= 4096)

    def type_of(self, x) -> TensorType:
        if isinstance(x, (Value, Lazy)):
            return x.type
        arr = np.asarray(x)
        return TensorType(dtype_of_array(arr, self.where()), tuple(arr.shape))

    def check_size(self, shape) -> None:
        n = 1
        for d in shape:
            if not isinstance(d, int):
                return
            n *= d
        if n > MAX_KNOWN_ELEMENTS:
            self.fail(f"a constant of shape {list(shape)} ({n} elements) is too large to evaluate "
                      f"at import (limit {MAX_KNOWN_ELEMENTS})")

    # -- inputs -------------------------------------------------------------------------------
    def bind_inputs(self) -> None:
        graph = self.proto.graph
        inputs = {i.name: i for i in graph.input if i.name not in self.inits.by_name}
        ids = inputs.get("input_ids")
        if ids is None:
            raise FrontendError(f"{self.path}: the graph has no 'input_ids' input (inputs: "
                                f"{', '.join(inputs) or 'none'}); amxc imports decoder LLMs that take token ids")
        dims = _dims_of(ids, self.path)
        if len(dims) != 2:
            raise FrontendError(f"{self.path}: input_ids must be [batch, sequence], got {len(dims)} dims")
        for d, name in zip(dims, ("b", "s")):
            if isinstance(d, str):
                self.dims[d] = D.Sym.var(name)
        b, s = D.Sym.var("b"), D.Sym.var("s")
        args = [Value("input_ids", TensorType(T.i64, (b, s))), Value("position_ids", TensorType(T.i64, (b, s)))]
        for a in args:
            self.fn.args.append(a)
            self.b.reserve(a.name)
        self.env["input_ids"] = args[0]
        self.facts["positions"] = args[1]
        mask_dims = []
        for name, info in inputs.items():
            if name == "input_ids":
                continue
            elem = info.type.tensor_type.elem_type
            shape = _dims_of(info, self.path)
            if name == "position_ids":
                if len(shape) != 2:
                    raise FrontendError(f"{self.path}: position_ids must be [batch, sequence]")
                self.env[name] = args[1] if elem == 7 else self.emit("cast", [args[1]], {"dtype": onnx_dtype(elem, name)})
            elif name == "attention_mask":
                if len(shape) != 2:
                    raise FrontendError(f"{self.path}: attention_mask must be [batch, total sequence]")
                mask_dims.append(shape[1])
                dt = onnx_dtype(elem, f"{self.path}: input {name}")
                self.env[name] = self.b.emit("full", [], {"shape": [b, s], "value": 1 if dt != T.bool_ else True,
                                                          "dtype": dt}, name="attention_mask",
                                             loc="attention_mask (all tokens real)")
            elif re.search(r"past", name) and len(shape) == 4:
                self.facts.setdefault("past", []).append(name)
                for d in shape[2:3]:
                    if isinstance(d, str):
                        self.dims[d] = 0
            else:
                raise FrontendError(f"{self.path}: graph input '{name}' is not one amxc can feed (it "
                                    f"feeds input_ids, position_ids, attention_mask and past key/values)")
        if "position_ids" not in inputs and not any(n.op_type == "GroupQueryAttention" for n in graph.node):
            # positions derived from the graph's own length or mask would restart at 0 in every
            # decode step over amxc's cache
            raise FrontendError(f"{self.path}: the graph derives token positions from its input length "
                                f"or attention mask; amxc needs them as an input (export with "
                                f"position_ids) or implied by GroupQueryAttention")
        for d in mask_dims:            # the total length of an empty past is the new tokens'
            if isinstance(d, str) and d not in self.dims:
                self.dims[d] = s
        for name in self.facts.get("past", []):
            shape = [self._dim(d) for d in _dims_of(inputs[name], self.path)]
            shape[2] = 0
            dt = onnx_dtype(inputs[name].type.tensor_type.elem_type, f"{self.path}: input {name}")
            self.env[name] = self.b.emit("full", [], {"shape": shape, "value": 0.0, "dtype": dt},
                                         name="past", loc=f"{name} (empty: amxc keeps its own KV cache)")

    def _dim(self, d):
        if isinstance(d, int):
            return d
        if d in self.dims:
            return self.dims[d]
        sym = D.Sym.var(clean_name(d))
        self.dims[d] = sym
        return sym

    # -- the walk -----------------------------------------------------------------------------
    def _read(self, name: str):
        """An environment entry; small integer initializers and scalars are read as known
        values (shape arithmetic, eps, scales), larger float ones stay lazy weights."""
        x = self.env[name]
        if isinstance(x, Lazy):
            n = int(np.prod(x.type.shape, dtype=np.int64))
            if n == 1 and x.type.rank <= 1 or (x.type.dtype in (T.i64, T.i32, T.bool_) and n <= 4096):
                x = self.env[name] = x.loader()
        return x

    def convert(self) -> Module:
        from .onnx_ops import check_arity, conversion_for

        graph = self.proto.graph
        for name, lazy in self.inits.by_name.items():
            self.env[name] = lazy
        self.bind_inputs()
        for node in topological(graph, set(self.env), self.path):
            self.node = node
            domain = node.domain or "ai.onnx"
            handler = conversion_for(domain, node.op_type, self.opset.get(domain))
            if handler is None:
                raise UnsupportedOpError(
                    f"{node.op_type} (domain {domain}, opset {self.opset.get(domain, 'not imported')})",
                    f"node '{node.name}'", str(self.path), table="frontend/onnx_ops.py") from None
            wrong = check_arity(node)
            if wrong:
                self.fail(wrong)
            ins = [self._read(i) if i else None for i in node.input]
            attrs = attributes(node, self)
            try:
                out = handler(self, ins, attrs)
            except FrontendError as e:
                if str(e).startswith(self.path.name):
                    raise
                raise FrontendError(f"{self.where()}: {e}") from None
            except TypeInferenceError as e:      # operands the op cannot take
                raise FrontendError(f"{self.where()}: invalid operands: {e}") from None
            except Exception as e:   # numpy failures on hostile graphs
                raise FrontendError(f"{self.where()}: cannot convert ({type(e).__name__}: {e})") from None
            outs = out if isinstance(out, (list, tuple)) else [out]
            for name, v in zip(node.output, outs):
                if name:
                    self.env[name] = v
        self.node = None
        out_name = graph.output[0].name
        result = self.env.get(out_name)
        if result is None:
            raise FrontendError(f"{self.path}: graph output '{out_name}' is never computed")
        self.fn.results = [self.value(result)]
        self._drop_dead()
        return self.module


    def _drop_dead(self) -> None:
        """Remove what the logits do not need: present key/value outputs, the empty past, the
        attention-mask arithmetic only the cache bookkeeping read."""
        live = {id(v) for v in self.fn.results}
        kept = []
        for n in reversed(self.fn.nodes):
            if any(id(o) in live for o in n.outputs):
                kept.append(n)
                live.update(id(v) for v in n.inputs)
        self.fn.nodes = kept[::-1]
        self.module.drop_unused_params()


def _dims_of(info, path) -> list:
    t = info.type.tensor_type
    if not info.type.HasField("tensor_type"):
        raise FrontendError(f"{path}: graph input '{info.name}' is not a tensor")
    return [d.dim_param if d.HasField("dim_param") or not d.HasField("dim_value") else int(d.dim_value)
            for d in t.shape.dim]


def dtype_of_array(arr: np.ndarray, where: str) -> T.DType:
    if arr.dtype == object:
        return T.i64
    for dt in (T.f32, T.f64, T.i64, T.i32, T.i8, T.u8, T.bool_):
        if arr.dtype == dt.storage:
            return dt
    if arr.dtype == np.float16:
        return T.f32
    raise FrontendError(f"{where}: numpy type {arr.dtype} is not supported")


def topological(graph, defined: set[str], path: Path) -> list:
    """The graph's nodes in an order where each reads only values defined before it; a dangling
    input or a cycle is an error naming the node."""
    produced = {o: n for n in graph.node for o in n.output if o}
    for n in graph.node:
        for i in n.input:
            if i and i not in defined and i not in produced:
                raise FrontendError(f"{path}: {node_loc(n)} reads '{i}', which no node, input or "
                                    f"initializer defines")
    order, done = [], set(defined)
    pending = list(graph.node)
    while pending:
        rest = []
        for n in pending:
            if all(not i or i in done for i in n.input):
                order.append(n)
                done.update(o for o in n.output if o)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise FrontendError(f"{path}: the graph has a cycle through {node_loc(rest[0])}")
        pending = rest
    return order


def attributes(node, conv: OnnxConverter) -> dict:
    import onnx
    out = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            conv.fail(f"attribute '{a.name}' holds a subgraph (control flow is not supported)")
        if a.ref_attr_name:
            conv.fail(f"attribute '{a.name}' refers to a function attribute")
        try:
            v = onnx.helper.get_attribute_value(a)
        except Exception as e:
            conv.fail(f"attribute '{a.name}' is malformed ({type(e).__name__})")
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[a.name] = v
    return out


# -- the model directory ------------------------------------------------------------------------
def model_attrs(path: Path, module: Module, facts: dict) -> dict:
    """The facts the runtime needs (vocab, context, eos, heads), from config.json or
    genai_config.json beside the model when present, else from the graph."""
    attrs: dict = {"source": path.name, "family": "onnx"}
    for cfg_name in ("config.json", "genai_config.json"):
        cfg = _read_json(path.parent / cfg_name)
        if cfg_name == "genai_config.json" and cfg:
            model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
            dec = model.get("decoder", {}) if isinstance(model.get("decoder"), dict) else {}
            cfg = {"model_type": model.get("type"), "vocab_size": model.get("vocab_size"),
                   "max_position_embeddings": model.get("context_length"),
                   "eos_token_id": model.get("eos_token_id"), "bos_token_id": model.get("bos_token_id"),
                   "num_hidden_layers": dec.get("num_hidden_layers"),
                   "num_attention_heads": dec.get("num_attention_heads"),
                   "num_key_value_heads": dec.get("num_key_value_heads"),
                   "hidden_size": dec.get("hidden_size"), "head_dim": dec.get("head_size")}
        for key, ours in (("model_type", "family"), ("vocab_size", "vocab_size"),
                          ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
                          ("num_attention_heads", "num_heads"), ("num_key_value_heads", "num_kv_heads"),
                          ("head_dim", "head_dim"), ("max_position_embeddings", "max_position_embeddings"),
                          ("n_positions", "max_position_embeddings"),
                          ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("tie_word_embeddings", "tie_word_embeddings")):
            v = cfg.get(key) if cfg else None
            if isinstance(v, (int, str, bool)) or (isinstance(v, list) and all(isinstance(x, int) for x in v)):
                if ours not in attrs or attrs[ours] in (None, "onnx"):
                    attrs[ours] = v
    if isinstance(attrs.get("eos_token_id"), list) and attrs["eos_token_id"]:
        attrs["eos_token_id"] = attrs["eos_token_id"][0]
    fn = module.functions["forward"]
    attrs.setdefault("vocab_size", fn.results[0].type.shape[-1])
    layers = {int(m.group(1)) for n in fn.nodes for m in [_LAYER.search(n.loc or "")] if m}
    if layers and "num_layers" not in attrs:
        attrs["num_layers"] = max(layers) + 1
    positions = fn.args[1]
    if not facts.get("rope") and any(n.op == "embedding" and n.inputs[1] is positions for n in fn.nodes):
        attrs.setdefault("position_encoding", "learned")      # GPT-2's position table, no RoPE
    if "rope_rows" in facts:
        attrs["max_position_embeddings"] = min(int(attrs.get("max_position_embeddings") or facts["rope_rows"]),
                                               facts["rope_rows"])
    for k in ("num_heads", "num_kv_heads", "head_dim"):
        if k in facts:
            attrs.setdefault(k, facts[k])
    attrs["source_format"] = "onnx"
    return {k: v for k, v in attrs.items() if v is not None}


_LAYER = re.compile(r"(?:^|[.\[/])(?:layers|h|blocks?)[./](\d+)(?:[./\]]|$)")


def _read_json(path: Path) -> dict:
    if not path.is_file() or path.stat().st_size > 1 << 22:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FrontendError(f"{path}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def import_onnx(path: str | os.PathLike) -> Module:
    """Import an .onnx file (with its external data and the config/tokenizer files beside it)."""
    path = Path(path)
    if path.is_dir():
        path = find_model_file(path)
    proto = load_proto(path)
    name = clean_name(path.parent.name if path.stem == "model" else path.stem)
    try:
        conv = OnnxConverter(proto, path, name)
        module = conv.convert()
        module.attrs.update(model_attrs(path, module, conv.facts))
    except FrontendError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        # a malformed graph outside any one node (inputs, outputs, value infos): say so plainly
        raise FrontendError(f"{path}: malformed ONNX model ({type(e).__name__}: {e})") from None
    return module


def find_model_file(model_dir: Path) -> Path:
    """The .onnx file of a directory: genai_config.json's decoder filename, else the only one."""
    cfg = _read_json(model_dir / "genai_config.json")
    filename = (((cfg.get("model") or {}).get("decoder") or {}).get("filename")
                if isinstance(cfg.get("model"), dict) else None)
    if isinstance(filename, str) and filename:
        f = (model_dir / filename).resolve()
        if not f.is_relative_to(model_dir.resolve()) or not f.is_file():
            raise FrontendError(f"{model_dir / 'genai_config.json'}: decoder filename {filename!r} "
                                f"is not a file in {model_dir}")
        return f
    found = sorted(model_dir.glob("*.onnx"))
    if len(found) != 1:
        raise FrontendError(f"{model_dir}: expected one .onnx file, found {len(found)}")
    return found[0]
