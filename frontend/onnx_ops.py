"""The ONNX -> IR conversion table: ai.onnx (opset 17 and later) here, and the com.microsoft
contrib ops of onnxruntime-genai's model builder in onnx_contrib.py (same table).

An entry is `(conv, inputs, attrs) -> outputs`; `@converts(op, since=N)` registers it for opsets
from N on, and the model's opset for the op's domain picks the newest entry not above it (TVM's
converter registry works the same way), so a signature change between opsets (axes as an
attribute, then as an input) is two small functions, not a branch on the version.

Inputs are IR Values, numpy arrays known at import (constants and shape arithmetic, possibly
holding symbolic dims) or Lazy initializers.  An op whose inputs are all known is evaluated
with numpy right here, which is how exporters' shape subgraphs fold away.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from amxc.ir import Value
from amxc.ir import dims as D
from amxc.ir import dtypes as T

from .errors import FrontendError
from .onnx import MS_DOMAIN, Lazy, OnnxConverter, onnx_dtype

_TABLE: dict[tuple[str, str], list[tuple[int, object]]] = defaultdict(list)
INT64_MAX = 2 ** 63 - 1
_UNARY_NAMES = ("Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Tanh", "Sigmoid", "Relu", "Abs",
                "IsNaN")


def converts(*ops: str, since: int = 1, domain: str = "ai.onnx"):
    def wrap(fn):
        for op in ops:
            _TABLE[(domain, op)].append((since, fn))
            _TABLE[(domain, op)].sort(key=lambda e: e[0])
        return fn
    return wrap


#: (required, most) inputs per op; checked before conversion so a graph missing an input gets
#: "needs 2 inputs" rather than an index error deep inside a converter
ARITY = {
    "Constant": (0, 0), "Identity": (1, 1), "Cast": (1, 1), "CastLike": (2, 2), "Shape": (1, 1),
    "Size": (1, 1), "Reshape": (2, 2), "Flatten": (1, 1), "Unsqueeze": (2, 2), "Squeeze": (1, 2),
    "Transpose": (1, 1), "Concat": (1, 1 << 16), "Slice": (3, 5), "Split": (1, 2), "Expand": (2, 2),
    "Range": (3, 3), "ConstantOfShape": (1, 1), "Gather": (2, 2), "GatherND": (2, 2),
    "Add": (2, 2), "Sub": (2, 2), "Mul": (2, 2), "Div": (2, 2), "Pow": (2, 2), "Max": (1, 1 << 16),
    "Min": (1, 1 << 16), "Equal": (2, 2), "Less": (2, 2), "LessOrEqual": (2, 2), "Greater": (2, 2),
    "GreaterOrEqual": (2, 2), "And": (2, 2), "Or": (2, 2), "Not": (1, 1), "Where": (3, 3),
    "Gelu": (1, 1), "Softmax": (1, 1), "ReduceMean": (1, 2), "ReduceMax": (1, 2), "ReduceSum": (1, 2),
    "CumSum": (2, 2), "MatMul": (2, 2), "Gemm": (2, 3), "LayerNormalization": (2, 3),
    "SimplifiedLayerNormalization": (2, 2), "RMSNormalization": (2, 2),
    "SkipSimplifiedLayerNormalization": (3, 4), "SkipLayerNormalization": (3, 5),
    "GroupQueryAttention": (1, 12), "Attention": (3, 6), "RotaryEmbedding": (3, 4), "MatMulNBits": (3, 6),
    "GatherBlockQuantized": (3, 4), **{op: (1, 1) for op in _UNARY_NAMES},
}


def check_arity(node) -> str | None:
    """Why `node` has the wrong inputs for its op, or None."""
    lo, hi = ARITY.get(node.op_type, (0, 1 << 16))
    n = len(node.input)
    while n and not node.input[n - 1]:
        n -= 1                  # trailing optional inputs left empty
    if not lo <= n <= hi or not all(node.input[:lo]):
        want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi < 1 << 16 else f"at least {lo}"
        return f"{node.op_type} takes {want} inputs, the node gives {n}" + (
            "" if all(node.input[:lo]) else " (a required one is empty)")
    return None


def conversion_for(domain: str, op: str, opset: int | None):
    best = None
    for since, fn in _TABLE.get((domain, op), ()):
        if opset is None or since <= opset:
            best = fn
    return best


def supported_ops() -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for domain, op in sorted(_TABLE):
        out[domain].append(op)
    return dict(out)


# -- known values (numpy, possibly with symbolic dims) --------------------------------------------
def _is_known(conv: OnnxConverter, *xs) -> bool:
    return all(x is None or conv.is_known(x) for x in xs)


def _tidy(arr) -> np.ndarray:
    """An object array whose entries all became ints turns back into int64."""
    arr = np.asarray(arr)
    if arr.dtype == object:
        flat = [D.canonical(d) if not isinstance(d, (int, np.integer)) else int(d) for d in arr.reshape(-1)]
        if all(isinstance(d, int) for d in flat):
            return np.array(flat, dtype=np.int64).reshape(arr.shape)
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(arr.shape)
    return arr


def _sym_binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def f(x, y):
        x = int(x) if isinstance(x, (np.integer, int)) else x
        y = int(y) if isinstance(y, (np.integer, int)) else y
        if not all(isinstance(v, (int, D.Sym)) for v in (x, y)):
            raise FrontendError(f"arithmetic between a symbolic size and {x if not isinstance(x, (int, D.Sym)) else y!r}")
        if op == "//" and isinstance(x, int) and isinstance(y, int) and y != 0:
            return int(x / y) if (x < 0) != (y < 0) else x // y     # ONNX Div truncates
        return D.binary(op, x, y)
    return _tidy(np.frompyfunc(f, 2, 1)(a.astype(object), b.astype(object)))


def _sym_compare(conv, op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def f(x, y):
        x, y = (D.canonical(int(v) if isinstance(v, np.integer) else v) for v in (x, y))
        if isinstance(x, int) and isinstance(y, int):
            return {"eq": x == y, "lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y}[op]
        if x == y:
            return op in ("eq", "le", "ge")
        other = y if isinstance(y, int) else x if isinstance(x, int) else None
        if op == "eq" and other is not None and other < 1:      # sizes are at least 1
            return False
        conv.fail(f"cannot decide {x} {op} {y} for every size (a shape comparison the model makes)")
    return np.frompyfunc(f, 2, 1)(a.astype(object), b.astype(object)).astype(bool)


def _numeric(conv, x, what="input") -> np.ndarray:
    arr = conv.known(x, what)
    if arr.dtype == object:
        conv.fail(f"{what} depends on a symbolic size ({', '.join(map(str, arr.reshape(-1)))})")
    return arr


def _ints(conv, x, what) -> list[int]:
    return [int(v) for v in _numeric(conv, x, what).reshape(-1)]


def _dims(conv, x, what) -> list:
    arr = conv.known(x, what)
    return [int(v) if isinstance(v, (int, np.integer)) else v for v in arr.reshape(-1)]


def _shape(conv, x) -> tuple:
    return tuple(conv.type_of(x).shape)


def _axis(conv, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        conv.fail(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


# -- structural ops -------------------------------------------------------------------------------
@converts("Identity")
def _identity(conv, ins, at):
    return ins[0]


@converts("Constant")
def _constant(conv, ins, at):
    import onnx.numpy_helper as nh
    if "value" in at:
        t = at["value"]
        n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
        if n > (1 << 20):
            conv.fail(f"constant of {n} elements is too large")
        from .onnx import ONNX_DTYPES
        if t.data_type not in ONNX_DTYPES:
            onnx_dtype(t.data_type, conv.where())
        arr = nh.to_array(t)
        return arr.astype(np.float32) if arr.dtype == np.float16 else np.array(arr)
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in at:
            return np.array(at[key], dtype=dt)
    conv.fail(f"Constant with attributes {sorted(at)} is not supported")


@converts("Cast")
def _cast(conv, ins, at):
    dt = onnx_dtype(int(at.get("to", 0)), conv.where())
    x = ins[0]
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            if dt in (T.i64, T.i32):
                return x
            return conv.emit("cast", [conv.value(x)], {"dtype": dt})
        return x.astype(dt.storage)
    if isinstance(x, Lazy):
        return x.view(_retyped(x.type, dt), lambda a: a.astype(dt.storage), ("cast", dt.name))
    return x if x.type.dtype == dt else conv.emit("cast", [x], {"dtype": dt})


def _retyped(t, dt):
    return t.with_dtype(dt)


@converts("CastLike")
def _cast_like(conv, ins, at):
    return _cast(conv, ins[:1], {"to": _onnx_code(conv.type_of(ins[1]).dtype)})


def _onnx_code(dt: T.DType) -> int:
    from .onnx import ONNX_DTYPES
    return next(k for k, v in ONNX_DTYPES.items() if v == dt)


@converts("Shape")
def _shape_op(conv, ins, at):
    shape = list(_shape(conv, ins[0]))
    rank = len(shape)
    start, end = int(at.get("start", 0)), int(at.get("end", rank))
    start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
    return _tidy(np.array(shape[start:end] if shape[start:end] else [], dtype=object)
                 if shape[start:end] else np.zeros(0, np.int64))


@converts("Size")
def _size(conv, ins, at):
    n = 1
    for d in _shape(conv, ins[0]):
        n = D.binary("*", n, d)
    return _tidy(np.array(n, dtype=object))


def _reshape_to(conv, x, shape: list):
    """x reshaped to `shape` (dims resolved); known and lazy tensors are reshaped here."""
    shape = [D.canonical(d) if not isinstance(d, int) else d for d in shape]
    if isinstance(x, np.ndarray):
        if not all(isinstance(d, int) for d in shape):
            conv.fail(f"a constant cannot take the symbolic shape {shape}")
        return x.reshape(shape)
    if isinstance(x, Lazy):
        if not all(isinstance(d, int) for d in shape):
            conv.fail(f"a weight cannot take the symbolic shape {shape}")
        return x.view(x.type.with_shape(tuple(shape)), lambda a: a.reshape(shape), ("reshape", tuple(shape)))
    if tuple(shape) == tuple(x.type.shape):
        return x
    return conv.emit("reshape", [x], {"shape": shape})


def _quotient(conv, num: list, den: list):
    """prod(num) / prod(den) exactly, cancelling equal dims first (the -1 of a reshape)."""
    num = [D.canonical(d) for d in num]
    rest = []
    for d in (D.canonical(d) for d in den):
        if d in num:
            num.remove(d)
        else:
            rest.append(d)
    top = 1
    for d in num:
        top = D.binary("*", top, d)
    bottom = 1
    for d in rest:
        bottom = D.binary("*", bottom, d)
    if isinstance(bottom, int):
        if bottom == 0:
            conv.fail("reshape to a shape with a zero dim and a -1")
        q = D.binary("//", top, bottom)
        if D.binary("*", q, bottom) != D.canonical(top):
            conv.fail(f"cannot reshape {num} elements into parts of {den}")
        return q
    conv.fail(f"cannot resolve -1 in a reshape of {num} by {rest}")


@converts("Reshape", since=14)
def _reshape(conv, ins, at):
    x = ins[0]
    target = _dims(conv, ins[1], "the reshape shape")
    src = list(_shape(conv, x))
    allowzero = int(at.get("allowzero", 0))
    out = []
    for i, d in enumerate(target):
        if isinstance(d, int) and d == 0 and not allowzero:
            if i >= len(src):
                conv.fail(f"reshape copies dim {i} of a rank-{len(src)} input")
            d = src[i]
        out.append(d)
    if sum(1 for d in out if isinstance(d, int) and d == -1) > 1:
        conv.fail("reshape shape has more than one -1")
    if any(isinstance(d, int) and d < -1 for d in out):
        conv.fail(f"reshape shape {target} has a negative size")
    if -1 in [d for d in out if isinstance(d, int)]:
        i = next(i for i, d in enumerate(out) if isinstance(d, int) and d == -1)
        out[i] = _quotient(conv, src, [d for j, d in enumerate(out) if j != i])
    elif D.same_numel(src, out) is False:
        conv.fail(f"cannot reshape {D.fmt_shape(src)} to {D.fmt_shape(out)}")
    return _reshape_to(conv, x, out)


@converts("Flatten", since=13)
def _flatten(conv, ins, at):
    src = list(_shape(conv, ins[0]))
    axis = int(at.get("axis", 1))
    axis = axis + len(src) if axis < 0 else axis
    a, b = 1, 1
    for d in src[:axis]:
        a = D.binary("*", a, d)
    for d in src[axis:]:
        b = D.binary("*", b, d)
    return _reshape_to(conv, ins[0], [a, b])


@converts("Unsqueeze", since=13)
def _unsqueeze(conv, ins, at):
    src = list(_shape(conv, ins[0]))
    axes = _ints(conv, ins[1], "unsqueeze axes")
    rank = len(src) + len(axes)
    axes = sorted(_axis(conv, a, rank) for a in axes)
    out = list(src)
    for a in axes:
        out.insert(a, 1)
    return _reshape_to(conv, ins[0], out)


@converts("Squeeze", since=13)
def _squeeze(conv, ins, at):
    src = list(_shape(conv, ins[0]))
    if len(ins) > 1 and ins[1] is not None:
        axes = {_axis(conv, a, len(src)) for a in _ints(conv, ins[1], "squeeze axes")}
        if any(src[a] != 1 for a in axes):
            conv.fail(f"squeeze of axes {sorted(axes)} that are not 1 in {src}")
    else:
        axes = {i for i, d in enumerate(src) if d == 1}
    return _reshape_to(conv, ins[0], [d for i, d in enumerate(src) if i not in axes])


@converts("Transpose")
def _transpose(conv, ins, at):
    x = ins[0]
    rank = len(_shape(conv, x))
    perm = [int(p) for p in at.get("perm", list(range(rank))[::-1])]
    if sorted(perm) != list(range(rank)):
        conv.fail(f"perm {perm} is not a permutation of {rank} axes")
    if isinstance(x, np.ndarray):
        return np.transpose(x, perm)
    if isinstance(x, Lazy):
        shape = tuple(x.type.shape[p] for p in perm)
        return x.view(x.type.with_shape(shape), lambda a: np.transpose(a, perm), ("T", tuple(perm)))
    if perm == list(range(rank)):
        return x
    return conv.emit("permute", [x], {"perm": perm})


@converts("Concat")
def _concat(conv, ins, at):
    xs = [x for x in ins if x is not None]
    rank = len(_shape(conv, xs[0]))
    axis = _axis(conv, int(at.get("axis", 0)), rank)
    if all(isinstance(x, np.ndarray) for x in xs):
        return _tidy(np.concatenate([x.astype(object) if any(y.dtype == object for y in xs) else x
                                     for x in xs], axis=axis))
    xs = [x for x in xs if _shape(conv, x)[axis] != 0]
    if len(xs) == 1:
        return conv.value(xs[0])
    dt = next(conv.type_of(x).dtype for x in xs if isinstance(x, (Value, Lazy)))
    return conv.emit("concat", [conv.value(x, dt) for x in xs], {"axis": axis})


def _clamp(conv, v, size, is_end: bool, step: int):
    """An ONNX slice bound resolved against a dim (negative = from the end, clamped)."""
    if isinstance(v, int):
        if v >= INT64_MAX // 2:
            return size if step > 0 else None
        if v <= -(INT64_MAX // 2):
            return 0 if step > 0 else None
        if v < 0:
            v = D.binary("+", size, v)
        if isinstance(v, int) and isinstance(size, int):
            v = max(0, min(v, size))
        if isinstance(v, int) and v < 0:
            v = 0
    return v


@converts("Slice", since=13)
def _slice(conv, ins, at):
    x = ins[0]
    src = list(_shape(conv, x))
    starts = _dims(conv, ins[1], "slice starts")
    ends = _dims(conv, ins[2], "slice ends")
    axes = _ints(conv, ins[3], "slice axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(conv, ins[4], "slice steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        conv.fail("slice starts, ends, axes and steps differ in length")
    if isinstance(x, np.ndarray) or isinstance(x, Lazy):
        arr = conv.known(x, "sliced constant")
        key = [slice(None)] * arr.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            if not (isinstance(s, int) and isinstance(e, int)):
                conv.fail("slice of a constant with symbolic bounds")
            if st == 0:
                conv.fail("slice step 0")
            key[_axis(conv, a, arr.ndim)] = slice(max(min(s, 2 ** 62), -2 ** 62), max(min(e, 2 ** 62), -2 ** 62), st)
        return _tidy(arr[tuple(key)])
    out = x
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _axis(conv, a, len(src))
        if st < 1:
            conv.fail(f"slice step {st} on a run-time tensor is not supported (only positive steps)")
        size = src[a]
        s, e = _clamp(conv, s, size, False, st), _clamp(conv, e, size, True, st)
        if isinstance(s, int) and isinstance(e, int) and e < s:
            e = s
        if s == 0 and D.canonical(e) == D.canonical(size) and st == 1:
            continue
        out = conv.emit("slice", [conv.value(out)], {"axis": a, "start": s, "end": e, "step": st})
    return out


@converts("Split", since=18)
def _split(conv, ins, at):
    x = ins[0]
    src = list(_shape(conv, x))
    axis = _axis(conv, int(at.get("axis", 0)), len(src))
    if len(ins) > 1 and ins[1] is not None:
        sizes = _dims(conv, ins[1], "split sizes")
    else:
        n = int(at.get("num_outputs", len(conv.node.output)))
        size = src[axis]
        if not isinstance(size, int):
            conv.fail("split of a symbolic dim into equal parts")
        part = -(-size // n)
        sizes = [part] * (size // part) + ([size % part] if size % part else [])
    if isinstance(x, np.ndarray):
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    res = conv.emit("split", [conv.value(x)], {"axis": axis, "sizes": sizes})
    return [res] if isinstance(res, Value) else list(res)


@converts("Expand")
def _expand(conv, ins, at):
    x = ins[0]
    target = _dims(conv, ins[1], "expand shape")
    src = list(_shape(conv, x))
    rank = max(len(src), len(target))
    src = [1] * (rank - len(src)) + src
    target = [1] * (rank - len(target)) + target
    out = []
    for s, t in zip(src, target):
        out.append(s if (isinstance(t, int) and t == 1) else t if (isinstance(s, int) and s == 1)
                   else s if D.canonical(s) == D.canonical(t) else conv.fail(f"cannot expand {src} to {target}"))
    if isinstance(x, np.ndarray) and all(isinstance(d, int) for d in out):
        conv.check_size(out)
        return np.broadcast_to(x, out).copy()
    x = conv.value(x)
    if len(src) != len(x.type.shape):
        x = conv.emit("reshape", [x], {"shape": src})
    return x if tuple(out) == tuple(x.type.shape) else conv.emit("expand", [x], {"shape": out})


@converts("Range")
def _range(conv, ins, at):
    start, limit, delta = (_dims(conv, v, "range bound")[0] for v in ins)
    if all(isinstance(v, (int, float)) for v in (start, limit, delta)):
        n = max(0, math.ceil((limit - start) / delta)) if delta else conv.fail("range step 0")
        conv.check_size([n])
        dt = conv.type_of(ins[0]).dtype
        return np.arange(start, limit, delta).astype(dt.storage)
    if not (isinstance(delta, int) and delta >= 1):
        conv.fail("a range over a symbolic size needs a positive integer step")
    return conv.emit("arange", [], {"start": start, "end": limit, "step": delta,
                                    "dtype": conv.type_of(ins[0]).dtype})


@converts("ConstantOfShape")
def _constant_of_shape(conv, ins, at):
    import onnx.numpy_helper as nh
    shape = _dims(conv, ins[0], "shape") if ins[0] is not None else []
    value = nh.to_array(at["value"]).reshape(-1) if "value" in at else np.zeros(1, np.float32)
    if value.size != 1:
        conv.fail("ConstantOfShape value must hold one element")
    if value.dtype == np.float16:
        value = value.astype(np.float32)
    if all(isinstance(d, int) for d in shape):
        conv.check_size(shape)
        return np.full(shape, value[0], dtype=value.dtype)
    dt = conv.type_of(value.reshape(())).dtype
    v = value[0].item()
    return conv.emit("full", [], {"shape": shape, "dtype": dt,
                                  "value": float(v) if dt.is_float else (bool(v) if dt == T.bool_ else int(v))})


# -- gathers ----------------------------------------------------------------------------------------
@converts("Gather", since=13)
def _gather(conv, ins, at):
    data, idx = ins
    rank = len(_shape(conv, data))
    axis = _axis(conv, int(at.get("axis", 0)), rank)
    if _is_known(conv, data, idx) and not (isinstance(data, Lazy) and not conv.is_known(data)):
        arr, ix = conv.known(data), _numeric(conv, idx, "gather indices")
        size = arr.shape[axis]
        if ix.size and (ix.min() < -size or ix.max() >= size):
            conv.fail(f"gather index out of range for a dim of {size}")
        return _tidy(np.take(arr, ix, axis=axis))
    if isinstance(data, Lazy) and axis == 0 and rank == 2:      # an embedding table
        ids = conv.value(idx)
        if ids.type.dtype not in (T.i64, T.i32):
            conv.fail(f"embedding indices must be integers, got {ids.type.dtype}")
        return conv.emit("embedding", [conv.param(data), ids])
    if isinstance(idx, np.ndarray) and idx.ndim == 0:
        size = _shape(conv, data)[axis]
        i = int(idx)
        if i < 0:
            i = D.binary("+", size, i)
        x = conv.emit("slice", [conv.value(data)], {"axis": axis, "start": i, "end": D.binary("+", i, 1)})
        shape = list(x.type.shape)
        del shape[axis]
        return conv.emit("reshape", [x], {"shape": shape})
    ids = conv.value(idx)
    if ids.type.dtype not in (T.i64, T.i32):
        conv.fail("gather indices must be integers")
    return conv.emit("index", [conv.value(data), ids], {"axes": [axis]})


@converts("GatherND", since=13)
def _gather_nd(conv, ins, at):
    data, idx = ins
    if int(at.get("batch_dims", 0)) != 0:
        conv.fail("GatherND with batch_dims is not supported")
    ishape = _shape(conv, idx)
    r = ishape[-1]
    if not isinstance(r, int) or r < 1 or r > len(_shape(conv, data)):
        conv.fail(f"GatherND index depth {r} does not fit data of rank {len(_shape(conv, data))}")
    if _is_known(conv, data, idx):
        arr, ix = conv.known(data), _numeric(conv, idx)
        return _tidy(arr[tuple(np.moveaxis(ix, -1, 0))])
    ix = conv.value(idx)
    parts = conv.emit("split", [ix], {"axis": len(ishape) - 1, "sizes": [1] * r}) if r > 1 else [ix]
    parts = [parts] if isinstance(parts, Value) else list(parts)
    parts = [conv.emit("reshape", [p], {"shape": list(ishape[:-1])}) for p in parts]
    return conv.emit("index", [conv.value(data), *parts], {"axes": list(range(r))})


# -- elementwise --------------------------------------------------------------------------------------
_NP_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum}
_IR_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Max": "maximum",
              "Min": "minimum"}
_SYM_OP = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "//"}


def _binary(op: str):
    def convert(conv, ins, at):
        xs = [x for x in ins if x is not None]
        out = xs[0]
        for y in xs[1:]:
            out = _binary2(conv, op, out, y)
        return out
    return convert


def _operands(conv, xs, dt):
    """IR values of an elementwise op's inputs; a known one-element operand that does not raise
    the result's rank becomes a scalar constant (the form fusion patterns match)."""
    rank = max(len(_shape(conv, x)) for x in xs)
    out = []
    for x in xs:
        if isinstance(x, np.ndarray) and x.size == 1 and x.dtype != object and x.ndim <= rank \
                and any(len(_shape(conv, y)) == rank for y in xs if y is not x):
            x = x.reshape(())
        out.append(conv.value(x, dt))
    return out


def _binary2(conv, op, a, b):
    if _is_known(conv, a, b):
        a, b = conv.known(a), conv.known(b)
        conv.check_size(np.broadcast_shapes(a.shape, b.shape))
        if a.dtype == object or b.dtype == object:
            if op in _SYM_OP:
                return _sym_binary(_SYM_OP[op], a, b)
            if op in ("Max", "Min"):
                big = _sym_compare(conv, "ge", a, b)
                return _tidy(np.where(big == (op == "Max"), a, b))
            conv.fail(f"{op} of symbolic sizes")
        if op == "Div":
            if a.dtype.kind in "iu":
                if (b == 0).any():
                    conv.fail("integer division by zero")
                return (np.trunc(a / b)).astype(a.dtype)
            return (a / b).astype(a.dtype)
        if op == "Pow":
            return np.power(a, b).astype(a.dtype)
        return _NP_BINARY[op](a, b).astype(a.dtype)
    ta = conv.type_of(a) if not isinstance(a, np.ndarray) or a.dtype != object else None
    dt = (ta or conv.type_of(b)).dtype
    if op == "Pow":
        dt = conv.type_of(a).dtype
    x, y = _operands(conv, [a, b], dt) if op != "Pow" else _operands(conv, [a, b], None)
    if op == "Pow" and y.type.dtype != dt:
        y = conv.emit("cast", [y], {"dtype": dt})
    if op == "Div" and not dt.is_float:
        conv.fail("integer division of run-time tensors is not supported")
    return conv.emit(_IR_BINARY[op], [x, y])


for _op in ("Add", "Sub", "Mul", "Div", "Pow"):
    converts(_op, since=7)(_binary(_op))
for _op in ("Max", "Min"):
    converts(_op, since=12)(_binary(_op))

_COMPARE = {"Equal": "eq", "Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge"}


def _compare(op: str):
    def convert(conv, ins, at):
        a, b = ins
        if _is_known(conv, a, b):
            a, b = conv.known(a), conv.known(b)
            if a.dtype == object or b.dtype == object:
                return _sym_compare(conv, op, a, b)
            return {"eq": np.equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
                    "ge": np.greater_equal}[op](a, b)
        dt = next(conv.type_of(x).dtype for x in (a, b) if not (isinstance(x, np.ndarray) and x.dtype == object))
        return conv.emit(op, _operands(conv, [a, b], dt))
    return convert


for _name, _op in _COMPARE.items():
    converts(_name, since=7)(_compare(_op))


def _logical(op: str, np_fn):
    def convert(conv, ins, at):
        if _is_known(conv, *ins):
            return np_fn(*(conv.known(x).astype(bool) for x in ins))
        return conv.emit(op, [conv.value(x, T.bool_) for x in ins])
    return convert


converts("And", since=7)(_logical("logical_and", np.logical_and))
converts("Or", since=7)(_logical("logical_or", np.logical_or))
converts("Not")(_logical("logical_not", np.logical_not))


@converts("Where", since=9)
def _where(conv, ins, at):
    c, a, b = ins
    if _is_known(conv, c, a, b):
        c, a, b = conv.known(c), conv.known(a), conv.known(b)
        conv.check_size(np.broadcast_shapes(c.shape, a.shape, b.shape))
        return _tidy(np.where(c.astype(bool), a, b))
    dt = next(conv.type_of(x).dtype for x in (a, b) if not (isinstance(x, np.ndarray) and x.dtype == object))
    c = conv.value(c, T.bool_)
    return conv.emit("where", [c, *_operands(conv, [a, b, c], dt)[:2]])


_UNARY = {"Neg": ("neg", np.negative), "Sqrt": ("sqrt", np.sqrt), "Reciprocal": ("reciprocal", np.reciprocal),
          "Exp": ("exp", np.exp), "Log": ("log", np.log), "Sin": ("sin", np.sin), "Cos": ("cos", np.cos),
          "Tanh": ("tanh", np.tanh), "Sigmoid": ("sigmoid", lambda a: 1 / (1 + np.exp(-a))),
          "Relu": ("relu", lambda a: np.maximum(a, 0)), "Abs": ("abs", np.abs), "IsNaN": ("isnan", np.isnan)}


def _unary(op: str):
    ir_op, np_fn = _UNARY[op]

    def convert(conv, ins, at):
        x = ins[0]
        if _is_known(conv, x):
            arr = _numeric(conv, x)
            with np.errstate(all="ignore"):
                out = np_fn(arr)
            return out if out.dtype == bool else out.astype(arr.dtype)
        return conv.emit(ir_op, [conv.value(x)])
    return convert


for _name in _UNARY:
    converts(_name, since=6)(_unary(_name))


@converts("Gelu", since=20)
def _gelu(conv, ins, at):
    return conv.emit("gelu", [conv.value(ins[0])], {"approximate": at.get("approximate", "none")})


@converts("Softmax", since=13)
def _softmax(conv, ins, at):
    x = conv.value(ins[0])
    return conv.emit("softmax", [x], {"axis": _axis(conv, int(at.get("axis", -1)), x.type.rank)})


# -- reductions --------------------------------------------------------------------------------------
def _reduce(ir_op: str, np_fn, axes_input: bool):
    def convert(conv, ins, at):
        x = ins[0]
        rank = len(_shape(conv, x))
        if axes_input:
            axes = _ints(conv, ins[1], "reduce axes") if len(ins) > 1 and ins[1] is not None else []
        else:
            axes = [int(a) for a in at.get("axes", [])]
        keep = bool(int(at.get("keepdims", 1)))
        if not axes:
            if int(at.get("noop_with_empty_axes", 0)):
                return x
            axes = list(range(rank))
        axes = sorted({_axis(conv, a, rank) for a in axes})
        if _is_known(conv, x):
            return np_fn(_numeric(conv, x), axis=tuple(axes), keepdims=keep)
        return conv.emit(ir_op, [conv.value(x)], {"axes": axes, "keepdim": keep})
    return convert


converts("ReduceMean", since=1)(_reduce("mean", np.mean, False))
converts("ReduceMean", since=18)(_reduce("mean", np.mean, True))
converts("ReduceMax", since=1)(_reduce("max", np.max, False))
converts("ReduceMax", since=18)(_reduce("max", np.max, True))
converts("ReduceSum", since=13)(_reduce("sum", np.sum, True))


@converts("CumSum", since=14)
def _cumsum(conv, ins, at):
    if int(at.get("exclusive", 0)) or int(at.get("reverse", 0)):
        conv.fail("CumSum with exclusive or reverse is not supported")
    x = ins[0]
    rank = len(_shape(conv, x))
    axis = _axis(conv, _ints(conv, ins[1], "cumsum axis")[0], rank)
    if _is_known(conv, x):
        return np.cumsum(_numeric(conv, x), axis=axis)
    return conv.emit("cumsum", [conv.value(x)], {"axis": axis})


# -- linear algebra and normalization ---------------------------------------------------------------
def _weight_nk(conv, w: Lazy) -> Lazy:
    """A [K, N] MatMul weight as the [N, K] matrix `linear` reads (transposed at load)."""
    return _transpose(conv, [w], {"perm": [1, 0]})


@converts("MatMul", since=13)
def _matmul(conv, ins, at):
    a, b = ins
    if _is_known(conv, a, b) and not isinstance(a, Lazy):
        return np.matmul(_numeric(conv, a), _numeric(conv, b))
    if isinstance(b, Lazy) and b.type.rank == 2 and not isinstance(a, Lazy):
        return conv.emit("linear", [conv.value(a), conv.param(_weight_nk(conv, b))])
    x, y = conv.value(a), conv.value(b)
    if x.type.rank < 2 or y.type.rank < 2:
        conv.fail("MatMul of vectors is not supported")
    return conv.emit("matmul", [x, y])


@converts("Gemm", since=13)
def _gemm(conv, ins, at):
    a, b = ins[:2]
    c = ins[2] if len(ins) > 2 else None
    if float(at.get("alpha", 1.0)) != 1.0 or float(at.get("beta", 1.0)) != 1.0 or int(at.get("transA", 0)):
        conv.fail("Gemm with alpha/beta other than 1 or transA is not supported")
    if not isinstance(b, Lazy) or b.type.rank != 2:
        conv.fail("Gemm needs a weight initializer as B")
    w = b if int(at.get("transB", 0)) else _weight_nk(conv, b)
    inputs = [conv.value(a), conv.param(w)]
    if c is not None:
        if not (isinstance(c, Lazy) and c.type.shape == (w.type.shape[0],)):
            conv.fail("Gemm bias must be a [N] initializer")
        inputs.append(conv.param(c))
    return conv.emit("linear", inputs)


def _last_axis(conv, at, x):
    axis = int(at.get("axis", -1))
    if _axis(conv, axis, x.type.rank) != x.type.rank - 1:
        conv.fail(f"normalization over axis {axis} (only the last axis is supported)")


@converts("LayerNormalization", since=17)
def _layer_norm(conv, ins, at):
    x = conv.value(ins[0])
    _last_axis(conv, at, x)
    inputs = [x, conv.value(ins[1])] + ([conv.value(ins[2])] if len(ins) > 2 and ins[2] is not None else [])
    return conv.emit("layer_norm", inputs, {"axes": 1, "eps": float(at.get("epsilon", 1e-5))})


@converts("SimplifiedLayerNormalization", domain=MS_DOMAIN)
@converts("SimplifiedLayerNormalization")       # the builder also registers it in ai.onnx
@converts("RMSNormalization", since=23)
def _rms_norm(conv, ins, at):
    x = conv.value(ins[0])
    _last_axis(conv, at, x)
    return conv.emit("rms_norm", [x, conv.value(ins[1])], {"eps": float(at.get("epsilon", 1e-5))})


# -- attention and rotary embeddings (ai.onnx, opset 23) ---------------------------------------------
@converts("Attention", since=23)
def _attention(conv, ins, at):
    """Q, K, V as [b, heads, s, d] (the form torch.onnx writes), an optional bool or additive
    mask; becomes `sdpa`, which fuse-attention turns into amxc's attention like torch's own."""
    ins = list(ins) + [None] * (6 - len(ins))
    q, k, v, mask = (conv.value(x) if x is not None else None for x in ins[:4])
    if ins[4] is not None or ins[5] is not None or len(conv.node.output) > 1 and any(conv.node.output[1:]):
        conv.fail("Attention with a past key/value cache or its present outputs is not supported "
                  "(export without a cache: amxc adds its own)")
    if float(at.get("softcap", 0.0) or 0.0):
        conv.fail("Attention with softcap is not supported")
    if q.type.rank != 4 or k.type.rank != 4 or v.type.rank != 4:
        conv.fail("Attention takes 4-D [batch, heads, sequence, head_size] Q, K, V here")
    scale = at.get("scale")
    return conv.emit("sdpa", [q, k, v] + ([mask] if mask is not None else []),
                     {"causal": bool(int(at.get("is_causal", 0))), "gqa": q.type.shape[1] != k.type.shape[1],
                      "scale": float(scale) if scale else None})


@converts("RotaryEmbedding", since=23)
def _rotary_23(conv, ins, at):
    """X [b, heads, s, d] or [b, s, hidden] (num_heads); cos/sin [b, s, d/2] per token, or a
    [positions, d/2] cache with position_ids."""
    x, cos, sin = (ins + [None])[:3]
    pos = ins[3] if len(ins) > 3 else None
    x = conv.value(x)
    interleaved = bool(int(at.get("interleaved", 0)))
    if int(at.get("rotary_embedding_dim", 0)):
        conv.fail("partial rotary embedding (rotary_embedding_dim) is not supported")
    if pos is not None:                       # a cache read by position: the com.microsoft form
        from .onnx_contrib import _rotary
        return _rotary(conv, [x, pos, cos, sin], at)
    four = x.type.rank == 4
    if not four and (x.type.rank != 3 or int(at.get("num_heads", 0)) < 1):
        conv.fail("RotaryEmbedding takes [b, heads, s, d], or [b, s, hidden] with num_heads")
    b, s = (x.type.shape[0], x.type.shape[2]) if four else x.type.shape[:2]
    d = x.type.shape[3] if four else x.type.shape[2] // int(at["num_heads"])
    tables = []
    for t in (conv.value(cos), conv.value(sin)):
        if t.type.rank != 3 or 2 * t.type.shape[2] != d:
            conv.fail(f"rotary table {t.type} is not [b, s, {d}/2]")
        if interleaved:
            t = conv.emit("reshape", [t], {"shape": [*t.type.shape, 1]})
            t = conv.emit("concat", [t, t], {"axis": 3})
        else:
            t = conv.emit("concat", [t, t], {"axis": 2})
        tables.append(conv.emit("reshape", [t], {"shape": [b, 1, s, d]}, name="rope_table"))
    conv.facts["rope"] = True
    if four:
        return conv.emit("rope", [x, *tables], {"interleaved": interleaved})
    heads = int(at["num_heads"])
    xh = conv.emit("permute", [conv.emit("reshape", [x], {"shape": [b, s, heads, d]})], {"perm": [0, 2, 1, 3]})
    out = conv.emit("rope", [xh, *tables], {"interleaved": interleaved})
    out = conv.emit("permute", [out], {"perm": [0, 2, 1, 3]})
    return conv.emit("reshape", [out], {"shape": list(x.type.shape)})


from . import onnx_contrib  # noqa: E402,F401  (registers the com.microsoft ops in the table above)
