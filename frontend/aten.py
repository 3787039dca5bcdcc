"""The ATen -> IR conversion table.

Each entry maps an ATen overload to a small function `(conv, *args, **kwargs) -> Value(s)`;
`conv` is the Converter (torch_export.py) with helpers to emit nodes and read the exporter's
metadata.  Shapes that exporters spell with -1 or out-of-range bounds are resolved from that
metadata, so IR attributes are always explicit.  Ops that only assert metadata or alias memory
vanish.  Anything missing here is an UnsupportedOpError naming the op and the model line.
"""
from __future__ import annotations

import torch

from amxc.ir import Value
from amxc.ir import dims as D
from amxc.ir import dtypes as T

from .errors import FrontendError
from .torch_export import TORCH_DTYPES, ir_dtype

aten = torch.ops.aten
ATEN_TABLE: dict = {}


def converts(*overloads):
    def wrap(fn):
        for o in overloads:
            ATEN_TABLE[o] = fn
        return fn
    return wrap


def _meta(conv, i=None):
    return conv.out_type(index=i)


def _result_dtype(conv, a, b) -> T.DType:
    """torch's type promotion of two operands (tensors or python scalars)."""
    def probe(x):
        if isinstance(x, Value):
            return torch.empty((), dtype=_torch_dtype(x.type.dtype))
        return x
    return ir_dtype(torch.result_type(probe(a), probe(b)))


_TO_TORCH = {v: k for k, v in TORCH_DTYPES.items()}


def _torch_dtype(dt: T.DType) -> torch.dtype:
    return _TO_TORCH[dt]


def _operands(conv, a, b, dtype: T.DType):
    return conv.as_tensor(a, dtype), conv.as_tensor(b, dtype)


# -- vanishing ops --------------------------------------------------------------------------------
@converts(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
          aten.sym_constrain_range_for_size.default, aten._assert_async.msg)
def _drop(conv, *args, **kwargs):
    return None


@converts(aten.alias.default, aten.contiguous.default, aten.clone.default, aten.detach.default,
          aten.lift_fresh_copy.default)
def _identity(conv, x, *args, **kwargs):
    return x


@converts(aten.dropout.default)
def _dropout(conv, x, p, train):
    if train and p > 0:
        raise FrontendError("dropout in training mode cannot be compiled; call model.eval()")
    return x


@converts(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
          aten.type_as.default)
def _to(conv, x, *args, **kwargs):
    return conv.cast(x, _meta(conv).dtype)


# -- elementwise ----------------------------------------------------------------------------------
def _binary(op):
    def convert(conv, a, b, alpha=1):
        if alpha != 1:
            b = conv.emit("mul", _operands(conv, b, alpha, _meta(conv).dtype))
        dt = _meta(conv).dtype
        return conv.emit(op, _operands(conv, a, b, dt))
    return convert


for _op, _names in {"add": ("add",), "sub": ("sub",), "mul": ("mul",), "div": ("div",),
                    "maximum": ("maximum",), "minimum": ("minimum",)}.items():
    for _n in _names:
        for _ov in ("Tensor", "Scalar", "default"):
            if hasattr(getattr(aten, _n), _ov):
                ATEN_TABLE[getattr(getattr(aten, _n), _ov)] = _binary(_op)


@converts(aten.rsub.Scalar)
def _rsub(conv, a, b, alpha=1):
    return _binary("sub")(conv, b, a, alpha)


@converts(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)
def _pow(conv, a, b):
    return conv.emit("pow", _operands(conv, a, b, _meta(conv).dtype))


def _compare(op):
    def convert(conv, a, b):
        return conv.emit(op, _operands(conv, a, b, _result_dtype(conv, a, b)))
    return convert


for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
    for _ov in ("Tensor", "Scalar"):
        ATEN_TABLE[getattr(getattr(aten, _op), _ov)] = _compare(_op)


def _logical(op):
    def convert(conv, a, b):
        if _meta(conv).dtype != T.bool_:
            raise FrontendError(f"bitwise {op} on integers is not supported")
        return conv.emit(op, _operands(conv, a, b, T.bool_))
    return convert


for _ov, _op in ((aten.__and__.Tensor, "logical_and"), (aten.bitwise_and.Tensor, "logical_and"),
                 (aten.logical_and.default, "logical_and"), (aten.__or__.Tensor, "logical_or"),
                 (aten.bitwise_or.Tensor, "logical_or"), (aten.logical_or.default, "logical_or")):
    ATEN_TABLE[_ov] = _logical(_op)


@converts(aten.logical_not.default, aten.bitwise_not.default)
def _not(conv, x):
    return conv.emit("logical_not", [conv.cast(x, T.bool_)])


@converts(aten.where.self)
def _where(conv, c, a, b):
    dt = _meta(conv).dtype
    return conv.emit("where", [c, conv.as_tensor(a, dt), conv.as_tensor(b, dt)])


def _unary(op):
    def convert(conv, x, *args, **kwargs):
        return conv.emit(op, [conv.cast(x, _meta(conv).dtype)])
    return convert


for _op in ("neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "silu", "relu",
            "reciprocal", "abs"):
    ATEN_TABLE[getattr(aten, _op).default] = _unary(_op)


@converts(aten.gelu.default)
def _gelu(conv, x, approximate="none"):
    return conv.emit("gelu", [x], {"approximate": approximate})


# -- linear algebra and nn ------------------------------------------------------------------------
@converts(aten.linear.default)
def _linear(conv, x, w, b=None):
    return conv.emit("linear", [x, w] + ([b] if b is not None else []))


@converts(aten.addmm.default)
def _addmm(conv, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise FrontendError("addmm with beta/alpha other than 1 is not supported")
    return conv.emit("add", [conv.emit("matmul", [a, b], name="mm"), bias])


@converts(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(conv, a, b):
    if a.type.rank < 2 or b.type.rank < 2:
        raise FrontendError("matmul of vectors is not supported; reshape to matrices")
    return conv.emit("matmul", [a, b])


@converts(aten.embedding.default)
def _embedding(conv, w, ids, padding_idx=-1, scale_grad=False, sparse=False):
    return conv.emit("embedding", [w, ids])


@converts(aten.layer_norm.default)
def _layer_norm(conv, x, normalized_shape, w=None, b=None, eps=1e-5, cudnn=True):
    inputs = [x] + ([w] if w is not None else [])
    if b is not None:
        if w is None:
            raise FrontendError("layer_norm with a bias but no weight is not supported")
        inputs.append(b)
    return conv.emit("layer_norm", inputs, {"axes": len(normalized_shape), "eps": float(eps)})


@converts(aten.scaled_dot_product_attention.default)
def _sdpa(conv, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if dropout_p:
        raise FrontendError("attention dropout must be 0 for inference")
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    return conv.emit("sdpa", inputs, {"causal": bool(is_causal), "gqa": bool(enable_gqa),
                                      "scale": None if scale is None else float(scale)})


@converts(aten._softmax.default, aten.softmax.int)
def _softmax(conv, x, dim, *args, **kwargs):
    return conv.emit("softmax", [conv.cast(x, _meta(conv).dtype)], {"axis": dim})


# -- reductions -----------------------------------------------------------------------------------
def _reduce(op):
    def convert(conv, x, dims=None, keepdim=False, *, dtype=None):
        x = conv.cast(x, _meta(conv).dtype)
        axes = list(range(x.type.rank)) if dims is None else (
            [dims] if isinstance(dims, int) else list(dims))
        return conv.emit(op, [x], {"axes": axes, "keepdim": bool(keepdim)})
    return convert


ATEN_TABLE[aten.mean.dim] = _reduce("mean")
ATEN_TABLE[aten.sum.dim_IntList] = _reduce("sum")
ATEN_TABLE[aten.amax.default] = _reduce("max")


@converts(aten.cumsum.default)
def _cumsum(conv, x, dim, *, dtype=None):
    return conv.emit("cumsum", [conv.cast(x, _meta(conv).dtype)], {"axis": dim})


@converts(aten.diff.default)
def _diff(conv, x, n=1, dim=-1, prepend=None, append=None):
    if append is not None:
        raise FrontendError("diff with append is not supported")
    return conv.emit("diff", [x] + ([prepend] if prepend is not None else []), {"axis": dim, "n": n})


# -- layout ---------------------------------------------------------------------------------------
@converts(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
          aten.unflatten.int)
def _reshape(conv, x, *args, **kwargs):
    shape = _meta(conv).shape
    return x if shape == x.type.shape else conv.emit("reshape", [x], {"shape": list(shape)})


@converts(aten.expand.default)
def _expand(conv, x, *args, **kwargs):
    shape = _meta(conv).shape
    return x if shape == x.type.shape else conv.emit("expand", [x], {"shape": list(shape)})


@converts(aten.transpose.int)
def _transpose(conv, x, d0, d1):
    perm = list(range(x.type.rank))
    d0, d1 = d0 % x.type.rank, d1 % x.type.rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return conv.emit("permute", [x], {"perm": perm})


@converts(aten.t.default)
def _t(conv, x):
    return _transpose(conv, x, 0, 1)


@converts(aten.permute.default)
def _permute(conv, x, perm):
    return conv.emit("permute", [x], {"perm": [p % x.type.rank for p in perm]})


def _bound(v, size: D.Dim, default: D.Dim) -> D.Dim:
    """Resolve a python/torch slice bound against a dim: None, negatives, INT64_MAX clamping."""
    if v is None:
        return default
    if isinstance(v, int):
        if v >= 2 ** 62:
            return size
        if v < 0:
            v = D.binary("+", size, v)
        if isinstance(size, int) and isinstance(v, int):
            return max(0, min(v, size))
    return v


@converts(aten.slice.Tensor)
def _slice(conv, x, dim=0, start=None, end=None, step=1):
    axis = dim % x.type.rank
    size = x.type.shape[axis]
    start, end = _bound(start, size, 0), _bound(end, size, size)
    if start == 0 and end == size and step == 1:
        return x
    return conv.emit("slice", [x], {"axis": axis, "start": start, "end": end, "step": step})


@converts(aten.select.int)
def _select(conv, x, dim, index):
    axis = dim % x.type.rank
    start = _bound(index, x.type.shape[axis], 0)
    s = conv.emit("slice", [x], {"axis": axis, "start": start, "end": D.binary("+", start, 1)})
    return conv.emit("reshape", [s], {"shape": list(_meta(conv).shape)})


@converts(aten.cat.default)
def _cat(conv, xs, dim=0):
    xs = [x for x in xs if x.type.shape != (0,)]     # torch skips legacy empty 1-d tensors
    if len(xs) == 1:
        return xs[0]
    return conv.emit("concat", xs, {"axis": dim % xs[0].type.rank})


@converts(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
          aten.unsafe_split.Tensor)
def _split(conv, x, size_or_sizes, dim=0):
    outs = conv.node.meta["val"]
    axis = dim % x.type.rank
    sizes = [conv.dim(o.shape[axis]) for o in outs]
    res = conv.emit("split", [x], {"axis": axis, "sizes": sizes})
    return [res] if isinstance(res, Value) else list(res)


@converts(aten.index.Tensor)
def _index(conv, x, indices):
    axes = [i for i, t in enumerate(indices) if t is not None]
    idx = [t for t in indices if t is not None]
    if any(t.type.dtype not in (T.i64, T.i32) for t in idx):
        raise FrontendError("boolean-mask indexing is not supported")
    return conv.emit("index", [x] + idx, {"axes": axes})


# -- creation -------------------------------------------------------------------------------------
@converts(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(conv, *args, **kwargs):
    nums = [a for a in args if not isinstance(a, (torch.dtype, torch.device))]
    start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums[0], nums[1], nums[2] if len(nums) > 2 else 1)
    if isinstance(step, float) or isinstance(start, float) or isinstance(end, float):
        raise FrontendError("arange over floats is not supported")
    return conv.emit("arange", [], {"start": start, "end": end, "step": step, "dtype": _meta(conv).dtype})


@converts(aten.new_ones.default, aten.new_zeros.default, aten.ones.default, aten.zeros.default,
          aten.ones_like.default, aten.zeros_like.default)
def _fill01(conv, *args, **kwargs):
    value = 1 if "ones" in str(conv.node.target) else 0
    t = _meta(conv)
    return conv.emit("full", [], {"shape": list(t.shape), "value": value, "dtype": t.dtype})


@converts(aten.full.default, aten.new_full.default, aten.full_like.default, aten.scalar_tensor.default)
def _full(conv, *args, **kwargs):
    t = _meta(conv)
    target = conv.node.target
    value = args[0] if target is aten.scalar_tensor.default else args[1]
    if isinstance(value, Value):
        raise FrontendError("full with a tensor fill value is not supported")
    value = float(value) if t.dtype.is_float else (bool(value) if t.dtype == T.bool_ else int(value))
    return conv.emit("full", [], {"shape": list(t.shape), "value": value, "dtype": t.dtype})
