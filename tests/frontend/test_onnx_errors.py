"""Issue 17 (show 5 and the error list): hostile and malformed ONNX files get amxc's own error
naming what is wrong and where (node, op type, domain, opset, file), never a traceback from deep
inside onnx or numpy -- checked on hand-made defects and on hypothesis-mutated real exports."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from amxc.frontend import FrontendError, UnsupportedOpError, load_model
from amxc.frontend.onnx import import_onnx

VOCAB, DIM = 16, 8


def tiny_model(extra_nodes=(), opset: int = 18, external: bool = False) -> onnx.ModelProto:
    """input_ids -> embedding -> (extra nodes on 'h') -> head: the smallest graph amxc imports."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32), "embed.weight"),
             numpy_helper.from_array(rng.standard_normal((DIM, VOCAB)).astype(np.float32), "head.weight")]
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"], name="embed"),
             helper.make_node("Identity", ["h0"], ["h"], name="keep"),
             *extra_nodes,
             helper.make_node("MatMul", ["h", "head.weight"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def save(model: onnx.ModelProto, path, external: bool = False):
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def test_tiny_model_imports_and_computes(tmp_path):
    import onnxruntime as ort
    from amxc.ir.interpreter import run
    path = save(tiny_model(), tmp_path / "tiny.onnx", external=True)
    module = import_onnx(path)
    ids = np.array([[1, 5, 3]], np.int64)
    ours = run(module, [ids, np.arange(3)[None]])[0]
    ref = ort.InferenceSession(str(path)).run(None, {"input_ids": ids, "position_ids": np.arange(3)[None]})[0]
    assert np.abs(ours - ref).max() < 1e-5


def test_unsupported_op_names_type_domain_opset_node_and_file(tmp_path):
    node = helper.make_node("Einsum", ["h0", "h0"], ["e"], name="the_einsum", equation="bsd,bsd->bsd")
    path = save(tiny_model([node]), tmp_path / "einsum.onnx")
    with pytest.raises(UnsupportedOpError) as e:
        import_onnx(path)
    msg = str(e.value)
    for part in ("Einsum", "domain ai.onnx", "opset 18", "the_einsum", "einsum.onnx"):
        assert part in msg, (part, msg)


def test_unknown_domain_is_named(tmp_path):
    node = helper.make_node("FancyAttention", ["h0"], ["f"], name="fancy", domain="com.example")
    model = tiny_model([node])
    model.opset_import.append(helper.make_opsetid("com.example", 3))
    with pytest.raises(UnsupportedOpError, match=r"FancyAttention \(domain com.example, opset 3\).*fancy"):
        import_onnx(save(model, tmp_path / "m.onnx"))


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(FrontendError, match="opset 13 is not supported.*opset 17 and later"):
        import_onnx(save(tiny_model(opset=13), tmp_path / "old.onnx"))


def test_truncated_protobuf(tmp_path):
    data = tiny_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FrontendError, match="cut.onnx: not a valid ONNX file"):
        import_onnx(path)


def test_missing_external_data(tmp_path):
    path = save(tiny_model(), tmp_path / "ext.onnx", external=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(FrontendError, match=r"initializer 'embed.weight': external data file .* is missing"):
        import_onnx(path)


def test_short_external_data(tmp_path):
    path = save(tiny_model(), tmp_path / "ext.onnx", external=True)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(FrontendError, match="does not hold the .* bytes its type needs"):
        import_onnx(path)


def test_external_data_outside_the_model_directory(tmp_path):
    model = tiny_model()
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../../etc/passwd")
    with pytest.raises(FrontendError, match="must be a file name relative to the model's directory"):
        import_onnx(save(model, tmp_path / "evil.onnx"))


def test_wrong_initializer_size(tmp_path):
    model = tiny_model()
    model.graph.initializer[1].dims[1] = VOCAB + 3
    with pytest.raises(FrontendError, match=r"initializer 'head.weight': holds 512 bytes, its type \[8, 19\] needs 608"):
        import_onnx(save(model, tmp_path / "size.onnx"))


def test_dangling_input(tmp_path):
    node = helper.make_node("Add", ["h0", "nowhere"], ["x"], name="adder")
    with pytest.raises(FrontendError, match="node 'adder' \\(Add\\) reads 'nowhere', which no node, input or initializer defines"):
        import_onnx(save(tiny_model([node]), tmp_path / "dangling.onnx"))


def test_cycle(tmp_path):
    nodes = [helper.make_node("Add", ["h0", "y"], ["x"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")]
    with pytest.raises(FrontendError, match="has a cycle through node"):
        import_onnx(save(tiny_model(nodes), tmp_path / "cycle.onnx"))


def test_control_flow_is_refused(tmp_path):
    branch = helper.make_graph([helper.make_node("Identity", ["h0"], ["o"])], "g", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["z"], name="branchy", then_branch=branch, else_branch=branch)
    model = tiny_model([node])
    model.graph.initializer.append(cond)
    with pytest.raises(FrontendError, match="unsupported op If .*node 'branchy'"):
        import_onnx(save(model, tmp_path / "if.onnx"))


def test_model_without_token_inputs(tmp_path):
    model = tiny_model()
    model.graph.input[0].name = "pixels"
    model.graph.node[0].input[1] = "pixels"
    with pytest.raises(FrontendError, match="no 'input_ids' input"):
        import_onnx(save(model, tmp_path / "m.onnx"))


def test_huge_constant_is_bounded(tmp_path):
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "big_shape")
    node = helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="huge")
    model = tiny_model([node, helper.make_node("Add", ["h0", "big"], ["x"], name="use")])
    model.graph.initializer.append(shape)
    with pytest.raises(FrontendError, match="too large to evaluate at import"):
        import_onnx(save(model, tmp_path / "huge.onnx"))


def test_onnx_resolves_through_load_model(tmp_path):
    path = save(tiny_model(), tmp_path / "model.onnx")
    assert load_model(tmp_path).attrs["source_format"] == "onnx"        # a directory with one .onnx
    assert load_model(path).attrs["vocab_size"] == VOCAB


# -- hypothesis: mutated real exports only ever give amxc's own errors ------------------------------
@pytest.fixture(scope="module", params=["torch", "builder-int4"])
def real_export(request, tmp_path_factory, stories_dir):
    """stories260K as torch.onnx exports it (ai.onnx ops), and as the model builder's int4 graph
    (GroupQueryAttention, RotaryEmbedding, MatMulNBits, GatherBlockQuantized, Skip norms)."""
    from support.onnx_models import builder_export, torch_export
    root = tmp_path_factory.mktemp("fuzz")
    if request.param == "torch":
        return onnx.load(str(torch_export(stories_dir, root / "stories.onnx")))
    return onnx.load(str(builder_export(stories_dir, root / "builder", "int4") / "model.onnx"))


MUTATIONS = ("op_type", "drop_input", "rename_input", "attr_int", "dims", "truncate", "flip_bytes",
             "opset", "remove_node", "shuffle")


def mutate(model: onnx.ModelProto, kind: str, data) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = m.graph.node
    pick = data.draw(st.integers(0, len(nodes) - 1))
    node = nodes[pick]
    if kind == "op_type":
        node.op_type = data.draw(st.sampled_from(["Add", "Reshape", "Gather", "MatMul", "Softmax", "Concat",
                                                   "Slice", "Expand", "Where", "Transpose", "Foo", "Range",
                                                   "ConstantOfShape", "GatherND", "Squeeze", "CumSum",
                                                   "GroupQueryAttention", "MatMulNBits", "RotaryEmbedding",
                                                   "SkipSimplifiedLayerNormalization", "GatherBlockQuantized"]))
    elif kind == "drop_input" and len(node.input):
        del node.input[data.draw(st.integers(0, len(node.input) - 1))]
    elif kind == "rename_input" and len(node.input):
        other = nodes[data.draw(st.integers(0, len(nodes) - 1))]
        node.input[data.draw(st.integers(0, len(node.input) - 1))] = (
            other.output[0] if len(other.output) else "x")
    elif kind == "attr_int" and len(node.attribute):
        a = node.attribute[data.draw(st.integers(0, len(node.attribute) - 1))]
        v = data.draw(st.integers(-(1 << 40), 1 << 40) | st.integers(-4, 4))
        if a.type == onnx.AttributeProto.INT:
            a.i = v
        elif a.type == onnx.AttributeProto.INTS and len(a.ints):
            a.ints[data.draw(st.integers(0, len(a.ints) - 1))] = v
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = float(v)
    elif kind == "dims" and len(m.graph.initializer):
        t = m.graph.initializer[data.draw(st.integers(0, len(m.graph.initializer) - 1))]
        if len(t.dims):
            t.dims[data.draw(st.integers(0, len(t.dims) - 1))] = data.draw(st.integers(-2, 1 << 33))
    elif kind == "opset":
        m.opset_import[0].version = data.draw(st.integers(0, 30))
    elif kind == "remove_node":
        del nodes[pick]
    elif kind == "shuffle":
        order = data.draw(st.permutations(range(len(nodes))))
        copies = [onnx.NodeProto() for _ in nodes]
        for c, i in zip(copies, order):
            c.CopyFrom(nodes[i])
        del nodes[:]
        nodes.extend(copies)
    blob = m.SerializeToString()
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip_bytes":
        blob = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    return blob


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_exports_only_give_amxc_errors(real_export, tmp_path_factory, data):
    """A mutant either fails to import with a FrontendError or imports as IR that verifies."""
    from amxc.ir import verify
    kind = data.draw(st.sampled_from(MUTATIONS))
    path = tmp_path_factory.mktemp("mut") / "m.onnx"
    path.write_bytes(mutate(real_export, kind, data))
    try:
        module = import_onnx(path)
    except FrontendError as e:
        assert str(e).strip() and "Traceback" not in str(e)
        return
    verify(module)
