"""The facts each op declares with its registration (ir/registry.py), which quantize-nf4, the
fusion report, lowering and codegen read instead of tables of op names: they are consistent,
wrong declarations are refused, and the MLPs' `weight_input` is the math their references do."""
from __future__ import annotations

import numpy as np
import pytest

import amxc.ir as ir
from amxc.ir import all_ops, get_op, register_op
from amxc.ir.dtypes import f32
from amxc.ir.ops.elementwise import gelu
from amxc.ir.ops.nn import linear
from amxc.ir.registry import Native, float_variant
from amxc.ir.transform import is_weight_use, swap_to_float, swap_to_nf4
from amxc.ir.types import TensorType

rng = np.random.default_rng(0)


def test_declared_facts_are_consistent():
    ops = all_ops()
    assert {n: op.weights for n, op in ops.items() if op.weights} == {
        "linear": (1,), "linear_nf4": (1,), "linear_q8": (1,), "mlp_swiglu": (1, 2, 3), "mlp_gelu": (1, 2)}
    for name, op in ops.items():
        for v in (op.nf4_variant, op.q8_variant):
            if v:
                variant = get_op(v)
                assert variant.weights == op.weights and variant.inputs == op.inputs, name
                assert float_variant(v) == name
    assert float_variant("linear") is None and float_variant("mlp_swiglu") is None
    assert {n: op.kind for n, op in ops.items() if op.kind} == {
        "attention": "attention", "attention_cached": "attention", "rms_norm": "norm", "layer_norm": "norm",
        "rope": "rope", "mlp_swiglu": "mlp", "mlp_gelu": "mlp",
        "localized_filter": "lf", "lf_state": "lf", "lf_pairs": "lf"}
    assert {n for n, op in ops.items() if op.native and op.native.form == "linear"} == {
        "linear", "linear_nf4", "linear_q8", "mlp_swiglu", "mlp_gelu"}
    assert str(get_op("silu").native) == "unary:Silu" and str(get_op("add").native) == "binary:Add"
    assert get_op("tanh").native is None and get_op("sdpa").native is None


@pytest.mark.parametrize("kwargs, message", [
    ({"native": "unary"}, "expected kernel, linear, alias, unary:FUNCTOR"),
    ({"native": "binary:Add;"}, "expected kernel"),
    ({"native": "kernel:X"}, "expected kernel"),
    ({"weights": (2,)}, "not positions of its inputs"),
    ({"nf4_variant": "linear_nf4"}, "need weights="),
    ({"weights": (1,), "weight_output": lambda h, x, w, types: h}, "weight_output needs weight_input"),
])
def test_bad_declarations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        register_op("never_registered", "x w", infer=lambda ts, at: [ts[0]], **kwargs)(lambda x, w: x)
    assert not ir.registry.has_op("never_registered")
    assert Native.parse("binary:Mul") == Native("binary", "Mul")


def test_weight_input_is_the_mlps_own_math():
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    wg, wu = (rng.standard_normal((12, 8)) * 0.3).astype(np.float32), (rng.standard_normal((12, 8)) * 0.3).astype(np.float32)
    wd = (rng.standard_normal((8, 12)) * 0.3).astype(np.float32)
    types = [TensorType(f32, a.shape) for a in (x, wg, wu, wd)]
    op = get_op("mlp_swiglu")
    args = [x, wg, wu, wd]
    assert op.activation_of(1, args, {}, types) is x and op.activation_of(2, args, {}, types) is x
    g = linear(x, wg)
    hidden = op.activation_of(3, args, {}, types)
    np.testing.assert_array_equal(hidden, (g / (1.0 + np.exp(-g))) * linear(x, wu))
    np.testing.assert_array_equal(op.reference(*args, types=types), linear(hidden, wd))
    np.testing.assert_array_equal(op.weight_output(hidden, *args, types=types), op.reference(*args, types=types))
    with pytest.raises(ValueError, match="reads no weight at input 0"):
        op.activation_of(0, args, {}, types)

    gelu_op, b = get_op("mlp_gelu"), rng.standard_normal(12).astype(np.float32)
    w2 = (rng.standard_normal((8, 12)) * 0.3).astype(np.float32)
    args = [x, wg, w2, b, np.zeros(8, np.float32)]
    types = [TensorType(f32, a.shape) for a in args]
    hidden = gelu_op.activation_of(2, args, {"approximate": "tanh"}, types)
    np.testing.assert_array_equal(hidden, gelu(linear(x, wg, b), "tanh"))
    np.testing.assert_array_equal(gelu_op.weight_output(hidden, *args, approximate="tanh", types=types),
                                  gelu_op.reference(*args, approximate="tanh", types=types))
    assert get_op("linear_nf4").activation_of(1, [x, None], {}, []) is x


def test_the_swiglu_hidden_layer_taken_rows_at_a_time_is_the_whole_products(monkeypatch):
    """Above SWIGLU_ROWS rows the hidden layer is built a chunk of rows at a time (calibration's
    16 K tokens): a chunk written to the wrong rows, or a last partial chunk dropped, fails it."""
    from amxc.ir.ops import fused
    monkeypatch.setattr(fused, "SWIGLU_ROWS", 4)
    x = rng.standard_normal((3, 7, 8)).astype(np.float32)          # 21 rows: 5 chunks, the last of 1
    wg, wu = (rng.standard_normal((12, 8)) * 0.3).astype(np.float32), (rng.standard_normal((12, 8)) * 0.3).astype(np.float32)
    types = [TensorType(f32, a.shape) for a in (x, wg, wu, wu.T)]
    hidden = get_op("mlp_swiglu").activation_of(3, [x, wg, wu, wu.T], {}, types)
    g = linear(x, wg)
    assert hidden.shape == (3, 7, 12)
    np.testing.assert_array_equal(hidden, (g / (1.0 + np.exp(-g))) * linear(x, wu))


def test_swap_to_nf4_follows_the_declared_variant():
    module = ir.parse_module("""module @m {
  param @w : f32[4, 64]
  func @forward(%x: f32[2, 64]) -> (f32[2, 4]) {
    %y = linear(%x, @w) : f32[2, 4]
    return %y
  }
}""")
    old = module.params["w"]
    node = module.main.nodes[0]
    assert is_weight_use(node, 1) and not is_weight_use(node, 0)
    nf4 = ir.Param("w", TensorType(ir.dtypes.nf4, (4, 64), {"block": 64, "scale": "f32"}))
    swap_to_nf4(module, old, nf4)
    assert node.op == "linear_nf4" and node.inputs[1] is nf4
    swap_to_float(module, nf4, old)
    assert node.op == "linear" and node.inputs[1] is old
